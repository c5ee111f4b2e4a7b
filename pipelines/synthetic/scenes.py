"""The scenes that :mod:`pipelines.synthetic` describes: :func:`render_scene` (a textured background, two to
``max_objects`` objects of the five ``SYNTHETIC_CLASSES`` shapes, noise, an optional 255 band),
:func:`horizon_scene` (the background split at a random horizon row, for the NYUDv2 and SIFT Flow layouts)
and :func:`room_depth` (an indoor scene's depth). The same random generator state gives the same scene.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from pipelines.train.datasets import IGNORE_LABEL

SYNTHETIC_CLASSES: tuple[str, ...] = ("background", "disc", "box", "triangle", "ring", "wire")
BELOW_HORIZON = len(SYNTHETIC_CLASSES)  # the label of the background below the horizon

Shape = tuple[np.ndarray, np.ndarray]  # (membership mask HxW bool, texture HxWx3 float)


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


def horizon_scene(
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


def room_depth(rng: np.random.Generator, label: np.ndarray, horizon: int) -> np.ndarray:
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
