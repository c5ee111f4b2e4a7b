"""Turn any PIL image or numpy array into the HxWx3 uint8 RGB array the networks consume.

Rules, the same for PIL images and arrays:
- grey values are replicated to R, G and B;
- 16-bit data (PIL modes ``I;16*`` and ``I``, uint16 arrays) is scaled to 8 bits (0 -> 0, 65535 -> 255);
- floating-point data (PIL mode ``F``, float arrays) is taken to lie in [0, 1] and clipped;
- bilevel data (PIL mode ``1``, bool arrays) becomes 0 / 255;
- an alpha channel (``LA``, ``RGBA``, ``PA``, ``P`` with transparency, HxWx2 / HxWx4 arrays) is
  composited over ``background`` (white by default), i.e. what a viewer shows;
- other colour spaces (``CMYK``, ``YCbCr``, ...) are converted by Pillow.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

WHITE = (255, 255, 255)

_DIRECT_MODES = {"RGB", "RGBA", "L", "LA", "1", "F"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_CONVERT_MODES = {"PA", "La", "RGBa"}


def to_rgb_array(image: Image.Image | np.ndarray, *, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """Return ``image`` as a C-contiguous ``HxWx3`` uint8 RGB array (see the module docstring).

    Raises ValueError naming the problem for empty images, unsupported shapes, dtypes or modes,
    and non-finite float data.
    """
    if isinstance(image, Image.Image):
        array = _pil_to_array(image)
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise ValueError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    return _array_to_rgb(array, background)


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """Decode a PIL image into an array that ``_array_to_rgb`` understands (uint8/uint16/float/bool)."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"empty image of size {image.width}x{image.height}")
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        # "I" is 32-bit signed; Pillow uses it (and the I;16 variants) for 16-bit PNG/TIFF data.
        return np.clip(np.asarray(image, dtype=np.int64), 0, 65535).astype(np.uint16)
    if mode in _ALPHA_CONVERT_MODES or "transparency" in image.info:
        return np.asarray(image.convert("RGBA"))
    if mode in _DIRECT_MODES:
        return np.asarray(image)
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError as error:
        raise ValueError(f"cannot convert PIL image mode {mode!r} to RGB: {error}") from None


def _array_to_rgb(array: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    if array.size == 0:
        raise ValueError(f"empty image array of shape {array.shape}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"image array must be HxW or HxWxC with C in 1, 2, 3, 4 channels, got shape {array.shape}")
    pixels = _to_uint8(array)
    channels = pixels.shape[2]
    color = pixels[:, :, :1].repeat(3, axis=2) if channels <= 2 else pixels[:, :, :3]
    if channels in (2, 4):
        alpha = pixels[:, :, -1:].astype(np.uint16)
        bg = np.asarray(background, dtype=np.uint16)
        color = ((color * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(color)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale uint8/uint16/bool/float pixel values to uint8."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("float image array contains NaN or infinite values")
        return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(f"unsupported image array dtype {array.dtype}; expected uint8, uint16, bool or float in [0, 1]")
