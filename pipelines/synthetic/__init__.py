"""Deterministic synthetic scenes in the PASCAL VOC, NYUDv2 and SIFT Flow layouts, for demos, tests and benches.

Each scene has a textured background and a few objects of five classes: filled discs, striped boxes,
checkered triangles and two thin structures (rings and wires a few pixels wide), so that the
difference between coarse (FCN-32s) and fine (FCN-8s) predictions shows on boundaries. Image sizes
vary. The same ``seed`` always gives the same files. The VOC layout::

    <uri>/JPEGImages/<id>.jpg
    <uri>/SegmentationClass/<id>.png          palette PNG, 0 = background, 255 = ignore
    <uri>/ImageSets/Segmentation/{train,val,trainval}.txt
    <uri>/class_names.txt                      one class name per line

The NYUDv2 and SIFT Flow layouts (as :mod:`pipelines.train.datasets` reads them) split the background at a
random horizon row: a wall above a floor (NYUDv2), sky above a field (SIFT Flow), and give the objects
classes of those datasets (``NYUD_SCENE_CLASSES``, ``SIFTFLOW_SCENE_CLASSES``). NYUDv2 scenes get a
depth map (a level view of a room: the wall at one distance, the floor receding to it, each object a
flat cut-out nearer than what it covers) and no HHA files; SIFT Flow scenes get geometric labels (sky,
horizontal ground, vertical objects). Labels are written as the datasets write them: ``.mat`` files,
classes from 1, 0 void (and -1 void in SIFT Flow's geometric labels)::

    python -m pipelines.synthetic OUT_URI --num-images 200 --seed 0 [--layout voc|nyud|siftflow]
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable, Sequence

import fsspec
import numpy as np
import scipy.io
from PIL import Image

from fcn.classes import NYUD40_CLASSES, SIFTFLOW_CLASSES, SIFTFLOW_GEOMETRIC_CLASSES, voc_palette
from pipelines.common.decode import DEPTH_PNG_UNITS_PER_M
from pipelines.segment.masks import encode_mask
from pipelines.train.datasets import CLASS_NAMES_FILE, IGNORE_LABEL, SIFTFLOW_SET

SYNTHETIC_CLASSES: tuple[str, ...] = ("background", "disc", "box", "triangle", "ring", "wire")
# The dataset classes of a horizon scene's labels: above the horizon, the five objects, below it.
NYUD_SCENE_CLASSES: tuple[str, ...] = ("wall", "lamp", "cabinet", "chair", "picture", "otherprop", "floor")
SIFTFLOW_SCENE_CLASSES: tuple[str, ...] = ("sky", "sun", "building", "mountain", "sign", "pole", "field")
SIFTFLOW_SCENE_GEOMETRY: tuple[str, ...] = ("sky", "sky", "vertical", "vertical", "vertical", "vertical", "horizontal")
BELOW_HORIZON = len(SYNTHETIC_CLASSES)  # the label of the background below the horizon
MAT_HEADER_TEXT = b"MATLAB 5.0 MAT-file, written by pipelines.synthetic".ljust(116)  # the v5 header's text field

Shape = tuple[np.ndarray, np.ndarray]  # (membership mask HxW bool, texture HxWx3 float)


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
        image, label, horizon = _horizon_scene(rng, min_size, max_size, max_objects, ignore_band, (125, 95, 65))
        depth_mm = np.round(_room_depth(rng, label, horizon) * DEPTH_PNG_UNITS_PER_M).astype(np.uint16)
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
        image, label, _ = _horizon_scene(rng, min_size, max_size, max_objects, ignore_band, (80, 130, 55))
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


def _horizon_scene(
    rng: np.random.Generator,
    min_size: int,
    max_size: int,
    max_objects: int,
    ignore_band: int,
    ground_colour: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`render_scene` with its background split at a random horizon row: (RGB, labels, horizon row).

    Background below the horizon is blended towards ``ground_colour`` and labelled ``BELOW_HORIZON``.
    """
    image, label = render_scene(rng, min_size, max_size, max_objects, ignore_band)
    height = label.shape[0]
    horizon = int(rng.integers(height * 3 // 10, height * 6 // 10 + 1))
    ground = np.zeros(label.shape, bool)
    ground[horizon:] = (label[horizon:] == 0) | (label[horizon:] == IGNORE_LABEL)
    blended = 0.55 * image[ground] + 0.45 * np.asarray(ground_colour, np.float32)
    image[ground] = np.clip(blended, 0, 255).astype(np.uint8)
    label[ground & (label == 0)] = BELOW_HORIZON
    return image, label, horizon


def _room_depth(rng: np.random.Generator, label: np.ndarray, horizon: int) -> np.ndarray:
    """Depth in metres (float32 HxW) of a room seen level: a wall 2.5-5 m away above ``horizon``, a floor
    below it receding to the wall, and each object class a flat cut-out 10-50 % nearer than the nearest
    point it covers."""
    height, width = label.shape
    wall = rng.uniform(2.5, 5.0)
    rows = np.arange(height, dtype=np.float64)
    vanishing = horizon - 0.5 * (height - horizon)  # floor depth falls as 1 / (row - vanishing row)
    per_row = np.where(rows < horizon, wall, wall * (horizon - vanishing) / np.maximum(rows - vanishing, 1.0))
    depth = np.repeat(per_row[:, None], width, axis=1)
    for cls in range(1, BELOW_HORIZON):
        region = label == cls
        if region.any():
            depth[region] = depth[region].min() * rng.uniform(0.5, 0.9)
    return depth.astype(np.float32)


def render_scene(
    rng: np.random.Generator, min_size: int, max_size: int, max_objects: int, ignore_band: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene: (RGB uint8 HxWx3, labels uint8 HxW)."""
    height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _background(rng, yy, xx)
    label = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(2, max_objects + 1))):
        cls = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        inside, texture = _SHAPES[cls](rng, yy, xx)
        image[inside] = texture[inside]
        label[inside] = cls
    image += rng.normal(0.0, 6.0, image.shape).astype(np.float32)
    if ignore_band > 0:
        label[(label == 0) & _near_object(label, ignore_band)] = IGNORE_LABEL
    return np.clip(image, 0, 255).astype(np.uint8), label


def _near_object(label: np.ndarray, band: int) -> np.ndarray:
    """Pixels within ``band`` (Chebyshev distance) of a non-background pixel."""
    objects = label > 0
    padded = np.pad(objects, band)
    near = np.zeros_like(objects)
    height, width = objects.shape
    for dy in range(2 * band + 1):
        for dx in range(2 * band + 1):
            near |= padded[dy : dy + height, dx : dx + width]
    return near


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Low-saturation background: a base colour, a linear gradient and smooth blotches."""
    height, width = yy.shape
    gray = rng.uniform(50, 200)
    base = gray + rng.uniform(-18, 18, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)[..., None] * rng.uniform(-50, 50)
    coarse = rng.normal(0, 18, size=(4, 4, 1)).astype(np.float32)
    blotches = np.asarray(
        Image.fromarray(coarse[..., 0]).resize((width, height), Image.Resampling.BICUBIC), np.float32
    )[..., None]
    return (base[None, None, :] + ramp + blotches).astype(np.float32)


def _colour(rng: np.random.Generator, centre: Sequence[float], jitter: float = 30.0) -> np.ndarray:
    return np.clip(np.asarray(centre, np.float32) + rng.uniform(-jitter, jitter, 3), 0, 255)


def _frame(rng: np.random.Generator, yy: np.ndarray) -> tuple[float, float, float, float]:
    """Random centre, rotation and size relative to the image."""
    height, width = yy.shape
    cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
    return cy, cx, rng.uniform(0, np.pi), min(height, width)


def _rotated(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, angle: float) -> Shape:
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    return u, v


def _disc(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Shape:
    cy, cx, angle, size = _frame(rng, yy)
    a, b = rng.uniform(0.08, 0.22, size=2) * size
    u, v = _rotated(yy, xx, cy, cx, angle)
    inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    colour = _colour(rng, (210, 60, 50))
    shade = 1.0 - 0.25 * np.clip((u / a) ** 2 + (v / b) ** 2, 0, 1)[..., None]
    return inside, colour * shade


def _box(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Shape:
    cy, cx, angle, size = _frame(rng, yy)
    a, b = rng.uniform(0.08, 0.25, size=2) * size
    u, v = _rotated(yy, xx, cy, cx, angle)
    inside = (np.abs(u) <= a) & (np.abs(v) <= b)
    period = rng.uniform(3.0, 7.0)
    stripes = (np.sin(2 * np.pi * u / period) > 0)[..., None]
    return inside, np.where(stripes, _colour(rng, (50, 80, 210)), _colour(rng, (150, 170, 240), 15))


def _triangle(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Shape:
    cy, cx, angle, size = _frame(rng, yy)
    radius = rng.uniform(0.12, 0.3) * size
    corners = [
        (cy + radius * np.sin(angle + k * 2 * np.pi / 3), cx + radius * np.cos(angle + k * 2 * np.pi / 3))
        for k in range(3)
    ]
    signs = []
    for (y0, x0), (y1, x1) in zip(corners, corners[1:] + corners[:1]):
        signs.append((x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0)
    inside = (signs[0] == signs[1]) & (signs[1] == signs[2])
    cell = rng.uniform(3.0, 6.0)
    checker = ((np.floor(yy / cell) + np.floor(xx / cell)) % 2 == 0)[..., None]
    return inside, np.where(checker, _colour(rng, (40, 170, 50)), _colour(rng, (20, 90, 30), 15))


def _ring(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Shape:
    cy, cx, _, size = _frame(rng, yy)
    radius = rng.uniform(0.1, 0.3) * size
    thickness = rng.uniform(1.5, 4.0)
    inside = np.abs(np.hypot(yy - cy, xx - cx) - radius) <= thickness / 2
    colour = _colour(rng, (235, 210, 40))
    return inside, np.broadcast_to(colour, (*yy.shape, 3))


def _wire(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Shape:
    """A polyline of 2-3 segments, 1-3 pixels wide."""
    height, width = yy.shape
    points = np.stack([rng.uniform(0, height, 4), rng.uniform(0, width, 4)], axis=1)
    half_width = rng.uniform(0.6, 1.5)
    inside = np.zeros(yy.shape, bool)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
        inside |= np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx)) <= half_width
    colour = _colour(rng, (40, 230, 230))
    return inside, np.broadcast_to(colour, (*yy.shape, 3))


_SHAPES: dict[int, Callable[[np.random.Generator, np.ndarray, np.ndarray], Shape]] = {
    1: _disc,
    2: _box,
    3: _triangle,
    4: _ring,
    5: _wire,
}


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


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m pipelines.synthetic OUT_URI [--layout L] [--num-images N] [--seed S] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.synthetic",
        description="Write deterministic synthetic scenes in the VOC, NYUDv2 or SIFT Flow layout.",
    )
    parser.add_argument("uri", help="output directory (any fsspec URI, e.g. s3://bucket/synthetic)")
    parser.add_argument("--layout", choices=tuple(WRITERS), default="voc")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--max-size", type=int, default=96)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--ignore-band", type=int, default=0, help="width of the 255 band around objects")
    args = parser.parse_args(argv)
    try:
        ids = WRITERS[args.layout](
            args.uri,
            num_images=args.num_images,
            seed=args.seed,
            min_size=args.min_size,
            max_size=args.max_size,
            max_objects=args.max_objects,
            val_fraction=args.val_fraction,
            ignore_band=args.ignore_band,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {len(ids)} {args.layout} scenes to {args.uri}")
    return 0
