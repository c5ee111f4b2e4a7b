"""Labelled segmentation datasets on any fsspec URI, and per-sample loading that reports bad samples.

Four layouts are recognised under a root URI, tried in the order of :data:`LAYOUTS` by the folders
named first (``open_dataset(uri, layout=...)`` forces one):

- ``voc`` (PASCAL VOC): ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette or grey PNG
  with class indices, 255 = ignore), ``ImageSets/Segmentation/{train,val}.txt``.
- ``nyud`` (NYUDv2, as the FCN reference code's ``data/nyud``): ``data/images/img_<id>.png`` colour,
  ``data/depth/img_<id>.png`` depth (16-bit PNG in millimetres, 0 = no reading),
  ``segmentation/img_<id>.mat`` (variable ``segmentation``: 1-40 the 40 classes, 0 void), optional
  ``data/hha/img_<id>.png`` (HHA is computed from depth where it is missing); ``train.txt`` and
  ``val.txt`` list the ids (``test.txt`` is not read).
- ``siftflow`` (SIFT Flow, as the reference's ``data/sift-flow``), with ``S`` =
  ``spatial_envelope_256x256_static_8outdoorcategories``: ``Images/S/<id>.jpg``,
  ``SemanticLabels/S/<id>.mat`` (variable ``S``: 1-33 the classes, 0 void) and ``GeoLabels/S/<id>.mat``
  (variable ``S``: 1-3 sky, horizontal, vertical; 0 and -1 void); ``trainval.txt`` is the train split
  and ``test.txt`` the val split, as the reference trains and tests.
- ``images-masks``: ``images/<key>.<jpg|jpeg|png|...>`` and ``masks/<key>.png`` (keys may contain
  folders), optional ``train.txt`` / ``val.txt`` listing keys; without them every 10th key (by a hash
  of the key, so adding files does not reshuffle the split) is validation.

A dataset has label heads (``semantic``; SIFT Flow also ``geometric``) and input modalities (``rgb``;
NYUDv2 also ``depth`` and ``hha``). ``.mat`` labels are shifted as the reference data layers shift
them: class k becomes label id k - 1 and void becomes 255 (ignored).

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

import hashlib
import io
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import scipy.io
from PIL import Image

from fcn.classes import (
    NYUD40_CLASSES,
    SIFTFLOW_CLASSES,
    SIFTFLOW_GEOMETRIC_CLASSES,
    VOC_CLASSES,
    numbered_class_names,
    voc_palette,
)
from fcn.image import to_rgb_array
from pipelines.common.decode import DecodeError, depth_from_image

logger = logging.getLogger("pipelines.train.datasets")

IGNORE_LABEL = 255
CLASS_NAMES_FILE = "class_names.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGES_MASKS_VAL_EVERY = 10
SEMANTIC = "semantic"  # the primary label head of every layout
GEOMETRIC = "geometric"
SIFTFLOW_SET = "spatial_envelope_256x256_static_8outdoorcategories"
SCAN_THREADS = 16  # concurrent mask reads of scan_labels
VOC_IMAGE_ID = re.compile(r"20(0[7-9]|1[0-2])_\d{6}")  # VOC2008-2012 (and SBD): 2007_000032
VOC2007_IMAGE_ID = re.compile(r"\d{6}")  # VOC2007's own release: 000032
VOC2007_FOLDER = "VOC2007"


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


def open_dataset(uri: str, *, classes: str | None = None, layout: str | None = None) -> SegmentationData:
    """Index the dataset at ``uri`` in ``layout`` (one of :data:`LAYOUTS`; by default the one its
    folders show), scan its masks and name its classes (see the module docstring).

    Raises ValueError naming the problem: an unknown layout, a forced layout whose folders are missing,
    no known layout, a missing split list, an empty split, a bad class file, no label ids to size the
    network by, or a mask (named) with a label id beyond the classes.
    """
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    layout = _layout_of(fs, root, uri, layout)
    spec = _LAYOUTS[layout]
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


def _layout_of(fs: fsspec.AbstractFileSystem, root: str, uri: str, forced: str | None) -> str:
    """The ``forced`` layout if the folders it needs are there, else the first layout whose folders are."""
    if forced is None:
        found = next((name for name, spec in _LAYOUTS.items() if not _missing_folders(fs, root, spec)), None)
        if found is None:
            folders = {name: ", ".join(f"{d}/" for d in spec.folders) for name, spec in _LAYOUTS.items()}
            others = "; ".join(f"{name}: {folders[name]}" for name in LAYOUTS if name != "voc")
            raise ValueError(f"data {uri!r}: found neither the VOC layout ({folders['voc']}) nor another ({others})")
        return found
    if forced not in _LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {forced!r}")
    if missing := _missing_folders(fs, root, _LAYOUTS[forced]):
        raise ValueError(f"data {uri!r} is not in the {forced} layout: missing {', '.join(missing)}")
    return forced


def is_pascal_voc(uri: str, samples: Sequence[Sample]) -> bool:
    """Whether VOC-layout ``samples`` are PASCAL VOC itself: every image id has the form of VOC2008-2012's
    (``2007_000032``), or the root is VOC2007's release folder (``VOCdevkit/VOC2007``) and every id has
    its form (``000032``). A root folder name alone is not enough: tools ask for custom data in
    ``VOCdevkit/VOC2012``."""
    ids = [sample.id for sample in samples]
    if not ids:
        return False
    if all(VOC_IMAGE_ID.fullmatch(i) for i in ids):
        return True
    return uri.rstrip("/").rsplit("/", 1)[-1] == VOC2007_FOLDER and all(VOC2007_IMAGE_ID.fullmatch(i) for i in ids)


def _class_names(
    uri: str, classes: str | None, layout: str, labels: LabelStats, samples: Sequence[Sample]
) -> tuple[tuple[str, ...], str]:
    """The class names (see the module docstring) and where they come from, for messages."""
    names = read_class_names(uri, classes)
    if names is not None:
        return names, f"named in {classes if classes else CLASS_NAMES_FILE}"
    if _LAYOUTS[layout].classes:
        return _LAYOUTS[layout].classes, f"of {layout}"
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


def scan_labels(samples: Sequence[Sample]) -> LabelStats:
    """Count the label ids in the samples' masks, reading them concurrently (``SCAN_THREADS``).

    Missing and unreadable masks are left out: :func:`load_sample` reports those samples.
    """

    def count(sample: Sample) -> np.ndarray | None:
        try:
            labels = _label_ids(sample, SEMANTIC, sample.mask, "mask")
        except BadSample:
            return None
        return np.bincount(labels.ravel(), minlength=IGNORE_LABEL + 1)[:IGNORE_LABEL]

    masked = [s for s in samples if s.mask is not None]
    pixels, image_pixels, largest = np.zeros(IGNORE_LABEL, np.int64), np.zeros(IGNORE_LABEL, np.int64), {}
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        for sample, counts in zip(masked, pool.map(count, masked)):
            if counts is None or not counts.any():
                continue
            present = counts > 0
            pixels += counts
            image_pixels[present] += counts.sum()
            largest[sample.mask] = int(np.flatnonzero(present)[-1])
    return LabelStats(tuple(pixels.tolist()), tuple(image_pixels.tolist()), largest)


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


Splits = tuple[list[Sample], list[Sample]]


def _voc_splits(fs: fsspec.AbstractFileSystem, root: str) -> Splits:
    masks = {p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/SegmentationClass/*.png")}

    def sample(i: str) -> Sample:
        mask = fs.unstrip_protocol(f"{root}/SegmentationClass/{i}.png") if f"{i}.png" in masks else None
        return Sample(i, fs.unstrip_protocol(f"{root}/JPEGImages/{i}.jpg"), mask, "voc")

    train, val = (_listed_ids(fs, root, f"ImageSets/Segmentation/{name}.txt", "voc") for name in ("train", "val"))
    return [sample(i) for i in train], [sample(i) for i in val]


def _nyud_splits(fs: fsspec.AbstractFileSystem, root: str) -> Splits:
    hha = {p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/data/hha/img_*.png")}

    def sample(i: str) -> Sample:
        return Sample(
            i,
            fs.unstrip_protocol(f"{root}/data/images/img_{i}.png"),
            fs.unstrip_protocol(f"{root}/segmentation/img_{i}.mat"),
            "nyud",
            depth=fs.unstrip_protocol(f"{root}/data/depth/img_{i}.png"),
            hha=fs.unstrip_protocol(f"{root}/data/hha/img_{i}.png") if f"img_{i}.png" in hha else None,
        )

    train, val = (_listed_ids(fs, root, name, "nyud") for name in ("train.txt", "val.txt"))
    return [sample(i) for i in train], [sample(i) for i in val]


def _siftflow_splits(fs: fsspec.AbstractFileSystem, root: str) -> Splits:
    def sample(i: str) -> Sample:
        return Sample(
            i,
            fs.unstrip_protocol(f"{root}/Images/{SIFTFLOW_SET}/{i}.jpg"),
            fs.unstrip_protocol(f"{root}/SemanticLabels/{SIFTFLOW_SET}/{i}.mat"),
            "siftflow",
            other_labels=((GEOMETRIC, fs.unstrip_protocol(f"{root}/GeoLabels/{SIFTFLOW_SET}/{i}.mat")),),
        )

    train, val = (_listed_ids(fs, root, name, "siftflow") for name in ("trainval.txt", "test.txt"))
    return [sample(i) for i in train], [sample(i) for i in val]


def _images_masks_splits(fs: fsspec.AbstractFileSystem, root: str) -> Splits:
    images = {}
    for path in fs.find(f"{root}/images"):
        stem, dot, suffix = path[len(root) + len("/images/") :].rpartition(".")
        if dot and f".{suffix.lower()}" in IMAGE_SUFFIXES:
            images[stem] = fs.unstrip_protocol(path)
    masks = set()
    if fs.isdir(f"{root}/masks"):
        masks = {p[len(root) + len("/masks/") : -len(".png")] for p in fs.find(f"{root}/masks") if p.endswith(".png")}

    def sample(key: str, image: str) -> Sample:
        mask = fs.unstrip_protocol(f"{root}/masks/{key}.png") if key in masks else None
        return Sample(key, image, mask, "images-masks")

    samples = {key: sample(key, uri) for key, uri in sorted(images.items())}
    listed = [f"{root}/{name}.txt" for name in ("train", "val")]
    if all(fs.isfile(p) for p in listed):
        splits = []
        for listing in listed:
            with fs.open(listing, "r") as f:
                keys = [line.strip() for line in f.read().splitlines() if line.strip()]
            splits.append([samples.get(k) or sample(k, fs.unstrip_protocol(f"{root}/images/{k}")) for k in keys])
        return splits[0], splits[1]
    val_keys = {k for k in samples if int(hashlib.sha1(k.encode()).hexdigest(), 16) % IMAGES_MASKS_VAL_EVERY == 0}
    train = [s for k, s in samples.items() if k not in val_keys]
    val = [s for k, s in samples.items() if k in val_keys]
    return train, val


def _listed_ids(fs: fsspec.AbstractFileSystem, root: str, name: str, layout: str) -> list[str]:
    """The ids in the split list ``<root>/<name>`` (the first word of each non-empty line)."""
    if not fs.isfile(f"{root}/{name}"):
        raise ValueError(f"{layout} data {fs.unstrip_protocol(root)!r}: missing {name}")
    with fs.open(f"{root}/{name}", "r") as f:
        return [line.split()[0] for line in f.read().splitlines() if line.strip()]


@dataclass(frozen=True)
class _Layout:
    """How a layout is recognised, indexed and read."""

    folders: tuple[str, ...]  # all present: the layout is recognised
    splits: Callable[[fsspec.AbstractFileSystem, str], Splits]
    modalities: tuple[str, ...] = ("rgb",)
    classes: tuple[str, ...] = ()  # the semantic classes, where the layout fixes them
    other_heads: dict[str, tuple[str, ...]] = field(default_factory=dict)
    mat_labels: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # head -> (variable, also void)


# In detection order: images-masks, recognised by images/ alone, comes last.
_LAYOUTS: dict[str, _Layout] = {
    "voc": _Layout(("JPEGImages", "ImageSets/Segmentation"), _voc_splits),
    "nyud": _Layout(
        ("data/images", "data/depth", "segmentation"),
        _nyud_splits,
        modalities=("rgb", "depth", "hha"),
        classes=NYUD40_CLASSES,
        mat_labels={SEMANTIC: ("segmentation", None)},
    ),
    "siftflow": _Layout(
        tuple(f"{folder}/{SIFTFLOW_SET}" for folder in ("Images", "SemanticLabels", "GeoLabels")),
        _siftflow_splits,
        classes=SIFTFLOW_CLASSES,
        other_heads={GEOMETRIC: SIFTFLOW_GEOMETRIC_CLASSES},
        mat_labels={SEMANTIC: ("S", None), GEOMETRIC: ("S", -1)},  # siftflow_layers.py: geometric -1 is void too
    ),
    "images-masks": _Layout(("images",), _images_masks_splits),
}
LAYOUTS: tuple[str, ...] = tuple(_LAYOUTS)


def _missing_folders(fs: fsspec.AbstractFileSystem, root: str, spec: _Layout) -> list[str]:
    return [f"{folder}/" for folder in spec.folders if not fs.isdir(f"{root}/{folder}")]


def load_example(sample: Sample, data: SegmentationData) -> Example:
    """Read one sample's modalities (those ``data`` provides) and label maps (one per head of ``data``).

    "rgb" is HxWx3 uint8, "depth" HxW float32 metres (0 = no reading), "hha" HxWx3 uint8 (computed
    from depth for the NYUDv2 Kinect camera where the sample has no HHA file); each label map is uint8
    HxW with values below its head's class count or 255. Raises BadSample naming the problem and the
    file; never any other exception for bad files.
    """
    return read_example(sample, data.modalities, {head: len(names) for head, names in data.heads.items()})


def load_sample(sample: Sample, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one sample's colour image and semantic labels: (RGB uint8 HxWx3, labels uint8 HxW with
    values < num_classes or 255).

    Raises BadSample naming the problem; never any other exception for bad files.
    """
    example = read_example(sample, ("rgb",), {SEMANTIC: num_classes})
    return example.modalities["rgb"], example.labels[SEMANTIC]


def read_example(sample: Sample, modalities: Sequence[str], class_counts: Mapping[str, int]) -> Example:
    """Read the ``modalities`` a network needs and the label maps of the heads in ``class_counts`` (head ->
    its class count), as :func:`load_example` describes them; only those (HHA is computed only if asked)."""
    if sample.mask is None:
        raise BadSample(sample.id, "missing mask")
    image = _read_image(sample.id, sample.image, "image")
    try:
        rgb = np.require(to_rgb_array(image), requirements="W")  # writable: torch.from_numpy needs no copy
    except (ValueError, OSError) as exc:
        raise BadSample(sample.id, f"unreadable image {sample.image}: {exc}") from None
    files = {SEMANTIC: sample.mask, **dict(sample.other_labels)}
    labels = {}
    for head, num_classes in class_counts.items():
        what = "mask" if head == SEMANTIC else f"{head} mask"
        if files.get(head) is None:
            raise BadSample(sample.id, f"missing {what}")
        labels[head] = _label_ids(sample, head, files[head], what)
        _check_size(sample.id, rgb, labels[head], what, files[head])
        bad = np.unique(labels[head][(labels[head] >= num_classes) & (labels[head] != IGNORE_LABEL)])
        if bad.size:
            outside = f"outside the {num_classes} classes and {IGNORE_LABEL}"
            raise BadSample(sample.id, f"{what} labels {bad.tolist()[:5]} {outside} ({files[head]})")
    arrays = {"rgb": rgb}
    if "depth" in modalities or ("hha" in modalities and sample.hha is None):
        if sample.depth is None:
            raise BadSample(sample.id, "missing depth")
        depth = _read_depth(sample.id, sample.depth)
        _check_size(sample.id, rgb, depth, "depth", sample.depth)
        if "depth" in modalities:
            arrays["depth"] = depth
    if "hha" in modalities:
        if sample.hha is None:
            from fcn.depth import hha  # only NYUDv2 needs it

            arrays["hha"] = hha(depth)
        else:
            arrays["hha"] = _read_hha(sample.id, sample.hha)
            _check_size(sample.id, rgb, arrays["hha"], "hha", sample.hha)
    return Example(arrays, labels)


def _check_size(sample_id: str, rgb: np.ndarray, other: np.ndarray, what: str, uri: str) -> None:
    """Raise BadSample unless ``other`` has the image's height and width (reported as PIL's (w, h))."""
    if other.shape[:2] != rgb.shape[:2]:
        image_size, other_size = ((a.shape[1], a.shape[0]) for a in (rgb, other))
        raise BadSample(sample_id, f"image size {image_size} differs from {what} size {other_size} ({uri})")


def _read_bytes(sample_id: str, uri: str, what: str) -> bytes:
    try:
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BadSample(sample_id, f"missing {what} {uri}") from None
    except (OSError, ValueError) as exc:
        raise BadSample(sample_id, f"unreadable {what} {uri}: {exc}") from None


def _read_image(sample_id: str, uri: str, what: str) -> Image.Image:
    data = _read_bytes(sample_id, uri, what)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadSample(sample_id, f"unreadable {what} {uri}: {exc}") from None
    return image


def _read_depth(sample_id: str, uri: str) -> np.ndarray:
    """A 16-bit PNG of millimetres as float32 metres."""
    try:
        return depth_from_image(_read_image(sample_id, uri, "depth"))
    except DecodeError as error:
        raise BadSample(sample_id, f"{error} ({uri})") from None


def _read_hha(sample_id: str, uri: str) -> np.ndarray:
    image = _read_image(sample_id, uri, "hha")
    if image.mode != "RGB":
        raise BadSample(sample_id, f"hha {uri} has mode {image.mode!r}, not an 8-bit RGB PNG")
    return np.array(image, np.uint8)


def _label_ids(sample: Sample, head: str, uri: str, what: str) -> np.ndarray:
    """One head's label ids as uint8 (255 = void): a PNG mask's values, or a .mat variable's shifted
    as the reference data layers shift them (k -> k - 1, void 0 -> 255)."""
    mat = _LAYOUTS[sample.layout].mat_labels.get(head)
    if mat is None:
        return _mask_labels(sample.id, _read_image(sample.id, uri, what))
    variable, also_void = mat
    raw = _read_mat(sample.id, uri, what, variable)
    if also_void is not None:
        raw[raw == also_void] = 0
    bad = raw[(raw < 0) | (raw > IGNORE_LABEL)]
    if bad.size:
        values = np.unique(bad).tolist()[:5]
        raise BadSample(sample.id, f"{what} {uri} holds {values}, neither void 0 nor a class 1-{IGNORE_LABEL}")
    return np.where(raw == 0, IGNORE_LABEL, raw - 1).astype(np.uint8)


def _read_mat(sample_id: str, uri: str, what: str, variable: str) -> np.ndarray:
    """The 2-D map of integers stored as ``variable`` in a MATLAB file, as int64."""
    data = _read_bytes(sample_id, uri, what)
    try:
        contents = scipy.io.loadmat(io.BytesIO(data), variable_names=[variable])
    except Exception as exc:
        raise BadSample(sample_id, f"unreadable {what} {uri}: {exc}") from None
    if variable not in contents:
        raise BadSample(sample_id, f"{what} {uri} has no variable {variable!r}")
    value = np.asarray(contents[variable])
    if value.ndim != 2 or value.dtype.kind not in "iuf" or not np.array_equal(value, np.round(value)):
        shape = "x".join(map(str, value.shape))
        raise BadSample(sample_id, f"{what} {uri}: {variable!r} is {shape} {value.dtype}, not a 2-D map of integers")
    return value.astype(np.int64)


_PALETTE_LOOKUP = {tuple(voc_palette()[3 * i : 3 * i + 3]): i for i in range(256)}


def _mask_labels(sample_id: str, mask: Image.Image) -> np.ndarray:
    """Class indices of a mask: palette/grey PNGs hold them directly; RGB masks use the VOC colours."""
    if mask.mode in ("P", "L"):
        return np.array(mask, dtype=np.uint8)
    if mask.mode == "RGB":
        rgb = np.asarray(mask)
        colours, inverse = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
        indices = [_PALETTE_LOOKUP.get(tuple(int(v) for v in c)) for c in colours]
        if any(i is None for i in indices):
            unknown = next(tuple(c) for c, i in zip(colours.tolist(), indices) if i is None)
            raise BadSample(sample_id, f"mask colour {unknown} is not in the VOC palette")
        return np.asarray(indices, np.uint8)[inverse.reshape(-1)].reshape(rgb.shape[:2])
    raise BadSample(sample_id, f"mask mode {mask.mode!r} is not a label image (expected P, L or RGB)")
