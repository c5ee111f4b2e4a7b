"""The report's gallery: sampled images beside their mask overlays, as PNG thumbnails in data URIs. An image
segmented by windows is shown from its mask's overview page and the source preview that the job wrote beside the
mask (``pipelines.segment.preview``), else a matching reduced view read from the source; never decoded at full
resolution. A row whose files are gone or unreadable gets a caption saying why, not a thumbnail.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from pipelines.common.decode import decode_image
from pipelines.segment.mask_tiff import OVERVIEW_SIDE
from pipelines.segment.masks import encode_overlay
from pipelines.segment.preview import mask_overview, preview_uri, source_view
from pipelines.segment.tiff import WindowReader, may_be_tiff

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
    page), from the mask's overview (``mask_overview``) and the source at the same scale: the preview that the job
    wrote beside the mask (``preview_uri``), else (none there, or not of the overview's size) read from the source
    (``source_view``). Memory: the overview, the view and one band of tiles, whatever the size."""
    labels = mask_overview(mask_uri, storage_options)
    rgb = _job_preview(mask_uri, labels.shape, storage_options)
    if rgb is None:
        with WindowReader(image_uri, storage_options or {}) as reader:
            rgb = source_view(reader, *labels.shape)
    return _side_by_side(rgb, labels, palette, size)


def _job_preview(mask_uri: str, shape: tuple[int, ...], storage_options: dict[str, Any] | None) -> np.ndarray | None:
    """The source preview beside the tiled mask at ``mask_uri`` if there is one of ``shape``, else None."""
    try:
        with fsspec.open(preview_uri(mask_uri), "rb", **(storage_options or {})) as f:
            rgb = decode_image(f.read(), max_pixels=OVERVIEW_SIDE**2)
    except FileNotFoundError:
        return None
    return rgb if rgb.shape[:2] == shape else None


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
