"""Reduced views of an image segmented by windows, at the scale of its mask's overview page
(``pipelines.segment.mask_tiff.write_mask``): the source preview, a JPEG beside the mask (``preview_uri``), and the
colour overlay of ``--overlays``. Assembly writes them (``encode_previews``), so that the report shows the image
without reading its source again; the report reads the source (``source_view``) only for masks without a preview.
Memory: the overview, the view and one band of source tiles, whatever the image's size.
"""

from __future__ import annotations

import math
import posixpath
from typing import Any

import fsspec
import numpy as np
import tifffile
from PIL import Image

from pipelines.segment.mask_tiff import OVERVIEW_SIDE, overview_factor
from pipelines.segment.masks import encode_jpeg, encode_overlay
from pipelines.segment.tiff import HEADER_BLOCK_BYTES, WindowReader

PREVIEW_SUFFIX = ".jpg"


def preview_uri(mask_uri: str) -> str:
    """Where the source preview of the tiled mask at ``mask_uri`` lies: beside it, ``<name>.tif`` ->
    ``<name>.jpg`` (a suffix as long as the mask's, so any name a mask can have, its preview can)."""
    return posixpath.splitext(mask_uri)[0] + PREVIEW_SUFFIX


def mask_overview(mask_uri: str, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """The labels of the smallest page of the TIFF mask at ``mask_uri`` (its overview), reading only the pages'
    headers and that page's pixels; ValueError if it has more than ``OVERVIEW_SIDE`` squared pixels."""
    fs, path = fsspec.core.url_to_fs(mask_uri, **(storage_options or {}))
    with fs.open(path, "rb", block_size=HEADER_BLOCK_BYTES, cache_type="readahead") as f, tifffile.TiffFile(f) as mask:
        overview = min(mask.pages, key=lambda page: math.prod(page.shape))
        if math.prod(overview.shape) > OVERVIEW_SIDE**2:
            raise ValueError(f"mask {mask_uri} has no overview page of at most {OVERVIEW_SIDE} px a side")
        return overview.asarray()


def source_view(reader: WindowReader, height: int, width: int) -> np.ndarray:
    """The source of ``reader`` at ``height`` x ``width`` (its mask overview's size) as ``HxWx3`` uint8: every n-th
    pixel (``WindowReader.read_decimated``) of the smallest tiled level of its pyramid at least that large, or of the
    full resolution on the overview's own grid (``overview_factor``) when no reduced level is; resized (bilinear)
    where the level's decimation does not land on that size."""
    large_enough = [
        (layout.pixels, i, layout)
        for i, layout in enumerate(reader.levels)
        if layout and layout.height >= height and layout.width >= width
    ]
    _, level, layout = min(large_enough, default=(0, 0, reader.layout))
    if level == 0:
        step = overview_factor(layout.height, layout.width)
    else:
        step = max(1, min(layout.height // height, layout.width // width))
    rgb = reader.read_decimated(step, level=level)
    if rgb.shape[:2] != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))
    return rgb


def encode_previews(
    image_uri: str, mask_path: str, palette: list[int], *, overlay: bool, storage_options: dict[str, Any]
) -> tuple[bytes, bytes | None]:
    """The JPEG of the source at ``image_uri`` at the scale of the overview of the mask at ``mask_path`` (any fsspec
    URI), and with ``overlay`` the JPEG of its overlay with that overview (``encode_overlay``, as the overlays of
    whole images), else None."""
    labels = mask_overview(mask_path)
    with WindowReader(image_uri, storage_options) as reader:
        rgb = source_view(reader, *labels.shape)
    return encode_jpeg(rgb), encode_overlay(rgb, labels, palette) if overlay else None
