"""Tiled TIFFs of any size, read window by window with ranged reads.

``WindowReader`` reads any window of the full-resolution level of a tiled TIFF, BigTIFF, Cloud-Optimized
GeoTIFF or pyramidal (whole-slide) TIFF, or of one of its tiled reduced levels: tifffile parses the header
through an fsspec file (a few ranged reads) and only the compressed tiles that the window touches are fetched
(``fs.cat_ranges``, concurrent on object stores) and decoded (``TiffPage.decode``, imagecodecs);
``read_decimated`` gives a level's every n-th pixel a band of tiles at a time. The masks of such images are
written by ``pipelines.segment.mask_tiff``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import tifffile

from fcn.image import to_rgb_array
from pipelines.common.decode import DecodeError
from pipelines.segment.orientation import displayed_geotags, displayed_pixels, page_orientation, stored_window

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".svs")
"""File names probed for tiles: TIFF, BigTIFF and the Aperio whole-slide TIFF."""
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
"""The first four bytes of a TIFF and of a BigTIFF, in either byte order."""
GEO_TAGS = (33550, 33922, 34264, 34735, 34736, 34737)
"""ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory, GeoDoubleParams, GeoAsciiParams:
the georeferencing (transform and CRS) that a mask copies from its GeoTIFF so that it overlays the source."""
HEADER_BLOCK_BYTES = 1 << 20
"""Bytes fetched per ranged read while tifffile parses the header and the tile offsets."""
DECIMATE_READ_PIXELS = 1 << 21
"""Most pixels decoded per read of ``WindowReader.read_decimated`` (a band of whole tiles, at least one tile)."""

_SUPPORTED_PHOTOMETRIC = {
    tifffile.PHOTOMETRIC.MINISBLACK,
    tifffile.PHOTOMETRIC.MINISWHITE,
    tifffile.PHOTOMETRIC.RGB,
    tifffile.PHOTOMETRIC.YCBCR,
}


@dataclass(frozen=True)
class TiffLayout:
    """A level of a tiled TIFF: its size and the size of its tiles, in pixels (as displayed: see ``WindowReader``)."""

    height: int
    width: int
    tile_height: int
    tile_width: int

    @property
    def pixels(self) -> int:
        return self.height * self.width


def may_be_tiff(uri: str) -> bool:
    """Whether ``uri``'s name is one that ``probe_tiled`` looks into (a TIFF suffix, any case)."""
    return uri.lower().endswith(TIFF_SUFFIXES)


def probe_tiled(uri: str, storage_options: dict[str, Any]) -> TiffLayout | None:
    """The layout of ``uri`` if it is a TIFF whose full-resolution level is tiled (read by window), else None
    (not a TIFF name, not a TIFF, a strip TIFF, a volume). Reads the header only."""
    if not may_be_tiff(uri):
        return None
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    if fs.cat_file(path, start=0, end=4) not in TIFF_MAGICS:
        return None
    try:
        with WindowReader(uri, storage_options) as reader:
            return reader.layout
    except DecodeError:
        return None


class WindowReader:
    """Windows of the full-resolution level of the tiled TIFF at ``uri`` (fsspec URI), or of a tiled reduced level
    of its pyramid, as ``HxWx3`` uint8 RGB (``fcn.image.to_rgb_array``'s rules: grey replicated, 16-bit scaled,
    alpha composited over white). DecodeError for a TIFF that is not tiled or whose pixels cannot become RGB.
    Sizes, windows, pixels and ``geotags`` are those of the image as displayed, its Orientation tag applied as on
    the whole-image path (``pipelines.segment.orientation``): masks of tiled and whole images agree.
    ``levels``: the layout of each level, full resolution first, None for a level not read by window."""

    def __init__(self, uri: str, storage_options: dict[str, Any]) -> None:
        self.fs, self.path = fsspec.core.url_to_fs(uri, **storage_options)
        self._file = self.fs.open(self.path, "rb", block_size=HEADER_BLOCK_BYTES, cache_type="readahead")
        try:
            self._tiff = tifffile.TiffFile(self._file)
            self._pages = [level.keyframe for level in self._tiff.series[0].levels]
            page = self._pages[0]
            if not page.is_tiled or page.imagedepth != 1:
                raise DecodeError(f"{uri} is not a tiled 2-D TIFF (no windows to read)")
            if page.photometric not in _SUPPORTED_PHOTOMETRIC:
                raise DecodeError(f"TIFF photometric {page.photometric.name} is not read by window")
            self._orientations = [page_orientation(p) for p in self._pages]
            self._stored = [
                TiffLayout(p.imagelength, p.imagewidth, p.tilelength, p.tilewidth)
                if p.is_tiled and p.imagedepth == 1 and p.photometric in _SUPPORTED_PHOTOMETRIC
                else None
                for p in self._pages
            ]
            self.levels = [
                TiffLayout(stored.width, stored.height, stored.tile_width, stored.tile_height)
                if stored and transposed
                else stored
                for stored, (transposed, _, _) in zip(self._stored, self._orientations)
            ]
            self.layout = self.levels[0]
            stored_geotags = [
                (code, int(tag.dtype), tag.count, tag.value, True)
                for code in GEO_TAGS
                if (tag := page.tags.get(code)) is not None
            ]
            self.geotags = displayed_geotags(
                stored_geotags, self.layout.height, self.layout.width, self._orientations[0]
            )
            """The source's GeoTIFF tags as tifffile ``extratags`` for a raster of the displayed image (empty for a
            TIFF without georeferencing)."""
        except DecodeError:
            self.close()
            raise
        except Exception as error:
            self.close()
            raise DecodeError(f"cannot read TIFF header: {type(error).__name__}: {error}") from None

    def __enter__(self) -> WindowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_tiff", None) is not None:
            self._tiff.close()
        self._file.close()

    def _tiled_level(self, level: int) -> TiffLayout:
        if (layout := self.levels[level]) is None:
            raise DecodeError(f"level {level} of the TIFF is not tiled (no windows to read)")
        return layout

    def read(self, y0: int, y1: int, x0: int, x1: int, *, level: int = 0) -> np.ndarray:
        """Rows ``y0:y1`` and columns ``x0:x1`` (within the image at ``level``, as displayed) as an ``HxWx3`` uint8
        array: fetches and decodes only the tiles that overlap them."""
        layout = self._tiled_level(level)
        if not (0 <= y0 < y1 <= layout.height and 0 <= x0 < x1 <= layout.width):
            raise ValueError(f"window y {y0}:{y1} x {x0}:{x1} is not inside the {layout.width}x{layout.height} image")
        orientation = self._orientations[level]
        stored = self._read_stored(*stored_window(y0, y1, x0, x1, layout.height, layout.width, orientation), level)
        return displayed_pixels(stored, orientation)

    def _read_stored(self, y0: int, y1: int, x0: int, x1: int, level: int) -> np.ndarray:
        """``read`` of a window of the stored rows and columns of ``level``."""
        layout, page = self._stored[level], self._pages[level]
        across = math.ceil(layout.width / layout.tile_width)
        down = math.ceil(layout.height / layout.tile_height)
        planes = page.samplesperpixel if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE else 1
        indices = [
            plane * down * across + row * across + column
            for plane in range(planes)
            for row in range(y0 // layout.tile_height, (y1 - 1) // layout.tile_height + 1)
            for column in range(x0 // layout.tile_width, (x1 - 1) // layout.tile_width + 1)
            if page.databytecounts[plane * down * across + row * across + column] > 0  # sparse tiles stay 0
        ]
        starts = [int(page.dataoffsets[i]) for i in indices]
        ends = [start + int(page.databytecounts[i]) for start, i in zip(starts, indices)]
        chunks = self.fs.cat_ranges([self.path] * len(indices), starts, ends) if indices else []
        window = np.zeros((y1 - y0, x1 - x0, page.samplesperpixel), page.dtype)
        for index, chunk in zip(indices, chunks):
            if isinstance(chunk, Exception):
                raise chunk
            try:
                segment, (plane, _, top, left, _), _ = page.decode(chunk, index, jpegtables=page.jpegtables)
            except Exception as error:
                raise DecodeError(f"cannot decode tile {index}: {type(error).__name__}: {error}") from None
            rows = slice(max(top, y0), min(top + layout.tile_height, y1))
            columns = slice(max(left, x0), min(left + layout.tile_width, x1))
            target = (slice(rows.start - y0, rows.stop - y0), slice(columns.start - x0, columns.stop - x0))
            window[(*target, slice(plane, plane + segment.shape[-1]))] = segment[
                0, rows.start - top : rows.stop - top, columns.start - left : columns.stop - left
            ]
        if page.photometric == tifffile.PHOTOMETRIC.MINISWHITE:
            window = np.iinfo(window.dtype).max - window if window.dtype.kind == "u" else 1 - window
        try:
            return to_rgb_array(window)
        except ValueError as error:
            raise DecodeError(f"TIFF pixels cannot become RGB: {error}") from None

    def read_decimated(self, step: int, *, level: int = 0) -> np.ndarray:
        """Every ``step``-th row and column of ``level`` (from the first) as an ``HxWx3`` uint8 array, read a band
        of whole tiles (at most ``DECIMATE_READ_PIXELS``) at a time: memory of one band and the result, whatever
        the image's size."""
        layout = self._tiled_level(level)
        span = layout.tile_width * max(1, DECIMATE_READ_PIXELS // (layout.tile_height * layout.tile_width))
        bands = []
        for top in range(0, layout.height, layout.tile_height):
            first_row = -(-top // step) * step  # the first row of this band of tiles that is kept
            bottom = min(top + layout.tile_height, layout.height)
            if first_row >= bottom:
                continue
            pieces = []
            for left in range(0, layout.width, span):
                first_column = -(-left // step) * step
                right = min(left + span, layout.width)
                if first_column < right:
                    window = self.read(first_row, bottom, first_column, right, level=level)
                    pieces.append(np.ascontiguousarray(window[::step, ::step]))  # a copy: the window is not kept
            bands.append(np.concatenate(pieces, axis=1))
        return np.concatenate(bands)
