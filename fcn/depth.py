"""Depth encodings for the FCN paper's NYUDv2 RGB-D nets: centred log depth and HHA.

HHA (Gupta, Girshick, Arbeláez and Malik, "Learning Rich Features from RGB-D Images for Object
Detection and Segmentation", ECCV 2014) turns a depth map into three channels that a net pretrained
on colour images can read like an image: horizontal disparity, height above the ground, and the
angle between each pixel's surface normal and gravity. Gravity is not measured but estimated from
the normals themselves, as the direction most floors and table tops face and most walls are
orthogonal to. The FCN paper's RGB-HHA net (its Table 4) reads HHA images made by Gupta's MATLAB code
(``saveHHA.m`` and ``processDepthImage.m`` in s-gupta/rcnn-depth); this module follows that code,
in numpy, and says where it departs from it.

Conventions: depth is z-depth in metres (0 or non-finite where the sensor gave nothing); camera
coordinates are x right, y down, z forward, with pixel centres at 0-based integer indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["Camera", "NYUD_KINECT", "NYUD_MEAN_LOG_DEPTH_MM", "log_depth", "hha_channels", "hha"]


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics in pixels: focal lengths ``fx, fy`` and principal point ``cx, cy``."""

    fx: float
    fy: float
    cx: float
    cy: float

    def __post_init__(self) -> None:
        for field in fields(self):
            if not math.isfinite(getattr(self, field.name)):
                raise ValueError(f"camera {field.name} must be a finite number, got {getattr(self, field.name)}")
        if self.fx <= 0 or self.fy <= 0:
            raise ValueError(f"camera focal lengths must be positive, got fx={self.fx}, fy={self.fy}")

    @classmethod
    def parse(cls, text: str) -> Camera:
        """Read the command-line form ``"fx,fy,cx,cy"``."""
        parts = text.split(",")
        names = [field.name for field in fields(cls)]
        if len(parts) != len(names):
            raise ValueError(f"camera must be 4 comma-separated numbers fx,fy,cx,cy, got {len(parts)} in {text!r}")
        values = []
        for name, part in zip(names, parts):
            try:
                values.append(float(part))
            except ValueError:
                raise ValueError(f"camera {name} is not a number: {part.strip()!r} in {text!r}") from None
        return cls(*values)


#: NYUDv2 Kinect colour camera (640x480), as in Gupta et al.'s code and the NYU toolbox.
NYUD_KINECT = Camera(fx=518.857901, fy=519.469611, cx=325.582449, cy=253.736166)

#: Mean of log(depth in mm) over NYUDv2, subtracted by the reference FCN data layer (``mean_logd``).
NYUD_MEAN_LOG_DEPTH_MM = 7.844

# saveHHA: disparity channel = 31000 / depth in cm, i.e. 310 / depth in metres.
DISPARITY_GAIN = 310.0
# saveHHA: height channel in centimetres.
HEIGHT_GAIN = 100.0
# saveHHA: angle channel = angle + 128 - 90, so that a vertical surface (90 degrees) reads 128.
ANGLE_OFFSET_DEG = 128.0 - 90.0

# processDepthImage: normals for the angle from 7x7 windows, for gravity from 21x21 windows.
NORMAL_RADIUS = 3
GRAVITY_NORMAL_RADIUS = 10
# getYDir: re-estimate gravity 5 times with a 45-degree tolerance, then 5 times with 15 degrees.
GRAVITY_TOLERANCES_DEG = (45.0, 15.0)
GRAVITY_ITERATIONS = 5
# The first guess: the camera is held level, so image-up (-y) is world-up.
CAMERA_UP = np.array([0.0, -1.0, 0.0])
# processDepthImage: if the lowest point is less than 90 cm below the camera, the floor is not in
# view and is assumed 130 cm below the camera.
MIN_FLOOR_DROP_M = 0.9
ASSUMED_FLOOR_DROP_M = 1.3


def log_depth(depth_m: np.ndarray) -> np.ndarray:
    """Depth input of the early-fusion RGB-D FCN: ``log(depth in mm) - NYUD_MEAN_LOG_DEPTH_MM``.

    This is the reference ``NYUDSegDataLayer.load_depth`` (``log`` of the millimetre depth PNG minus
    the fixed dataset mean 7.844, not a per-image mean), so a pixel 2.55 m away reads about 0 and
    ratios of depth become differences. Missing pixels, where the reference would give ``-inf``, get
    0: the dataset-mean depth. Returns float32 HxW.
    """
    depth, valid = _validated_depth(depth_m)
    encoded = np.zeros(depth.shape, dtype=np.float32)
    encoded[valid] = np.log(depth[valid] * 1000.0) - NYUD_MEAN_LOG_DEPTH_MM
    return encoded


def hha_channels(depth_m: np.ndarray, camera: Camera = NYUD_KINECT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unscaled HHA quantities ``(disparity, height_m, angle_deg)``, float64 HxW each.

    - disparity: ``1 / depth`` in 1/m.
    - height_m: height above the floor along the estimated gravity, in metres. The floor is the
      lowest valid point, unless that is less than 0.9 m below the camera, in which case the floor
      is taken 1.3 m below the camera (as the reference does).
    - angle_deg: angle between the surface normal (facing the camera) and the estimated up
      direction: 0 for floors, 90 for walls, 180 for ceilings.

    Normals come from plane fits (local PCA) over 7x7 windows of valid points; gravity from 21x21
    windows, re-estimated as the reference ``getYDir`` does (see ``_estimate_up``). All three are NaN
    where depth is missing; the angle is also NaN where fewer than 3 valid points surround a pixel.
    """
    depth, valid = _validated_depth(depth_m)
    if not valid.any():
        missing = np.full(depth.shape, np.nan)
        return missing, missing.copy(), missing.copy()
    points = _point_cloud(depth, camera)
    up = _estimate_up(_normals(points, valid, GRAVITY_NORMAL_RADIUS)[valid])
    elevation = points @ up
    lowest = elevation[valid].min()
    floor = lowest if lowest <= -MIN_FLOOR_DROP_M else -ASSUMED_FLOOR_DROP_M
    cosine = np.clip(_normals(points, valid, NORMAL_RADIUS) @ up, -1.0, 1.0)
    return 1.0 / depth, elevation - floor, np.degrees(np.arccos(cosine))


def hha(depth_m: np.ndarray, camera: Camera = NYUD_KINECT) -> np.ndarray:
    """HHA image of a depth map (metres), HxWx3 uint8 in the reference ``saveHHA`` channel order.

    With ``(disparity, height_m, angle_deg)`` from ``hha_channels``, each channel is rounded half up
    and saturated to 0-255 (as MATLAB's ``uint8``):

    - channel 0 = ``310 * disparity`` (the reference's ``31000 / depth_cm``; its 100 cm floor on
      depth changes nothing once saturated),
    - channel 1 = ``100 * height_m`` (height in centimetres),
    - channel 2 = ``angle_deg + 38`` (the reference's ``angle + 128 - 90``).

    Pixels with missing depth, or without a normal, are 0 in every channel (the reference fills
    depth before encoding it instead).
    """
    disparity, height_m, angle_deg = hha_channels(depth_m, camera)
    scaled = np.stack([DISPARITY_GAIN * disparity, HEIGHT_GAIN * height_m, angle_deg + ANGLE_OFFSET_DEG], axis=-1)
    scaled[~np.isfinite(scaled).all(axis=-1)] = 0.0
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def _validated_depth(depth_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth as float64 with NaN where missing (0 or non-finite), and the mask of valid pixels."""
    depth = np.asarray(depth_m, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"depth must be a 2-D HxW array of metres, got shape {depth.shape}")
    if np.any(depth < 0):
        raise ValueError(f"depth must not be negative (0 marks missing depth), got minimum {np.nanmin(depth)}")
    valid = np.isfinite(depth) & (depth > 0)
    return np.where(valid, depth, np.nan), valid


def _point_cloud(depth: np.ndarray, camera: Camera) -> np.ndarray:
    """HxWx3 camera-frame points (metres) of each pixel's depth."""
    rows, cols = np.indices(depth.shape, dtype=np.float64)
    x = (cols - camera.cx) * depth / camera.fx
    y = (rows - camera.cy) * depth / camera.fy
    return np.stack([x, y, depth], axis=-1)


def _normals(points: np.ndarray, valid: np.ndarray, radius: int) -> np.ndarray:
    """HxWx3 unit normals facing the camera, from a plane fit to the valid points in each window.

    The fit is local PCA: the normal is the least-variance direction of the window's points, whose
    first and second moments come from box sums of an integral image. NaN where the centre pixel is
    missing or the window holds fewer than 3 valid points.
    """
    # Centring on the scene's mean point keeps the second moments' cancellation harmless.
    centred = np.where(valid[..., None], points - points[valid].mean(axis=0), 0.0)
    x, y, z = np.moveaxis(centred, -1, 0)
    moments = np.stack([valid.astype(np.float64), x, y, z, x * x, x * y, x * z, y * y, y * z, z * z], axis=-1)
    sums = _window_sums(moments, radius)
    fitted = valid & (sums[..., 0] >= 3)
    count = sums[fitted][:, :1]
    mean = sums[fitted][:, 1:4] / count
    second = sums[fitted][:, [4, 5, 6, 5, 7, 8, 6, 8, 9]].reshape(-1, 3, 3) / count[..., None]
    _, eigenvectors = np.linalg.eigh(second - mean[:, :, None] * mean[:, None, :])
    normal = eigenvectors[:, :, 0]
    normal[np.sum(normal * points[fitted], axis=-1) > 0] *= -1.0
    normals = np.full(points.shape, np.nan)
    normals[fitted] = normal
    return normals


def _window_sums(values: np.ndarray, radius: int) -> np.ndarray:
    """Sums of HxWxK ``values`` over the (2*radius+1)^2 window around each pixel, clipped at the border."""
    height, width = values.shape[:2]
    integral = np.zeros((height + 1, width + 1, values.shape[2]))
    integral[1:, 1:] = values.cumsum(axis=0).cumsum(axis=1)
    top = np.clip(np.arange(height) - radius, 0, height)
    bottom = np.clip(np.arange(height) + radius + 1, 0, height)
    left = np.clip(np.arange(width) - radius, 0, width)
    right = np.clip(np.arange(width) + radius + 1, 0, width)
    return (
        integral[np.ix_(bottom, right)]
        - integral[np.ix_(top, right)]
        - integral[np.ix_(bottom, left)]
        + integral[np.ix_(top, left)]
    )


def _estimate_up(normals: np.ndarray) -> np.ndarray:
    """World-up in camera coordinates, from Nx3 normals (the reference ``getYDir``).

    Starting from ``CAMERA_UP``, normals within the tolerance of the current estimate count as
    horizontal surfaces and normals within the tolerance of orthogonal to it as vertical ones; the new
    estimate is the unit vector ``u`` minimising ``sum((u.vertical)^2) - sum((u.horizontal)^2)``, the
    smallest eigenvector of that scatter matrix. Unlike the reference, the current estimate also
    counts as one horizontal normal, which settles degenerate views (one wall, or no normals at all)
    towards it.
    """
    up = CAMERA_UP
    for tolerance in np.radians(GRAVITY_TOLERANCES_DEG):
        for _ in range(GRAVITY_ITERATIONS):
            alignment = np.abs(normals @ up)
            horizontal = normals[alignment > np.cos(tolerance)]
            vertical = normals[alignment < np.sin(tolerance)]
            scatter = vertical.T @ vertical - horizontal.T @ horizontal - np.outer(up, up)
            candidate = np.linalg.eigh(scatter)[1][:, 0]
            up = candidate if candidate @ up >= 0 else -candidate
    return up
