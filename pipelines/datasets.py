"""Labelled segmentation datasets on any fsspec URI, and per-sample loading that reports bad samples.

Two layouts are recognised under a root URI:

- PASCAL VOC: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette or grey PNG with class
  indices, 255 = ignore), ``ImageSets/Segmentation/{train,val}.txt``.
- pairs: ``images/<key>.<jpg|jpeg|png|...>`` and ``masks/<key>.png`` (keys may contain folders),
  optional ``train.txt`` / ``val.txt`` listing keys; without them every 10th key (by a hash of the key,
  so adding files does not reshuffle the split) is validation.

Class names come from an explicit file, else ``<root>/class_names.txt``, else the 21 VOC classes.
A bad sample (missing mask, unreadable file, image/mask size mismatch, labels outside the classes and
255) raises :class:`BadSample` from :func:`load_sample`; the training loop skips and counts it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image

from fcn.classes import VOC_CLASSES, voc_palette
from fcn.image import to_rgb_array

IGNORE_LABEL = 255
CLASS_NAMES_FILE = "class_names.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PAIRS_VAL_EVERY = 10


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
    """One image and its mask, as full fsspec URIs (``mask`` is None when no mask file exists)."""

    id: str
    image: str
    mask: str | None


@dataclass(frozen=True)
class SegmentationData:
    """The samples of a labelled dataset and its class names."""

    root: str
    layout: str
    class_names: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def open_dataset(uri: str, *, classes: str | None = None) -> SegmentationData:
    """Index the dataset at ``uri`` (VOC or pairs layout; see the module docstring).

    Raises ValueError naming the problem when no known layout is found or a split is empty.
    """
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    if fs.isdir(f"{root}/JPEGImages") and fs.isdir(f"{root}/ImageSets/Segmentation"):
        layout, train, val = "voc", *_voc_splits(fs, root)
    elif fs.isdir(f"{root}/images"):
        layout, train, val = "pairs", *_pairs_splits(fs, root)
    else:
        raise ValueError(
            f"data {uri!r}: found neither the VOC layout (JPEGImages/, ImageSets/Segmentation/) "
            "nor the pairs layout (images/, masks/)"
        )
    if not train:
        raise ValueError(f"data {uri!r}: the train split is empty")
    if not val:
        raise ValueError(f"data {uri!r}: the val split is empty")
    return SegmentationData(uri, layout, read_class_names(uri, classes), tuple(train), tuple(val))


def read_class_names(uri: str, classes: str | None = None) -> tuple[str, ...]:
    """Class names from ``classes`` (a file URI, one name per line), else ``<uri>/class_names.txt``,
    else the VOC classes."""
    fs, root = fsspec.core.url_to_fs(uri)
    if classes is None:
        candidate = f"{root.rstrip('/')}/{CLASS_NAMES_FILE}"
        if not fs.isfile(candidate):
            return VOC_CLASSES
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


def _voc_splits(fs: fsspec.AbstractFileSystem, root: str) -> tuple[list[Sample], list[Sample]]:
    masks = {p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/SegmentationClass/*.png")}
    splits = []
    for name in ("train", "val"):
        listing = f"{root}/ImageSets/Segmentation/{name}.txt"
        if not fs.isfile(listing):
            raise ValueError(f"VOC data {fs.unstrip_protocol(root)!r}: missing {listing.rsplit('/', 3)[-3:]}")
        with fs.open(listing, "r") as f:
            ids = [line.split()[0] for line in f.read().splitlines() if line.strip()]
        splits.append(
            [
                Sample(
                    id=i,
                    image=fs.unstrip_protocol(f"{root}/JPEGImages/{i}.jpg"),
                    mask=fs.unstrip_protocol(f"{root}/SegmentationClass/{i}.png") if f"{i}.png" in masks else None,
                )
                for i in ids
            ]
        )
    return splits[0], splits[1]


def _pairs_splits(fs: fsspec.AbstractFileSystem, root: str) -> tuple[list[Sample], list[Sample]]:
    images = {}
    for path in fs.find(f"{root}/images"):
        stem, dot, suffix = path[len(root) + len("/images/") :].rpartition(".")
        if dot and f".{suffix.lower()}" in IMAGE_SUFFIXES:
            images[stem] = fs.unstrip_protocol(path)
    masks = set()
    if fs.isdir(f"{root}/masks"):
        masks = {p[len(root) + len("/masks/") : -len(".png")] for p in fs.find(f"{root}/masks") if p.endswith(".png")}
    samples = {
        key: Sample(key, uri, fs.unstrip_protocol(f"{root}/masks/{key}.png") if key in masks else None)
        for key, uri in sorted(images.items())
    }
    listed = [f"{root}/{name}.txt" for name in ("train", "val")]
    if all(fs.isfile(p) for p in listed):
        splits = []
        for listing in listed:
            with fs.open(listing, "r") as f:
                keys = [line.strip() for line in f.read().splitlines() if line.strip()]
            splits.append([samples.get(k) or Sample(k, fs.unstrip_protocol(f"{root}/images/{k}"), None) for k in keys])
        return splits[0], splits[1]
    val_keys = {k for k in samples if int(hashlib.sha1(k.encode()).hexdigest(), 16) % PAIRS_VAL_EVERY == 0}
    train = [s for k, s in samples.items() if k not in val_keys]
    val = [s for k, s in samples.items() if k in val_keys]
    return train, val


def load_sample(sample: Sample, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one sample: (RGB uint8 HxWx3, labels uint8 HxW with values < num_classes or 255).

    Raises BadSample naming the problem; never any other exception for bad files.
    """
    if sample.mask is None:
        raise BadSample(sample.id, "missing mask")
    image = _read_image(sample.id, sample.image, "image")
    mask = _read_image(sample.id, sample.mask, "mask")
    if image.size != mask.size:
        raise BadSample(sample.id, f"image size {image.size} differs from mask size {mask.size}")
    try:
        rgb = to_rgb_array(image)
    except (ValueError, OSError) as exc:
        raise BadSample(sample.id, f"unreadable image: {exc}") from None
    labels = _mask_labels(sample.id, mask)
    bad = np.unique(labels[(labels >= num_classes) & (labels != IGNORE_LABEL)])
    if bad.size:
        raise BadSample(sample.id, f"labels {bad.tolist()[:5]} outside the {num_classes} classes and {IGNORE_LABEL}")
    return np.require(rgb, requirements="W"), labels  # writable: torch.from_numpy needs no copy or warning


def _read_image(sample_id: str, uri: str, what: str) -> Image.Image:
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
        image = Image.open(io.BytesIO(data))
        image.load()
    except FileNotFoundError:
        raise BadSample(sample_id, f"missing {what} {uri}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadSample(sample_id, f"unreadable {what}: {exc}") from None
    return image


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
