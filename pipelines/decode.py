"""Decode encoded image bytes into the displayed RGB pixels, with readable reasons for bad files."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fcn.image import to_rgb_array


class DecodeError(ValueError):
    """The bytes are not a decodable image (the message is the reason written to the stats row)."""


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Return the image in ``data`` as an ``HxWx3`` uint8 RGB array in its displayed orientation.

    The EXIF orientation is applied (so masks line up with what viewers show) and any PIL mode is
    converted by ``fcn.image.to_rgb_array``. Images whose header declares more than ``max_pixels``
    pixels are refused before any pixel is decoded (decompression-bomb guard).
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError(f"not an image Pillow can read ({len(data)} bytes starting {data[:8]!r})") from None
    except Image.DecompressionBombError as error:  # Pillow's own limit (Image.MAX_IMAGE_PIXELS)
        raise DecodeError(f"decompression bomb refused: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(
            f"decompression bomb refused: header declares {width}x{height} = {width * height:,} pixels, "
            f"more than the limit of {max_pixels:,} (--max-image-pixels)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
        return to_rgb_array(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DecodeError(f"cannot decode {image.format or 'image'} {width}x{height} mode {image.mode}: {error}") from None
