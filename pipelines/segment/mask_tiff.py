"""Masks of tiled images: ``write_mask`` writes a label map given as horizontal strips as a tiled, compressed
TIFF (BigTIFF when needed), a pyramid of levels halved down to an overview, with the source's GeoTIFF tags,
holding one band of mask tiles per level at a time; ``put_file_atomic`` moves it to its final place so that no
reader ever sees a partial mask there. Read by tifffile, GDAL (so QGIS) and OpenSlide (tests/test_mask_readers.py).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import posixpath
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO

import fsspec
import numpy as np
import tifffile

from fcn.registry import replace_atomically

MASK_TILE = 256
"""Side of the tiles of a mask TIFF."""
OVERVIEW_SIDE = 1024
"""A mask's overview page is the mask decimated by the smallest integer factor that brings its longer side
to at most this many pixels."""
BIGTIFF_BYTES = 2**32 - 2**25
"""Masks of more uncompressed bytes are written as BigTIFF (tifffile's own threshold for arrays)."""


def overview_factor(height: int, width: int) -> int:
    """The decimation of a mask's overview, the smallest level of its pyramid (``write_mask``): the smallest power
    of two that brings its longer side to at most ``OVERVIEW_SIDE``."""
    factor = 1
    while max(height, width) > factor * OVERVIEW_SIDE:
        factor *= 2
    return factor


def write_mask(
    path: str,
    height: int,
    width: int,
    strips: Iterable[np.ndarray],
    *,
    palette: list[int] | None = None,
    extratags: list[tuple] = (),
) -> None:
    """Write the label map given as ``strips`` (consecutive full-width rows, top to bottom) to the local file
    ``path``: a deflate-compressed TIFF of ``MASK_TILE`` tiles (BigTIFF when all its levels' bytes exceed
    ``BIGTIFF_BYTES``), uint8 labels with ``palette`` as colour map (uint16 greyscale for int32 labels), as a
    pyramid: the full-resolution page, then pages of the same tiles, compression and colours (subfile type
    reduced-resolution), each the previous one decimated by 2 (nearest neighbour: level k is every 2**k-th row and
    column of the labels), down to the overview (``overview_factor``). tifffile reads it as one series of these
    levels, GDAL lists them as overviews and OpenSlide as levels (it takes tiled pages only). ``extratags`` (e.g.
    ``WindowReader.geotags``) go to the full-resolution page. Memory: a few bands of ``MASK_TILE`` rows (tifffile
    compresses a band's tiles per batch) and the overview; the levels between stream through raw temporary files
    in ``path``'s folder, written and read a band at a time."""
    strips = iter(strips)
    first = next(strips)
    dtype = np.dtype(np.uint8) if first.dtype == np.uint8 else np.dtype(np.uint16)
    levels = overview_factor(height, width).bit_length()
    shapes = [(-(-height // 2**level), -(-width // 2**level)) for level in range(levels)]
    if palette is not None and dtype == np.uint8:
        table = np.zeros(768, np.uint16)
        table[: min(len(palette), 768)] = palette[:768]
        colour = {"photometric": "palette", "colormap": table.reshape(256, 3).T * 257}
    else:
        colour = {"photometric": "minisblack"}
    options = {"compression": "zlib", "compressionargs": {"level": 6}, "tile": (MASK_TILE, MASK_TILE), **colour}
    bigtiff = sum(rows * columns for rows, columns in shapes) * dtype.itemsize > BIGTIFF_BYTES
    bands = _bands(itertools.chain([first], strips), width, MASK_TILE)
    del first  # held no longer than its bands
    with contextlib.ExitStack() as files, tifffile.TiffWriter(path, bigtiff=bigtiff) as writer:
        for level, shape in enumerate(shapes):
            reduced = None  # the next level's raw rows: a temporary file, in memory for the overview
            if level + 2 == len(shapes):
                reduced = files.enter_context(io.BytesIO())
            elif level + 1 < len(shapes):
                reduced = files.enter_context(tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))))
            writer.write(
                _tiles(bands, dtype, reduced),
                shape=shape,
                dtype=dtype,
                subfiletype=tifffile.FILETYPE.REDUCEDIMAGE if level else 0,
                extratags=list(extratags) if level == 0 else [],
                buffersize=MASK_TILE * shape[1] * dtype.itemsize,  # a band's tiles per batch compressed in parallel
                **options,
            )
            if reduced is not None:
                bands = _raw_bands(reduced, *shapes[level + 1], dtype)


def _tiles(bands: Iterator[tuple[int, np.ndarray]], dtype: np.dtype, reduced: IO[bytes] | None) -> Iterator[np.ndarray]:
    """The ``MASK_TILE`` tiles of ``bands`` as ``dtype``, row by row; each band's rows and columns of even index (the
    next level's) are appended to ``reduced`` as raw bytes."""
    for top, band in bands:
        band = band.astype(dtype, copy=False)
        if reduced is not None:
            reduced.write(np.ascontiguousarray(band[top % 2 :: 2, ::2]))
        for left in range(0, band.shape[1], MASK_TILE):
            yield band[:, left : left + MASK_TILE]


def _raw_bands(raw: IO[bytes], height: int, width: int, dtype: np.dtype) -> Iterator[tuple[int, np.ndarray]]:
    """(top row, band) of ``MASK_TILE`` rows of the ``height`` x ``width`` raw ``dtype`` rows in ``raw``, read one
    band at a time from its start, and ``raw`` closed after the last (a level is read once)."""
    raw.seek(0)
    for top in range(0, height, MASK_TILE):
        rows = min(MASK_TILE, height - top)
        yield top, np.frombuffer(raw.read(rows * width * dtype.itemsize), dtype).reshape(rows, width)
    raw.close()


def _bands(strips: Iterable[np.ndarray], width: int, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(top row, band) of ``rows`` rows (the last may be shorter) regrouped from strips of any heights."""
    pending: list[np.ndarray] = []
    held, top = 0, 0
    for strip in strips:
        if strip.ndim != 2 or strip.shape[1] != width:
            raise ValueError(f"mask strip of shape {strip.shape} is not {width} pixels wide")
        pending.append(strip)
        held += len(strip)
        while held >= rows:
            joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield top, joined[:rows]
            top += rows
            pending, held = [joined[rows:]] if held > rows else [], held - rows
    if held:
        yield top, np.concatenate(pending)


def put_file_atomic(fs: fsspec.AbstractFileSystem, local_path: str, path: str) -> None:
    """Upload the local file ``local_path`` to ``path`` on ``fs`` so that ``path`` never holds a partial file
    (``fcn.registry.replace_atomically``). A mask is a file too big to hold as bytes, hence fsspec's
    ``put_file`` (a multipart upload for big files on an object store) rather than ``objectstore.put_bytes``."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    replace_atomically(fs, path, lambda target: fs.put_file(local_path, target))
