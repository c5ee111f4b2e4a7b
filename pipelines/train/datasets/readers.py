"""Reading a sample's files: images, depth, HHA, PNG masks and ``.mat`` labels, with every problem reported
as :class:`BadSample` naming the file; and the label statistics of many masks (:func:`scan_labels`).

``.mat`` labels are shifted as the reference data layers shift them: class k becomes label id k - 1 and
void becomes 255 (ignored).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import scipy.io
from PIL import Image

from fcn.classes import voc_palette
from fcn.image import to_rgb_array
from pipelines.common.decode import DecodeError, depth_from_image
from pipelines.train.datasets.base import (
    IGNORE_LABEL,
    SEMANTIC,
    BadSample,
    Example,
    LabelStats,
    Sample,
    SegmentationData,
)
from pipelines.train.datasets.registry import LAYOUT_SPECS

SCAN_THREADS = 16  # concurrent mask reads of scan_labels


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
    mat = LAYOUT_SPECS[sample.layout].mat_labels.get(head)
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
