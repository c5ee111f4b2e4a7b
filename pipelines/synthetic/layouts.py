"""Synthetic scenes (:mod:`pipelines.synthetic.scenes`) written in the PASCAL VOC, NYUDv2 and SIFT Flow
layouts, as :mod:`pipelines.train.datasets` reads them; :data:`WRITERS` by layout name."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import fsspec
import numpy as np
import scipy.io
from PIL import Image

from fcn.classes import NYUD40_CLASSES, SIFTFLOW_CLASSES, SIFTFLOW_GEOMETRIC_CLASSES, voc_palette
from pipelines.common.decode import DEPTH_PNG_UNITS_PER_M
from pipelines.segment.masks import encode_mask
from pipelines.synthetic.scenes import SYNTHETIC_CLASSES, horizon_scene, render_scene, room_depth
from pipelines.train.datasets import CLASS_NAMES_FILE, SIFTFLOW_SET

# The dataset classes of a horizon scene's labels: above the horizon, the five objects, below it.
NYUD_SCENE_CLASSES: tuple[str, ...] = ("wall", "lamp", "cabinet", "chair", "picture", "otherprop", "floor")
SIFTFLOW_SCENE_CLASSES: tuple[str, ...] = ("sky", "sun", "building", "mountain", "sign", "pole", "field")
SIFTFLOW_SCENE_GEOMETRY: tuple[str, ...] = ("sky", "sky", "vertical", "vertical", "vertical", "vertical", "horizontal")
MAT_HEADER_TEXT = b"MATLAB 5.0 MAT-file, written by pipelines.synthetic".ljust(116)  # the v5 header's text field


def write_synthetic_voc(
    uri: str,
    *,
    num_images: int,
    seed: int = 0,
    min_size: int = 64,
    max_size: int = 96,
    max_objects: int = 4,
    val_fraction: float = 0.25,
    ignore_band: int = 0,
    jpeg_quality: int = 92,
) -> list[str]:
    """Write ``num_images`` synthetic scenes in the VOC layout under ``uri``; return their ids.

    ``ignore_band`` > 0 marks background pixels within that many pixels of an object with 255
    (ignored in training and scoring), like the boundary band of the VOC annotations.
    """
    _check_args(num_images, min_size, max_size, max_objects, val_fraction, ignore_band)
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        fs.makedirs(f"{root}/{sub}", exist_ok=True)
    palette = voc_palette()
    ids = [f"scene_{i:05d}" for i in range(num_images)]
    for index, sample_id in enumerate(ids):
        rng = np.random.default_rng([seed, index])
        image, label = render_scene(rng, min_size, max_size, max_objects, ignore_band)
        fs.pipe_file(f"{root}/JPEGImages/{sample_id}.jpg", _encode(image, "JPEG", quality=jpeg_quality))
        fs.pipe_file(f"{root}/SegmentationClass/{sample_id}.png", encode_mask(label, palette))
    train, val = _split(ids, seed, val_fraction)
    for name, members in {"train": train, "val": val, "trainval": ids}.items():
        fs.pipe_file(f"{root}/ImageSets/Segmentation/{name}.txt", _lines(members))
    fs.pipe_file(f"{root}/{CLASS_NAMES_FILE}", _lines(SYNTHETIC_CLASSES))
    return ids


def write_synthetic_nyud(
    uri: str,
    *,
    num_images: int,
    seed: int = 0,
    min_size: int = 64,
    max_size: int = 96,
    max_objects: int = 4,
    val_fraction: float = 0.25,
    ignore_band: int = 0,
) -> list[str]:
    """Write ``num_images`` synthetic indoor scenes with depth in the NYUDv2 layout under ``uri``; return
    their ids (``ignore_band`` as in :func:`write_synthetic_voc`, written as void 0)."""
    _check_args(num_images, min_size, max_size, max_objects, val_fraction, ignore_band)
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    for sub in ("data/images", "data/depth", "segmentation"):
        fs.makedirs(f"{root}/{sub}", exist_ok=True)
    classes = _label_table(NYUD_SCENE_CLASSES, NYUD40_CLASSES, void=0)
    ids = [f"scene_{i:05d}" for i in range(num_images)]
    for index, sample_id in enumerate(ids):
        rng = np.random.default_rng([seed, index])
        image, label, horizon = horizon_scene(rng, min_size, max_size, max_objects, ignore_band, (125, 95, 65))
        depth_mm = np.round(room_depth(rng, label, horizon) * DEPTH_PNG_UNITS_PER_M).astype(np.uint16)
        fs.pipe_file(f"{root}/data/images/img_{sample_id}.png", _encode(image, "PNG"))
        fs.pipe_file(f"{root}/data/depth/img_{sample_id}.png", _encode(depth_mm, "PNG"))
        fs.pipe_file(f"{root}/segmentation/img_{sample_id}.mat", _mat(segmentation=classes[label].astype(np.uint8)))
    train, val = _split(ids, seed, val_fraction)
    for name, members in {"train": train, "val": val, "test": val}.items():
        fs.pipe_file(f"{root}/{name}.txt", _lines(members))
    return ids


def write_synthetic_siftflow(
    uri: str,
    *,
    num_images: int,
    seed: int = 0,
    min_size: int = 64,
    max_size: int = 96,
    max_objects: int = 4,
    val_fraction: float = 0.25,
    ignore_band: int = 0,
    jpeg_quality: int = 92,
) -> list[str]:
    """Write ``num_images`` synthetic outdoor scenes with semantic and geometric labels in the SIFT Flow
    layout under ``uri``; return their ids. The val scenes are listed in ``test.txt``, the train scenes
    in ``trainval.txt``; ``ignore_band`` is written as void (0 semantic, -1 geometric)."""
    _check_args(num_images, min_size, max_size, max_objects, val_fraction, ignore_band)
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    for sub in ("Images", "SemanticLabels", "GeoLabels"):
        fs.makedirs(f"{root}/{sub}/{SIFTFLOW_SET}", exist_ok=True)
    semantic = _label_table(SIFTFLOW_SCENE_CLASSES, SIFTFLOW_CLASSES, void=0)
    geometric = _label_table(SIFTFLOW_SCENE_GEOMETRY, SIFTFLOW_GEOMETRIC_CLASSES, void=-1)
    ids = [f"scene_{i:05d}" for i in range(num_images)]
    for index, sample_id in enumerate(ids):
        rng = np.random.default_rng([seed, index])
        image, label, _ = horizon_scene(rng, min_size, max_size, max_objects, ignore_band, (80, 130, 55))
        fs.pipe_file(f"{root}/Images/{SIFTFLOW_SET}/{sample_id}.jpg", _encode(image, "JPEG", quality=jpeg_quality))
        fs.pipe_file(f"{root}/SemanticLabels/{SIFTFLOW_SET}/{sample_id}.mat", _mat(S=semantic[label]))
        fs.pipe_file(f"{root}/GeoLabels/{SIFTFLOW_SET}/{sample_id}.mat", _mat(S=geometric[label]))
    train, val = _split(ids, seed, val_fraction)
    fs.pipe_file(f"{root}/trainval.txt", _lines(train))
    fs.pipe_file(f"{root}/test.txt", _lines(val))
    return ids


def _split(ids: list[str], seed: int, val_fraction: float) -> tuple[list[str], list[str]]:
    """A seeded (train, val) split of ``ids``, each sorted; val is at least one id unless there is only one."""
    order = np.random.default_rng([seed, len(ids), 1]).permutation(len(ids))
    num_val = max(1, round(len(ids) * val_fraction)) if len(ids) > 1 else 0
    return sorted(ids[i] for i in order[num_val:]), sorted(ids[i] for i in order[:num_val])


def _lines(items: Sequence[str]) -> bytes:
    return "".join(f"{item}\n" for item in items).encode()


def _encode(array: np.ndarray, image_format: str, **options: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=image_format, **options)
    return out.getvalue()


def _mat(**variables: np.ndarray) -> bytes:
    """A compressed MATLAB file, as MATLAB saves by default, with a fixed header text (savemat's has the time)."""
    out = io.BytesIO()
    scipy.io.savemat(out, variables, do_compression=True)
    return MAT_HEADER_TEXT + out.getvalue()[len(MAT_HEADER_TEXT) :]


def _label_table(scene_names: Sequence[str], classes: Sequence[str], void: int) -> np.ndarray:
    """A 256-entry lookup from horizon-scene labels to 1-based dataset classes; other labels (255) -> ``void``."""
    table = np.full(256, void, np.int16)
    table[: len(scene_names)] = [classes.index(name) + 1 for name in scene_names]
    return table


def _check_args(
    num_images: int, min_size: int, max_size: int, max_objects: int, val_fraction: float, ignore_band: int
) -> None:
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    if max_objects < 2:
        raise ValueError(f"max_objects must be >= 2, got {max_objects}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if ignore_band < 0:
        raise ValueError(f"ignore_band must be >= 0, got {ignore_band}")


WRITERS: dict[str, Callable[..., list[str]]] = {
    "voc": write_synthetic_voc,
    "nyud": write_synthetic_nyud,
    "siftflow": write_synthetic_siftflow,
}
