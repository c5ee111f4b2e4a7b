"""The report's gallery for images segmented by windows: built from the mask's overview page and a reduced view
of the source (its own pyramid level when it has one), never from the full-resolution pages."""

from __future__ import annotations

import base64
import io
import tracemalloc
from pathlib import Path

import fsspec
import numpy as np
import pytest
import tifffile
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem
from PIL import Image

from fcn.classes import voc_palette
from flows.gallery import gallery, overlay_thumbnail
from pipelines.segment.mask_tiff import overview_factor, write_mask
from pipelines.segment.masks import OVERLAY_ALPHA
from pipelines.segment.preview import encode_previews, mask_overview, preview_uri, source_view
from pipelines.segment.tiff import WindowReader

CLASSES = ["background", "disc", "box", "ring"]
GREYS = np.array([[30, 90], [150, 210]], np.uint8)
"""The source's grey in each quadrant (top-left, top-right / bottom-left, bottom-right)."""
CLASS_OF_QUADRANT = np.array([[1, 2], [3, 0]], np.uint8)
"""The mask's class in each quadrant."""
TILE = 256


class _CountingOpener(LocalFileOpener):
    """A local file that notes every byte range read from it in ``CountingFileSystem.reads``."""

    def read(self, *args, **kwargs):
        start = self.f.tell()
        data = self.f.read(*args, **kwargs)
        CountingFileSystem.reads.append((self.path, start, start + len(data)))
        return data

    def readinto(self, buffer):
        start = self.f.tell()
        count = self.f.readinto(buffer)
        CountingFileSystem.reads.append((self.path, start, start + count))
        return count


class CountingFileSystem(LocalFileSystem):
    """The local file system under the ``counted://`` protocol, noting the byte ranges read."""

    protocol = "counted"
    reads: list[tuple[str, int, int]] = []

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        return _CountingOpener(self._strip_protocol(path), mode, fs=self, **kwargs)


fsspec.register_implementation("counted", CountingFileSystem, clobber=True)


def _quadrants(values: np.ndarray, top: int, left: int, rows: int, columns: int, height: int, width: int):
    """``rows`` x ``columns`` pixels from (``top``, ``left``) of an image of ``height`` x ``width`` whose four
    quadrants hold ``values``."""
    y = (np.arange(top, top + rows) >= height // 2).astype(int)[:, None]
    x = (np.arange(left, left + columns) >= width // 2).astype(int)[None, :]
    return values[y, x]


def _source_tiles(height: int, width: int):
    """A level of the source, tile by tile (memory: one tile)."""
    for top in range(0, height, TILE):
        for left in range(0, width, TILE):
            grey = _quadrants(GREYS, top, left, TILE, TILE, height, width)
            yield np.repeat(grey[..., None], 3, axis=2)


def write_source(path: Path, height: int, width: int, pyramid: str) -> list[tifffile.TiffPage]:
    """A tiled RGB TIFF: no pyramid, a pyramid of SubIFDs (2x, 4x) or of reduced-resolution pages (2x, 4x, 8x,
    Cloud-Optimized GeoTIFF style); returns the full-resolution page (for its tile offsets)."""
    options = {"tile": (TILE, TILE), "compression": "zlib", "photometric": "rgb", "dtype": np.uint8}
    reduced = {"none": [], "subifds": [2, 4], "pages": [2, 4, 8]}[pyramid]
    with tifffile.TiffWriter(path) as writer:
        extra = {"subifds": len(reduced)} if pyramid == "subifds" else {}
        writer.write(_source_tiles(height, width), shape=(height, width, 3), **extra, **options)
        for factor in reduced:
            shape = (height // factor, width // factor)
            writer.write(_source_tiles(*shape), shape=(*shape, 3), subfiletype=1, **options)
    with tifffile.TiffFile(path) as written:
        assert len(written.series[0].levels) == 1 + len(reduced)
        page = written.pages[0]
        return list(zip(page.dataoffsets, page.databytecounts))


def write_tiled_mask(path: Path, height: int, width: int) -> list[tuple[int, int]]:
    """The job's mask of the quadrants (``write_mask``: tiled, a pyramid); returns its full page's tiles."""
    strips = (
        _quadrants(CLASS_OF_QUADRANT, top, 0, min(TILE, height - top), width, height, width)
        for top in range(0, height, TILE)
    )
    write_mask(str(path), height, width, strips, palette=voc_palette())
    with tifffile.TiffFile(path) as mask:
        page = mask.pages[0]
        return list(zip(page.dataoffsets, page.databytecounts))


def _thumbnail(data_uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))).convert("RGB"))


def _touched(path: Path, tiles: list[tuple[int, int]]) -> int:
    """How many of ``tiles`` (offset, byte count) of ``path`` were read (any byte of them)."""
    ranges = [(start, end) for name, start, end in CountingFileSystem.reads if name == str(path)]
    return sum(any(start < offset + count and offset < end for start, end in ranges) for offset, count in tiles)


def counted_row(folder: Path, height: int, width: int) -> dict:
    """The digest's row of ``folder``'s ``scene.tif`` and ``mask.tif``, read through the counting filesystem."""
    return {
        "image_uri": f"counted://{folder}/scene.tif",
        "mask_uri": f"counted://{folder}/mask.tif",
        "width": width,
        "height": height,
        "dominant_class": 0,
    }


@pytest.mark.parametrize("pyramid", ["none", "subifds", "pages"])
def test_a_tiled_image_is_shown_from_the_masks_overview_never_decoded_whole(tmp_path, monkeypatch, pyramid):
    """A 50-megapixel tiled image (its mask's overview decimated by 8): the gallery shows the quadrants' classes
    where they are; the mask's full-resolution page is never read, nor the source's when it has a pyramid; no
    Pillow image above 2 megapixels is opened, and Python's allocations stay far below one decoded full page."""
    height, width = 6144, 8192
    source_tiles = write_source(tmp_path / "scene.tif", height, width, pyramid)
    mask_tiles = write_tiled_mask(tmp_path / "mask.tif", height, width)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1 << 20)  # Pillow refuses images above twice this
    row = counted_row(tmp_path, height, width)
    CountingFileSystem.reads.clear()
    tracemalloc.start()
    try:
        (item,) = gallery([row], CLASSES, voc_palette())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < height * width, f"{peak / 2**20:.0f} MiB traced"  # a third of a decoded full page (144 MiB)
    assert _touched(tmp_path / "mask.tif", mask_tiles) == 0
    source_read = _touched(tmp_path / "scene.tif", source_tiles)
    assert source_read == (len(source_tiles) if pyramid == "none" else 0)  # without a pyramid: every tile, strided

    thumbnail = _thumbnail(item.data_uri)
    assert thumbnail.shape == (120, 2 * 160 + 4, 3)  # image | overlay, the longer side 160 px, as for any image
    palette = np.array(voc_palette()[:12], float).reshape(4, 3)
    for (qy, qx), y, x in [((0, 0), 30, 40), ((0, 1), 30, 120), ((1, 0), 90, 40), ((1, 1), 90, 120)]:
        grey, label = float(GREYS[qy, qx]), CLASS_OF_QUADRANT[qy, qx]
        np.testing.assert_allclose(thumbnail[y, x], [grey] * 3, atol=3, err_msg=f"image, quadrant {qy, qx}")
        blended = grey if label == 0 else grey * (1 - OVERLAY_ALPHA) + palette[label] * OVERLAY_ALPHA
        np.testing.assert_allclose(thumbnail[y, 164 + x], blended * np.ones(3), atol=8, err_msg=f"class {label}")


def test_a_tiled_images_thumbnail_looks_like_the_whole_image_one(tmp_path):
    """On an image small enough to decode whole, the overview's thumbnail matches the ordinary path's."""
    height, width = 1536, 2048  # the overview decimated by 2
    write_source(tmp_path / "scene.tif", height, width, "none")
    write_tiled_mask(tmp_path / "mask.tif", height, width)
    image_uri, mask_uri = f"file://{tmp_path}/scene.tif", f"file://{tmp_path}/mask.tif"
    (item,) = gallery(
        [{"image_uri": image_uri, "mask_uri": mask_uri, "width": width, "height": height, "dominant_class": 0}],
        CLASSES,
        voc_palette(),
    )
    whole = _thumbnail(overlay_thumbnail(image_uri, mask_uri, height * width, voc_palette()))
    overview = _thumbnail(item.data_uri)
    assert overview.shape == whole.shape
    assert np.abs(overview.astype(int) - whole.astype(int)).mean() < 1.5


def test_a_tiled_images_thumbnail_on_s3_equals_the_local_one(tmp_path, s3_bucket):
    height, width = 1536, 2048
    write_source(tmp_path / "scene.tif", height, width, "pages")
    write_tiled_mask(tmp_path / "mask.tif", height, width)
    fs, _ = fsspec.core.url_to_fs(s3_bucket)
    fs.put_file(str(tmp_path / "scene.tif"), f"{s3_bucket}/in/scene.tif")
    fs.put_file(str(tmp_path / "mask.tif"), f"{s3_bucket}/out/masks/scene.tif")
    rows = [
        {"image_uri": image, "mask_uri": mask, "width": width, "height": height, "dominant_class": 0}
        for image, mask in [
            (f"{s3_bucket}/in/scene.tif", f"{s3_bucket}/out/masks/scene.tif"),
            (f"file://{tmp_path}/scene.tif", f"file://{tmp_path}/mask.tif"),
        ]
    ]
    on_s3, local = gallery(rows, CLASSES, voc_palette(), storage_options={})
    assert on_s3.data_uri == local.data_uri


@pytest.mark.parametrize("pyramid", ["none", "pages"])
def test_the_jobs_preview_is_the_source_reduced_and_the_report_shows_it_without_the_source(tmp_path, pyramid):
    """The job's preview (``encode_previews``) is the source at the mask overview's scale, read from a pyramid level
    when there is one (no full-resolution tile then), and its overlay the ordinary overlays' blend, within JPEG
    error, in bounded memory. Written beside the mask, the gallery shows it once the source is gone, as it showed
    the source; a preview of another size is not used (the gallery goes to the source)."""
    height, width = 3072, 4096  # the overview decimated by 4
    source_tiles = write_source(tmp_path / "scene.tif", height, width, pyramid)
    write_tiled_mask(tmp_path / "mask.tif", height, width)
    row = counted_row(tmp_path, height, width)
    (from_source,) = gallery([row], CLASSES, voc_palette())
    CountingFileSystem.reads.clear()
    tracemalloc.start()
    try:
        preview, overlay = encode_previews(
            row["image_uri"], row["mask_uri"], voc_palette(), overlay=True, storage_options={}
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, f"{peak / 2**20:.1f} MiB traced"  # the source decoded whole: 36 MiB
    assert _touched(tmp_path / "scene.tif", source_tiles) == (len(source_tiles) if pyramid == "none" else 0)

    grey = _quadrants(GREYS, 0, 0, height // 4, width // 4, height // 4, width // 4).astype(float)[..., None]
    labels = _quadrants(CLASS_OF_QUADRANT, 0, 0, height // 4, width // 4, height // 4, width // 4)
    colours = np.array(voc_palette()[:12], float).reshape(4, 3)[labels]
    alpha = np.where(labels == 0, 0.0, OVERLAY_ALPHA)[..., None]
    for name, data, expected in [
        ("preview", preview, grey),
        ("overlay", overlay, grey * (1 - alpha) + colours * alpha),
    ]:
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), float)
        assert decoded.shape == expected.shape[:2] + (3,), name
        assert np.abs(decoded - expected).mean() < 1.0, name

    Path(preview_uri(str(tmp_path / "mask.tif"))).write_bytes(preview)
    (tmp_path / "scene.tif").unlink()
    (item,) = gallery([row], CLASSES, voc_palette())
    assert item.data_uri, item.caption
    assert np.abs(_thumbnail(item.data_uri).astype(int) - _thumbnail(from_source.data_uri).astype(int)).mean() < 1.0

    Path(preview_uri(str(tmp_path / "mask.tif"))).write_bytes(_jpeg(np.zeros((8, 8, 3), np.uint8)))
    (item,) = gallery([row], CLASSES, voc_palette())
    assert not item.data_uri and "FileNotFoundError" in item.caption  # it went to the source, which is gone


def _jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_the_source_view_without_a_pyramid_is_on_the_mask_overviews_grid(tmp_path):
    """Sides that the overview's factor does not divide: the view is still the source's every n-th pixel from the
    first, as the mask's overview is the mask's, so that the two line up pixel for pixel."""
    height, width = 701, 2101
    factor = overview_factor(height, width)
    assert height % factor and width % factor
    source = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "scene.tif", source, tile=(TILE, TILE), compression="zlib")
    write_mask(str(tmp_path / "mask.tif"), height, width, [np.zeros((height, width), np.uint8)])
    overview = mask_overview(str(tmp_path / "mask.tif"))
    with WindowReader(str(tmp_path / "scene.tif"), {}) as reader:
        np.testing.assert_array_equal(source_view(reader, *overview.shape), source[::factor, ::factor])
