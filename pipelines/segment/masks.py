"""Encode label maps as indexed PNG masks (with a palette) and colour overlays for people."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

OVERLAY_ALPHA = 0.5
OVERLAY_QUALITY = 85
MASK_COMPRESS_LEVEL = 1  # zlib level: 2.3x faster than the default 6 on 500x500 masks, ~40% larger files


def encode_mask(labels: np.ndarray, palette: list[int]) -> bytes:
    """PNG bytes of an ``HxW`` label map: indexed (mode ``P``) with ``palette`` when every label fits
    in 8 bits, else 16-bit greyscale (label = pixel value)."""
    if labels.dtype == np.uint8 or int(labels.max(initial=0)) < 256:
        image = Image.fromarray(labels.astype(np.uint8, copy=False))  # mode L
        image.putpalette(palette)  # L + palette -> P
    else:
        image = Image.fromarray(labels.astype(np.uint16))  # mode I;16
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=MASK_COMPRESS_LEVEL)
    return buffer.getvalue()


def encode_overlay(rgb: np.ndarray, labels: np.ndarray, palette: list[int]) -> bytes:
    """JPEG bytes of ``rgb`` blended with the palette colour of each pixel's label; background
    (class 0) pixels are left as they are, so the image stays readable."""
    colours = np.zeros((256, 3), np.uint8)
    table = np.asarray(palette[:768], np.uint8).reshape(-1, 3)
    colours[: len(table)] = table
    clipped = np.minimum(labels, 255)
    alpha = np.where(clipped == 0, 0.0, OVERLAY_ALPHA).astype(np.float32)[..., None]
    blended = (rgb.astype(np.float32) * (1 - alpha) + colours[clipped] * alpha).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blended).save(buffer, format="JPEG", quality=OVERLAY_QUALITY)
    return buffer.getvalue()
