"""The types every dataset layout shares: samples, label statistics, an opened dataset, a loaded example,
a bad sample, and ``Layout``, how a layout is recognised, indexed and read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import fsspec
import numpy as np

from fcn.heads import PRIMARY_HEAD

IGNORE_LABEL = 255
CLASS_NAMES_FILE = "class_names.txt"
SEMANTIC = PRIMARY_HEAD  # the primary label head of every layout


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is a short description for logs and reports."""

    def __init__(self, sample_id: str, reason: str) -> None:
        super().__init__(f"{sample_id}: {reason}")
        self.sample_id = sample_id
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return BadSample, (self.sample_id, self.reason)


@dataclass(frozen=True)
class Sample:
    """One sample's files as full fsspec URIs, and the layout that says how its label files are encoded.

    ``mask`` holds the semantic labels (None when the dataset's index shows no mask file),
    ``other_labels`` the further heads' as ``(head, URI)`` pairs. ``depth`` and ``hha`` are set where
    the layout has them (``hha`` None: computed from depth).
    """

    id: str
    image: str
    mask: str | None
    layout: str = "voc"
    depth: str | None = None
    hha: str | None = None
    other_labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LabelStats:
    """The label ids in the readable masks of some samples (``IGNORE_LABEL`` left out)."""

    pixels: tuple[int, ...]  # per label id 0..254: its pixels
    image_pixels: tuple[int, ...]  # per label id: the labelled pixels of the masks it appears in
    largest: dict[str, int] = field(compare=False)  # mask URI -> its largest label id

    @property
    def max_label(self) -> int:
        """The largest label id found; -1 if none."""
        return max(self.largest.values(), default=-1)


@dataclass(frozen=True)
class SegmentationData:
    """The samples of a labelled dataset, its class names, the label statistics of its train split (of
    the semantic head) and the input modalities, a subset of ``("rgb", "depth", "hha")``, it provides.

    ``class_names`` names the semantic head's classes, ``other_heads`` those of further heads.
    """

    root: str
    layout: str
    class_names: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    train_labels: LabelStats
    modalities: tuple[str, ...] = ("rgb",)
    other_heads: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def heads(self) -> dict[str, tuple[str, ...]]:
        """Class names by label head, the primary (semantic) head first."""
        return {SEMANTIC: self.class_names, **self.other_heads}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class Example:
    """A loaded sample: input arrays by modality and uint8 label maps by head, all of one height and width."""

    modalities: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


Splits = tuple[list[Sample], list[Sample]]


@dataclass(frozen=True)
class Layout:
    """How a layout is recognised, indexed and read."""

    folders: tuple[str, ...]  # all present: the layout is recognised
    splits: Callable[[fsspec.AbstractFileSystem, str], Splits]
    modalities: tuple[str, ...] = ("rgb",)
    classes: tuple[str, ...] = ()  # the semantic classes, where the layout fixes them
    other_heads: dict[str, tuple[str, ...]] = field(default_factory=dict)
    mat_labels: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # head -> (variable, also void)


def listed_ids(fs: fsspec.AbstractFileSystem, root: str, name: str, layout: str) -> list[str]:
    """The ids in the split list ``<root>/<name>`` (the first word of each non-empty line)."""
    if not fs.isfile(f"{root}/{name}"):
        raise ValueError(f"{layout} data {fs.unstrip_protocol(root)!r}: missing {name}")
    with fs.open(f"{root}/{name}", "r") as f:
        return [line.split()[0] for line in f.read().splitlines() if line.strip()]
