"""Labelled segmentation datasets on any fsspec URI, and per-sample loading that reports bad samples.

Four layouts are recognised under a root URI, tried in the order of :data:`LAYOUTS` by the folders
named first (``open_dataset(uri, layout=...)`` forces one). Each is one module, whose docstring describes
its folders and files, and one entry in ``registry.py``:

- ``voc`` (``voc.py``): PASCAL VOC, and any data in its folders;
- ``nyud`` (``nyud.py``): NYUDv2 as the FCN reference code's ``data/nyud``, with depth and HHA;
- ``siftflow`` (``siftflow.py``): SIFT Flow as the reference's ``data/sift-flow``, with semantic and
  geometric labels;
- ``images-masks`` (``images_masks.py``): ``images/`` and ``masks/`` folders with optional split lists.

A dataset has label heads (``semantic``; SIFT Flow also ``geometric``) and input modalities (``rgb``;
NYUDv2 also ``depth`` and ``hha``). ``readers.py`` reads a sample's files (``.mat`` labels shifted as the
reference data layers shift them); ``base.py`` holds the types every layout shares.

Semantic class names come from an explicit file, else ``<root>/class_names.txt``, else the layout's
(NYUDv2's 40, SIFT Flow's 33), else from the data: PASCAL VOC itself (:func:`is_pascal_voc`: the VOC
layout with every image id of VOC's form) with label ids up to 20 gets the 21 VOC classes, anything else
``class_0`` ... ``class_<largest id of the train split>`` and a warning that says how to name them.
:func:`open_dataset` reads every semantic mask once, concurrently, for this and for the label
statistics (:class:`LabelStats`); a mask with a label id beyond the classes is a ValueError naming the
file. A bad sample (a missing or unreadable file, sizes that disagree) raises :class:`BadSample` from
:func:`load_example`, :func:`read_example` and :func:`load_sample`; the training loop skips and counts it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import fsspec

from fcn.classes import VOC_CLASSES, numbered_class_names
from pipelines.train.datasets.base import (
    CLASS_NAMES_FILE,
    IGNORE_LABEL,
    SEMANTIC,
    BadSample,
    Example,
    LabelStats,
    Layout,
    Sample,
    SegmentationData,
)
from pipelines.train.datasets.images_masks import IMAGE_SUFFIXES
from pipelines.train.datasets.readers import load_example, load_sample, read_example, scan_labels
from pipelines.train.datasets.registry import LAYOUT_SPECS, LAYOUTS, detect_layout
from pipelines.train.datasets.siftflow import GEOMETRIC, SIFTFLOW_SET
from pipelines.train.datasets.voc import is_pascal_voc

__all__ = [
    "CLASS_NAMES_FILE",
    "GEOMETRIC",
    "IGNORE_LABEL",
    "IMAGE_SUFFIXES",
    "LAYOUTS",
    "SEMANTIC",
    "SIFTFLOW_SET",
    "BadSample",
    "Example",
    "LabelStats",
    "Layout",
    "Sample",
    "SegmentationData",
    "is_pascal_voc",
    "load_example",
    "load_sample",
    "open_dataset",
    "read_class_names",
    "read_example",
    "scan_labels",
]

logger = logging.getLogger(__name__)


def open_dataset(uri: str, *, classes: str | None = None, layout: str | None = None) -> SegmentationData:
    """Index the dataset at ``uri`` in ``layout`` (one of :data:`LAYOUTS`; by default the one its
    folders show), scan its masks and name its classes (see the module docstring).

    Raises ValueError naming the problem: an unknown layout, a forced layout whose folders are missing,
    no known layout, a missing split list, an empty split, a bad class file, no label ids to size the
    network by, or a mask (named) with a label id beyond the classes.
    """
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    layout = detect_layout(fs, root, uri, layout)
    spec = LAYOUT_SPECS[layout]
    train, val = spec.splits(fs, root)
    if not train:
        raise ValueError(f"data {uri!r}: the train split is empty")
    if not val:
        raise ValueError(f"data {uri!r}: the val split is empty")
    train_labels = scan_labels(train)
    class_names, named_by = _class_names(uri, classes, layout, train_labels, [*train, *val])
    beyond = sorted(
        (mask, label)
        for labels in (train_labels, scan_labels(val))
        for mask, label in labels.largest.items()
        if label >= len(class_names)
    )
    if beyond:
        (mask, label), more = beyond[0], len(beyond) - 1
        raise ValueError(
            f"data {uri!r}: mask {mask} has label id {label}, beyond the {len(class_names)} classes {named_by} "
            f"(ids 0-{len(class_names) - 1}, {IGNORE_LABEL} = ignore)" + (f"; {more} more masks too" if more else "")
        )
    return SegmentationData(
        uri, layout, class_names, tuple(train), tuple(val), train_labels, spec.modalities, dict(spec.other_heads)
    )


def _class_names(
    uri: str, classes: str | None, layout: str, labels: LabelStats, samples: Sequence[Sample]
) -> tuple[tuple[str, ...], str]:
    """The class names (see the module docstring) and where they come from, for messages."""
    names = read_class_names(uri, classes)
    if names is not None:
        return names, f"named in {classes if classes else CLASS_NAMES_FILE}"
    if LAYOUT_SPECS[layout].classes:
        return LAYOUT_SPECS[layout].classes, f"of {layout}"
    voc = layout == "voc" and is_pascal_voc(uri, samples)
    if voc and 0 <= labels.max_label < len(VOC_CLASSES):
        return VOC_CLASSES, "of PASCAL VOC"
    if labels.max_label < 1:
        raise ValueError(
            f"data {uri!r}: the train masks hold {'only label id 0' if labels.max_label == 0 else 'no label ids'}; "
            f"a network needs at least 2 classes (name them in {CLASS_NAMES_FILE} or a classes file)"
        )
    names = numbered_class_names(labels.max_label + 1)
    not_voc = " and its image ids are not PASCAL VOC's (2007_000032)" if layout == "voc" and not voc else ""
    logger.warning(
        "data %s: no class names (no %s, no --classes)%s; the train masks hold label ids up to %d, so the "
        "network gets %d classes named class_0 ... class_%d. Name them with one name per line in "
        "<data>/%s or a file passed as --classes.",
        uri,
        CLASS_NAMES_FILE,
        not_voc,
        labels.max_label,
        len(names),
        labels.max_label,
        CLASS_NAMES_FILE,
    )
    return names, "found in the train masks"


def read_class_names(uri: str, classes: str | None = None) -> tuple[str, ...] | None:
    """Class names from ``classes`` (a file URI, one name per line), else ``<uri>/class_names.txt``;
    None without either."""
    fs, root = fsspec.core.url_to_fs(uri)
    if classes is None:
        candidate = f"{root.rstrip('/')}/{CLASS_NAMES_FILE}"
        if not fs.isfile(candidate):
            return None
        with fs.open(candidate, "r") as f:
            text = f.read()
    else:
        try:
            with fsspec.open(classes, "r") as f:
                text = f.read()
        except FileNotFoundError:
            raise ValueError(f"classes file {classes!r} does not exist") from None
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not 2 <= len(names) <= IGNORE_LABEL:
        raise ValueError(f"classes file must list 2 to {IGNORE_LABEL} class names, got {len(names)}")
    return names
