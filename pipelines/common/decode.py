"""Decode encoded image bytes into the displayed RGB pixels, with readable reasons for bad files.

``decode_image`` decodes on the CPU (Pillow). ``device_jpeg_orientation`` picks the JPEGs that a GPU
actor can decode itself (``torchvision.io.decode_jpeg(device="cuda")``, nvJPEG); ``orient`` applies
their EXIF orientation there, since nvJPEG ignores it.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fcn.image import to_rgb_array

EXIF_ORIENTATION = 0x0112
DEVICE_JPEG_MODES = frozenset({"RGB", "L"})  # YCbCr and greyscale JPEGs; CMYK/YCCK go through Pillow


class DecodeError(ValueError):
    """The bytes are not a decodable image (the message is the reason written to the stats row)."""


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Open ``data`` lazily (header only) and refuse it, with a reason, if it is empty, not an image, or
    declares more than ``max_pixels`` pixels (decompression-bomb guard, before any pixel is decoded)."""
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
            f"more than the limit of {max_pixels:,} (--max-image-pixels) of images decoded whole; tiled TIFF, "
            "BigTIFF, Cloud-Optimized GeoTIFF and pyramidal TIFF have no such limit (they are read window by window)"
        )
    return image


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Return the image in ``data`` as an ``HxWx3`` uint8 RGB array in its displayed orientation.

    The EXIF orientation is applied (so masks line up with what viewers show) and any PIL mode is
    converted by ``fcn.image.to_rgb_array``. See ``open_image`` for what is refused.
    """
    image = open_image(data, max_pixels=max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
        return to_rgb_array(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        width, height = image.size
        raise DecodeError(
            f"cannot decode {image.format or 'image'} {width}x{height} mode {image.mode}: {error}"
        ) from None


def device_jpeg_orientation(data: bytes, *, max_pixels: int) -> int | None:
    """The EXIF orientation (1-8) of ``data`` if it is a JPEG that can be decoded on the device
    (colour or grey), else None (decode it with ``decode_image``). Refuses bad data like ``open_image``."""
    image = open_image(data, max_pixels=max_pixels)
    if image.format != "JPEG" or image.mode not in DEVICE_JPEG_MODES:
        return None
    try:
        orientation = int(image.getexif().get(EXIF_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError):  # unreadable EXIF: Pillow's exif_transpose would fail too
        return None
    return orientation if 1 <= orientation <= 8 else 1


def orient(pixels, orientation: int):
    """Apply EXIF ``orientation`` to a ``CxHxW`` tensor as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return pixels.flip(2)
    if orientation == 3:
        return pixels.flip(1, 2)
    if orientation == 4:
        return pixels.flip(1)
    if orientation == 5:
        return pixels.transpose(1, 2)
    if orientation == 6:
        return pixels.transpose(1, 2).flip(2)
    if orientation == 7:
        return pixels.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return pixels.transpose(1, 2).flip(1)
    return pixels


DEPTH_PNG_UNITS_PER_M = 1000
"""Depth maps are 16-bit PNGs of millimetres (NYUDv2's layout; 0 = no reading)."""


def depth_from_image(image: Image.Image) -> np.ndarray:
    """The float32 ``HxW`` depth in metres of a 16-bit PNG of millimetres; DecodeError otherwise."""
    if not image.mode.startswith("I"):
        raise DecodeError(f"depth has mode {image.mode!r}, not a 16-bit PNG of millimetres")
    depth = np.asarray(image, np.float32)
    if (depth < 0).any():
        raise DecodeError("depth has negative values")
    return depth / DEPTH_PNG_UNITS_PER_M


def decode_depth(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode a depth map (see ``depth_from_image``) with ``open_image``'s checks."""
    image = open_image(data, max_pixels=max_pixels)
    try:
        image.load()
    except (OSError, ValueError) as error:
        raise DecodeError(f"truncated or corrupt depth map: {error}") from None
    return depth_from_image(image)
