"""Encode label maps as indexed PNG masks (with a palette) and colour overlays for people."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

OVERLAY_ALPHA = 0.5
OVERLAY_QUALITY = 85
MASK_COMPRESS_LEVEL = 1  # zlib level: 2.3x faster than the default 6 on 500x500 masks, ~40% larger files
OVERLAY_BAND_PIXELS = 1 << 18
"""Pixels of an overlay blended at a time: float temporaries of a band of rows, not of the whole image."""


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
    (class 0) pixels are left as they are, so the image stays readable. Blended ``OVERLAY_BAND_PIXELS`` at a time."""
    colours = np.zeros((256, 3), np.uint8)
    table = np.asarray(palette[:768], np.uint8).reshape(-1, 3)
    colours[: len(table)] = table
    blended = np.empty(rgb.shape, np.uint8)
    rows = max(1, OVERLAY_BAND_PIXELS // max(1, rgb.shape[1]))
    for top in range(0, len(rgb), rows):
        band = slice(top, top + rows)
        clipped = np.minimum(labels[band], 255)
        alpha = np.where(clipped == 0, 0.0, OVERLAY_ALPHA).astype(np.float32)[..., None]
        blended[band] = rgb[band].astype(np.float32) * (1 - alpha) + colours[clipped] * alpha
    return encode_jpeg(blended)


def encode_jpeg(rgb: np.ndarray) -> bytes:
    """JPEG bytes of an ``HxWx3`` uint8 image, at the overlays' quality."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=OVERLAY_QUALITY)
    return buffer.getvalue()
