"""Images for the segmentation tests: ordinary ones of different sizes and every kind of awkward input."""

from __future__ import annotations

import io
import struct
import zlib

import fsspec
import numpy as np
from PIL import Image, ImageOps

import fcn

EXIF_ORIENTATION = 0x0112


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _noise(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


def bomb_png() -> bytes:
    """A tiny PNG whose header declares 100000 x 100000 pixels."""
    data = bytearray(_encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", 100_000, 100_000)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def exif_rotated_jpeg(rng: np.random.Generator) -> bytes:
    """Stored 60 wide x 40 high, EXIF orientation 6: displayed 40 wide x 60 high."""
    image = Image.fromarray(_noise(rng, 40, 60))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return _encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def good_images(seed: int = 0, count: int = 3) -> dict[str, bytes]:
    """Ordinary JPEG/PNG photos of different sizes (<= 96 px), keyed by relative path."""
    rng = np.random.default_rng(seed)
    sizes = [(48, 64), (72, 40), (96, 96), (33, 57), (64, 48), (50, 50)]
    images = {}
    for i in range(count):
        height, width = sizes[i % len(sizes)]
        fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
        images[f"photos/{'day' if i % 3 else 'night'}/img{seed}_{i}.{ext}"] = _encode(
            Image.fromarray(_noise(rng, height, width)), fmt
        )
    return images


def awkward_images(seed: int = 1) -> tuple[dict[str, bytes], dict[str, str]]:
    """Every kind of awkward input, keyed by relative path, and the expected outcome per key:
    "ok" or a fragment of the error reason."""
    rng = np.random.default_rng(seed)
    rgb = _noise(rng, 40, 52)
    truncated = _encode(Image.fromarray(_noise(rng, 64, 64)), "JPEG")
    sixteen = Image.fromarray((rng.integers(0, 65536, (36, 44))).astype(np.uint16))
    files = {
        "odd/truncated.jpg": truncated[: len(truncated) // 2],
        "odd/zero.jpg": b"",
        "odd/text.jpg": b"this is a text file, not a JPEG\n",
        "odd/bomb.png": bomb_png(),
        "odd/sixteen_bit.png": _encode(sixteen, "PNG"),
        "odd/cmyk.jpg": _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "odd/palette.png": _encode(Image.fromarray(rgb).convert("P"), "PNG"),
        "odd/rgba.png": _encode(Image.fromarray(_noise(rng, 30, 30, 4), "RGBA"), "PNG"),
        "odd/gray.jpg": _encode(Image.fromarray(rgb[:, :, 0], "L"), "JPEG"),
        "odd/exif_rotated.jpg": exif_rotated_jpeg(rng),
        "odd/one_pixel.png": _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
    }
    expected = {key: "ok" for key in files}
    expected.update(
        {
            "odd/truncated.jpg": "truncated",
            "odd/zero.jpg": "empty file (0 bytes)",
            "odd/text.jpg": "not an image",
            "odd/bomb.png": "decompression bomb",
        }
    )
    return files, expected


def upload(root: str, files: dict[str, bytes]) -> None:
    """Write ``files`` (relative path -> bytes) under the URI ``root``."""
    fs, path = fsspec.core.url_to_fs(root)
    for key, data in files.items():
        fs.makedirs(f"{path}/{key}".rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(f"{path}/{key}", data)


def displayed(data: bytes) -> Image.Image:
    """The image as a viewer shows it (EXIF orientation applied)."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


def tiny_checkpoint(uri: str, num_classes: int = 4, seed: int = 0, arch: str = "fcn8s_vgg16") -> str:
    """Save a small random FCN (width 1/16, FCN-8s unless ``arch``) to ``uri``; give its score layers
    some spread so masks contain several classes."""
    import torch

    torch.manual_seed(seed)
    model = fcn.get_model(arch, num_classes=num_classes, width=1 / 16)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".score_" in name and parameter.dim() > 1:
                parameter.normal_(0, 0.5)
    names = [f"class_{i}" for i in range(num_classes)]
    return fcn.save_checkpoint(model, uri, class_names=names)
