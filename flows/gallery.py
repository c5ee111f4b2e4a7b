"""The report's gallery: sampled images beside their mask overlays, as PNG thumbnails in data URIs. An image
segmented by windows is shown from its mask's overview page and a matching reduced view of the source, never
decoded at full resolution. A row whose files are gone or unreadable gets a caption saying why, not a thumbnail.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import tifffile
from PIL import Image

from pipelines.common.decode import decode_image
from pipelines.segment.masks import encode_overlay
from pipelines.segment.tiff import HEADER_BLOCK_BYTES, OVERVIEW_SIDE, WindowReader, may_be_tiff

_log = logging.getLogger(__name__)
THUMBNAIL_SIZE = 160
THUMBNAIL_ERRORS = (OSError, ValueError, Image.DecompressionBombError)
"""What a sampled row's files may raise (gone, unreadable, not an image): its gallery item says why, the
report is still written."""


@dataclass(frozen=True)
class GalleryItem:
    """One image with its mask blended on top, as a PNG data URI (empty when it could not be made: the
    caption says why)."""

    image_uri: str
    caption: str
    data_uri: str


def overlay_thumbnail(
    image_uri: str,
    mask_uri: str,
    pixels: int,
    palette: list[int],
    *,
    size: int = THUMBNAIL_SIZE,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """The image (as displayed; ``pixels`` = its width x height) and the same colour overlay as the
    job's ``--overlays``, side by side, scaled so that the longer side is ``size`` px, as a PNG data URI."""
    with fsspec.open(image_uri, "rb", **(storage_options or {})) as f:
        rgb = decode_image(f.read(), max_pixels=pixels)
    with fsspec.open(mask_uri, "rb", **(storage_options or {})) as f:
        labels = np.asarray(Image.open(io.BytesIO(f.read())))
    return _side_by_side(rgb, labels, palette, size)


def overview_thumbnail(
    image_uri: str,
    mask_uri: str,
    palette: list[int],
    *,
    size: int = THUMBNAIL_SIZE,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """``overlay_thumbnail`` of an image segmented by windows (a tiled TIFF; its mask a tiled TIFF with an overview
    page), from the mask's overview (``mask_overview``) and the source at the same scale: every n-th pixel
    (``WindowReader.read_decimated``) of the smallest tiled level of its pyramid at least as large, the full
    resolution when it has no pyramid. Memory: the overview, the view and one band of tiles, whatever the size."""
    labels = mask_overview(mask_uri, storage_options)
    height, width = labels.shape
    with WindowReader(image_uri, storage_options or {}) as reader:
        large_enough = [
            (layout.pixels, i, layout)
            for i, layout in enumerate(reader.levels)
            if layout and layout.height >= height and layout.width >= width
        ]
        _, level, layout = min(large_enough, default=(0, 0, reader.layout))
        rgb = reader.read_decimated(max(1, min(layout.height // height, layout.width // width)), level=level)
    if rgb.shape[:2] != labels.shape:
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))
    return _side_by_side(rgb, labels, palette, size)


def mask_overview(mask_uri: str, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """The labels of the smallest page of the TIFF mask at ``mask_uri`` (its overview), reading only the pages'
    headers and that page's pixels; ValueError if it has more than ``OVERVIEW_SIDE`` squared pixels."""
    fs, path = fsspec.core.url_to_fs(mask_uri, **(storage_options or {}))
    with fs.open(path, "rb", block_size=HEADER_BLOCK_BYTES, cache_type="readahead") as f, tifffile.TiffFile(f) as mask:
        overview = min(mask.pages, key=lambda page: math.prod(page.shape))
        if math.prod(overview.shape) > OVERVIEW_SIDE**2:
            raise ValueError(f"mask {mask_uri} has no overview page of at most {OVERVIEW_SIDE} px a side")
        return overview.asarray()


def _side_by_side(rgb: np.ndarray, labels: np.ndarray, palette: list[int], size: int) -> str:
    """``rgb`` and its overlay with ``labels``, the longer side scaled to ``size`` px, as a PNG data URI."""
    overlay = Image.open(io.BytesIO(encode_overlay(rgb, labels, palette)))
    image = Image.fromarray(rgb)
    scale = size / max(image.size)
    fitted = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    pair = Image.new("RGB", (2 * fitted[0] + 4, fitted[1]), "white")
    pair.paste(image.resize(fitted, Image.Resampling.BILINEAR), (0, 0))
    pair.paste(overlay.resize(fitted, Image.Resampling.BILINEAR), (fitted[0] + 4, 0))
    buffer = io.BytesIO()
    pair.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def gallery(
    sample: list[dict[str, Any]],
    class_names: list[str],
    palette: list[int],
    storage_options: dict[str, Any] | None = None,
) -> list[GalleryItem]:
    """Overlays of the ``sample`` rows (``StatsDigest.sample``), in their order."""
    items = []
    for row in sample:
        caption = (
            f"{row['image_uri'].rsplit('/', 1)[-1]} ({row['width']}x{row['height']}, "
            f"mostly {class_names[row['dominant_class']]})"
        )
        try:
            if may_be_tiff(row["mask_uri"]):  # the mask of an image segmented by windows (others are PNG)
                thumbnail = overview_thumbnail(
                    row["image_uri"], row["mask_uri"], palette, storage_options=storage_options
                )
            else:
                thumbnail = overlay_thumbnail(
                    row["image_uri"],
                    row["mask_uri"],
                    row["width"] * row["height"],
                    palette,
                    storage_options=storage_options,
                )
        except THUMBNAIL_ERRORS as error:
            _log.warning("no thumbnail of %s: %s: %s", row["image_uri"], type(error).__name__, error)
            thumbnail, caption = "", f"{caption}: no thumbnail ({type(error).__name__}: {error})"
        items.append(GalleryItem(row["image_uri"], caption, thumbnail))
    return items
