"""Gigapixel images: tiled TIFFs read by window (local and S3), masks written tile by tile."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pytest
import tifffile

from fcn.image import to_rgb_array
from pipelines.segment import tiff

GEOTAGS = [
    (33550, 12, 3, (0.5, 0.5, 0.0), True),
    (33922, 12, 6, (0.0, 0.0, 0.0, 500000.0, 4200000.0, 0.0), True),
    (34735, 3, 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633), True),
    (34737, 2, 18, "WGS 84 / UTM 33N|", True),
]


def tiled_tiff(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def noise(height: int, width: int, channels: int = 3, dtype=np.uint8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels else (height, width)
    return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)


def pyramid(array: np.ndarray) -> bytes:
    """A whole-slide-style pyramid: the full level with two reduced levels as SubIFDs, then a thumbnail page."""
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        writer.write(array, tile=(64, 64), subifds=2, compression="zlib")
        writer.write(array[::2, ::2], tile=(64, 64), subfiletype=1, compression="zlib")
        writer.write(array[::4, ::4], tile=(64, 64), subfiletype=1, compression="zlib")
        writer.write(array[::8, ::8], subfiletype=1)
    return buffer.getvalue()


WINDOWS = [(0, 300, 0, 500), (0, 1, 0, 1), (37, 211, 130, 499), (64, 128, 64, 128), (299, 300, 255, 257)]
CASES = {
    "rgb-zlib": (noise(300, 500), {"tile": (64, 64), "compression": "zlib"}),
    "rgb-jpeg-ycbcr": (noise(300, 500), {"tile": (128, 128), "compression": "jpeg", "photometric": "ycbcr"}),
    "grey-16bit-bigtiff": (noise(300, 500, 0, np.uint16), {"tile": (48, 80), "bigtiff": True}),
    "rgba-separate": (
        np.ascontiguousarray(noise(300, 500, 4).transpose(2, 0, 1)),
        {"tile": (64, 64), "photometric": "rgb", "planarconfig": "separate", "extrasamples": (2,)},
    ),
    "geotiff": (noise(300, 500), {"tile": (256, 256), "compression": "zlib", "extratags": GEOTAGS}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_windows_equal_the_whole_read(tmp_path, case):
    array, options = CASES[case]
    data = tiled_tiff(array, **options)
    (tmp_path / "image.tif").write_bytes(data)
    whole = tifffile.imread(io.BytesIO(data))
    whole = to_rgb_array(np.moveaxis(whole, 0, -1) if options.get("planarconfig") == "separate" else whole)
    uri = f"file://{tmp_path}/image.tif"
    assert tiff.probe_tiled(uri, {}) == tiff.TiffLayout(300, 500, *options["tile"])
    with tiff.WindowReader(uri, {}) as reader:
        for y0, y1, x0, x1 in WINDOWS:
            np.testing.assert_array_equal(reader.read(y0, y1, x0, x1), whole[y0:y1, x0:x1], err_msg=str((y0, x0)))


def test_pyramid_reads_its_full_resolution_level(tmp_path):
    array = noise(256, 320)
    (tmp_path / "slide.svs").write_bytes(pyramid(array))
    with tiff.WindowReader(f"{tmp_path}/slide.svs", {}) as reader:
        assert reader.layout == tiff.TiffLayout(256, 320, 64, 64)
        np.testing.assert_array_equal(reader.read(10, 250, 33, 300), array[10:250, 33:300])


def test_windowed_read_on_s3_fetches_only_the_window(s3_bucket):
    array = noise(512, 512)
    data = tiled_tiff(array, tile=(128, 128), extratags=GEOTAGS)  # uncompressed: 48 KiB per tile
    fs, _ = fsspec.core.url_to_fs(s3_bucket)
    fs.pipe_file(f"{s3_bucket}/scene.tif", data)
    uri = f"{s3_bucket}/scene.tif"
    with tiff.WindowReader(uri, {}) as reader:
        assert reader.geotags == GEOTAGS
        fetched = []
        cat_ranges = reader.fs.cat_ranges
        reader.fs.cat_ranges = lambda paths, starts, ends: (
            fetched.extend(zip(starts, ends)) or cat_ranges(paths, starts, ends)
        )
        np.testing.assert_array_equal(reader.read(130, 250, 260, 380), array[130:250, 260:380])
    assert len(fetched) == 1 and fetched[0][1] - fetched[0][0] == 128 * 128 * 3  # one tile of the 16


@pytest.mark.parametrize(
    "name,data",
    [
        ("strip.tif", tiled_tiff(noise(40, 50))),
        ("photo.tif", b"\xff\xd8\xff\xe0 not a tiff"),
        ("tiled.png", tiled_tiff(noise(40, 50), tile=(16, 16))),
    ],
)
def test_probe_refuses_what_is_not_read_by_window(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    assert tiff.probe_tiled(str(tmp_path / name), {}) is None


def test_mask_is_a_tiled_tiff_with_overview_and_geotags(tmp_path):
    height, width = 1300, 2100  # bands and tiles cut at edges; an overview decimated by 3
    labels = (np.arange(height)[:, None] // 7 + np.arange(width)[None, :] // 11).astype(np.uint8) % 5
    cuts = [0, 5, 300, 301, 999, height]
    strips = (labels[a:b] for a, b in zip(cuts, cuts[1:]))
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0]
    tiff.write_mask(str(tmp_path / "mask.tif"), height, width, strips, palette=palette, extratags=GEOTAGS)
    with tifffile.TiffFile(tmp_path / "mask.tif") as mask:
        full, overview = mask.pages
        assert full.is_tiled and (full.tilelength, full.tilewidth) == (256, 256)
        assert full.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        np.testing.assert_array_equal(full.asarray(), labels)
        assert overview.subfiletype == tifffile.FILETYPE.REDUCEDIMAGE
        np.testing.assert_array_equal(overview.asarray(), labels[::3, ::3])
        assert [(code, full.tags[code].value) for code, *_ in GEOTAGS] == [(code, v) for code, _, _, v, _ in GEOTAGS]
        assert full.geotiff_tags["ModelPixelScale"] == [0.5, 0.5, 0.0]
        assert tuple(full.colormap[:, 1] // 257) == (255, 0, 0)


def test_mask_upload_is_atomic_on_s3(s3_bucket, tmp_path):
    local = tmp_path / "mask.tif"
    local.write_bytes(b"x" * (6 << 20))  # above s3fs's part size: a multipart upload
    fs, _ = fsspec.core.url_to_fs(s3_bucket)
    tiff.put_file_atomic(fs, str(local), f"{s3_bucket}/masks/a/b.tif")
    assert fs.cat_file(f"{s3_bucket}/masks/a/b.tif") == local.read_bytes()
    local_fs = fsspec.filesystem("file")
    tiff.put_file_atomic(local_fs, str(local), str(tmp_path / "out" / "b.tif"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.tif"]
