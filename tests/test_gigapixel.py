"""Gigapixel images: tiled TIFFs read by window (local and S3), masks written tile by tile."""

from __future__ import annotations

import base64
import io
import json
import re
import tracemalloc

import fsspec
import numpy as np
import pytest
import tifffile

from fcn.image import to_rgb_array
from pipelines.segment import mask_tiff, tiff

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


@pytest.mark.parametrize("step", [1, 3, 7, 100])
def test_decimated_reads_equal_the_strided_whole_image_at_every_level(tmp_path, monkeypatch, step):
    array = noise(300, 500)
    (tmp_path / "slide.tif").write_bytes(pyramid(array))
    monkeypatch.setattr(tiff, "DECIMATE_READ_PIXELS", 3 * 64 * 64)  # three tiles per read: bands cut across
    with tiff.WindowReader(f"{tmp_path}/slide.tif", {}) as reader:
        sizes = [level and (level.height, level.width) for level in reader.levels]
        assert sizes == [(300, 500), (150, 250), (75, 125), None]  # the thumbnail page is not tiled
        for level, factor in enumerate([1, 2, 4]):
            np.testing.assert_array_equal(
                reader.read_decimated(step, level=level), array[::factor, ::factor][::step, ::step], err_msg=str(level)
            )


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


def test_mask_is_a_tiled_pyramid_halved_down_to_the_overview_with_geotags(tmp_path, monkeypatch):
    """tifffile reads the mask as one series whose levels are every 2**k-th pixel of the labels down to the first of
    at most ``OVERVIEW_SIDE`` px a side (``overview_factor``), each tiled, compressed and coloured as the full page,
    which alone has the GeoTIFF tags."""
    monkeypatch.setattr(mask_tiff, "OVERVIEW_SIDE", 200)  # levels 1-3 through temporary files, the overview in memory
    height, width = 1300, 2100  # bands and tiles cut at edges
    labels = (np.arange(height)[:, None] // 7 + np.arange(width)[None, :] // 11).astype(np.uint8) % 5
    cuts = [0, 5, 300, 301, 999, height]
    strips = (labels[a:b] for a, b in zip(cuts, cuts[1:]))
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0]
    mask_tiff.write_mask(str(tmp_path / "mask.tif"), height, width, strips, palette=palette, extratags=GEOTAGS)
    factors = [1, 2, 4, 8, 16]  # 2100 / 16 = 131.25: the first level of at most 200 px
    assert mask_tiff.overview_factor(height, width) == factors[-1]
    with tifffile.TiffFile(tmp_path / "mask.tif") as mask:
        [series] = mask.series
        assert len(series.levels) == len(factors)
        for factor, level in zip(factors, series.levels):
            page = level.keyframe
            np.testing.assert_array_equal(level.asarray(), labels[::factor, ::factor], err_msg=str(factor))
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            assert page.subfiletype == (tifffile.FILETYPE.REDUCEDIMAGE if factor > 1 else 0)
            assert tuple(page.colormap[:, 1] // 257) == (255, 0, 0)
            assert (GEOTAGS[0][0] in page.tags) == (factor == 1)
        full = series.levels[0].keyframe
        assert [(code, full.tags[code].value) for code, *_ in GEOTAGS] == [(code, v) for code, _, _, v, _ in GEOTAGS]
        assert full.geotiff_tags["ModelPixelScale"] == [0.5, 0.5, 0.0]
    assert [path.name for path in tmp_path.iterdir()] == ["mask.tif"]  # no temporary file left


def test_writing_a_mask_holds_a_few_bands_never_a_reduced_level(tmp_path, monkeypatch):
    """The levels above the overview stream through temporary files a band at a time, and tifffile compresses a
    band of tiles per batch (its default batch, 512 MiB, would hold the whole page here), with several threads as on
    a many-core machine: Python's allocations (numpy's included) peak far below one level-1 array."""
    monkeypatch.setattr(mask_tiff, "OVERVIEW_SIDE", 256)
    monkeypatch.setattr(tifffile.TIFF, "MAXWORKERS", 4)
    height, width = 16384, 4096  # level 1: 16 MiB; a band of 256 rows: 1 MiB; 7 levels down to 256 x 64
    columns = (np.arange(width) // 11 % 5).astype(np.uint8)

    def strips():
        for top in range(0, height, 100):
            strip = (np.arange(top, min(top + 100, height)) // 7 % 5).astype(np.uint8)[:, None] + columns
            strip %= 5
            yield strip

    mask_tiff.write_mask(str(tmp_path / "warm.tif"), 300, 300, [np.zeros((300, 300), np.uint8)])  # imports: not traced
    tracemalloc.start()
    try:
        mask_tiff.write_mask(str(tmp_path / "mask.tif"), height, width, strips())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < height * width / 8, f"{peak / 2**20:.1f} MiB traced"  # half of level 1 (measured: 5.8 MiB)
    with tifffile.TiffFile(tmp_path / "mask.tif") as mask:
        assert len(mask.series[0].levels) == 7
        overview = mask.series[0].levels[-1].asarray()
    expected = ((np.arange(0, height, 64) // 7 % 5).astype(np.uint8)[:, None] + columns[::64]) % 5
    np.testing.assert_array_equal(overview, expected)


def test_mask_upload_is_atomic_on_s3(s3_bucket, tmp_path):
    local = tmp_path / "mask.tif"
    local.write_bytes(b"x" * (6 << 20))  # above s3fs's part size: a multipart upload
    fs, _ = fsspec.core.url_to_fs(s3_bucket)
    mask_tiff.put_file_atomic(fs, str(local), f"{s3_bucket}/masks/a/b.tif")
    assert fs.cat_file(f"{s3_bucket}/masks/a/b.tif") == local.read_bytes()
    local_fs = fsspec.filesystem("file")
    mask_tiff.put_file_atomic(local_fs, str(local), str(tmp_path / "out" / "b.tif"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.tif"]


def test_the_decompression_guard_names_the_limit_and_the_formats_without_one():
    from PIL import Image

    from pipelines.common.decode import DecodeError, decode_image

    png = io.BytesIO()
    Image.fromarray(noise(40, 50)).save(png, format="PNG")
    with pytest.raises(DecodeError, match=r"limit of 1,000 \(--max-image-pixels\).*tiled TIFF.*window by window"):
        decode_image(png.getvalue(), max_pixels=1000)


# The job end to end: a tiled TIFF segmented as windows by the FCN actors, stitched, equal to the whole image.

SCENE = (700, 900)  # cut into 2 x 6 windows of 640 px by the tiny network (its margin: 288 px)
TILE_OPTIONS = {"tile_pixels": 1, "tile_size": 640}


def scene(seed: int = 3, shape: tuple[int, int] = SCENE, block: int = 50, jitter: int = 20) -> np.ndarray:
    """A smooth scene (``block``-pixel squares of colour plus noise of +-``jitter``) so that the network's labels
    form regions."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (shape[0] // block + 1, shape[1] // block + 1, 3), dtype=np.uint8)
    image = blocks.repeat(block, 0).repeat(block, 1)[: shape[0], : shape[1]]
    return np.clip(image.astype(np.int16) + rng.integers(-jitter, jitter, image.shape), 0, 255).astype(np.uint8)


def _config(input: str, output: str, model: str, **kwargs):
    from pipelines.segment import SegmentConfig

    small = {"actors": 1, "cpus_per_actor": 1, "batch_size": 4, "progress": False}
    return SegmentConfig(input=input, output=output, model=model, **(small | kwargs))


def _rows(output: str) -> dict[str, dict]:
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()
    rows = pq.read_table(f"{root}/stats", filesystem=fs).to_pylist()
    assert len(rows) == len({row["key"] for row in rows})
    return {row["key"]: row for row in rows}


def _mask(uri: str) -> tifffile.TiffFile:
    with fsspec.open(uri, "rb") as f:
        return tifffile.TiffFile(io.BytesIO(f.read()))


def test_a_tiled_tiff_segmented_as_windows_equals_the_whole_image(ray_cluster, s3_bucket):
    from PIL import Image
    from segment_cases import tiny_checkpoint, upload

    from pipelines.segment import run_segmentation

    model = tiny_checkpoint(f"{s3_bucket}/model.pt", num_classes=4)
    photo = io.BytesIO()
    Image.fromarray(scene(5)[:80, :90]).save(photo, format="PNG")
    upload(
        f"{s3_bucket}/in",
        {
            "scene.tif": tiled_tiff(scene(), tile=(128, 128), compression="zlib", extratags=GEOTAGS),
            "photo.png": photo.getvalue(),
        },
    )
    tiled = run_segmentation(_config(f"{s3_bucket}/in", f"{s3_bucket}/tiled", model, **TILE_OPTIONS))
    whole = run_segmentation(_config(f"{s3_bucket}/in", f"{s3_bucket}/whole", model))
    assert (tiled.ok, tiled.error, whole.ok, whole.error) == (2, 0, 2, 0), tiled.errors
    by_windows, by_image = _rows(f"{s3_bucket}/tiled"), _rows(f"{s3_bucket}/whole")

    row, reference = by_windows["scene.tif"], by_image["scene.tif"]
    assert row["mask_uri"] == f"{s3_bucket}/tiled/masks/scene.tif.tif"
    with _mask(row["mask_uri"]) as mask, fsspec.open(reference["mask_uri"], "rb") as png:
        [full] = mask.pages  # at most 1024 px a side (OVERVIEW_SIDE): the full page is its own overview
        labels = full.asarray()
        np.testing.assert_array_equal(labels, np.asarray(Image.open(png)))
        assert full.is_tiled
        assert full.geotiff_tags["ModelTiepoint"] == list(GEOTAGS[1][3])
    assert len(np.unique(labels)) > 1
    assert row["pixel_counts"] == reference["pixel_counts"] == np.bincount(labels.ravel(), minlength=4).tolist()
    assert row["mean_confidence"] == pytest.approx(reference["mean_confidence"], rel=1e-9)
    assert (row["status"], row["width"], row["height"]) == ("ok", SCENE[1], SCENE[0])
    assert row["class_fractions"] == reference["class_fractions"]
    assert by_windows["photo.png"]["mask_uri"].endswith(".png")  # small images: as before

    manifest = json.loads(fsspec.open(tiled.manifest_uri).open().read())
    [report] = manifest["tiled_images"]
    assert report["key"] == "scene.tif" and report["tiles"] == 12 and report["fcn_actors"] == 1
    fs, _ = fsspec.core.url_to_fs(s3_bucket)
    assert not fs.exists(f"{s3_bucket}/tiled/_tiles/scene.tif")  # parts removed once assembled
    assert fs.exists(f"{s3_bucket}/tiled/masks/scene.tif.jpg")  # the source preview beside the mask

    from fcn.heads import PRIMARY_HEAD
    from flows.digest import digest_stats, stats_dataset
    from flows.gallery import gallery

    def thumbnails(run: str) -> dict[str, np.ndarray]:
        digest = digest_stats(stats_dataset(f"{s3_bucket}/{run}/stats"), sample_size=2)
        distribution, palette = digest.heads[PRIMARY_HEAD]
        items = gallery(digest.sample, distribution.class_names, palette)
        return {
            item.image_uri: np.asarray(Image.open(io.BytesIO(base64.b64decode(item.data_uri.split(",", 1)[1]))), float)
            for item in items
        }

    tiled_items, whole_items = thumbnails("tiled"), thumbnails("whole")
    assert tiled_items.keys() == whole_items.keys()
    for uri, thumbnail in tiled_items.items():  # the tiled mask's overview (here 1:1) and the job's JPEG preview
        assert np.abs(thumbnail - whole_items[uri]).mean() < 1, uri


def test_a_tiled_images_overlay_is_the_whole_ones_decimated_and_the_report_needs_no_source(ray_cluster, tmp_path):
    """With --overlays, an image segmented by windows (its mask's overview decimated) gets the overlay at the
    overview's scale: the whole image's overlay decimated, within JPEG error; and a preview of the source beside its
    mask, from which the report shows it once the source is removed, as it showed the image segmented whole."""
    from PIL import Image
    from segment_cases import tiny_checkpoint, upload

    from fcn.heads import PRIMARY_HEAD
    from flows.digest import digest_stats, stats_dataset
    from flows.gallery import gallery
    from pipelines.segment import run_segmentation
    from pipelines.segment.masks import encode_jpeg, encode_overlay
    from pipelines.segment.model import describe_model
    from pipelines.segment.preview import preview_uri

    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=4)
    image = scene(7, (700, 2100), block=150, jitter=3)  # large smooth squares: small JPEG error
    factor = mask_tiff.overview_factor(*image.shape[:2])
    assert factor > 1
    upload(str(tmp_path / "in"), {"scene.tif": tiled_tiff(image, tile=(128, 128), compression="zlib")})
    runs = {"tiled": {"tile_pixels": 1, "tile_size": 1024}, "whole": {}}
    for run, options in runs.items():
        summary = run_segmentation(
            _config(str(tmp_path / "in"), f"file://{tmp_path}/{run}", model, overlays=True, **options)
        )
        assert (summary.ok, summary.error) == (1, 0), summary.errors
    row, reference = _rows(f"file://{tmp_path}/tiled")["scene.tif"], _rows(f"file://{tmp_path}/whole")["scene.tif"]

    def pixels(data: str | bytes) -> np.ndarray:
        with fsspec.open(data, "rb") if isinstance(data, str) else io.BytesIO(data) as f:
            return np.asarray(Image.open(f).convert("RGB"), float)

    with fsspec.open(reference["mask_uri"], "rb") as png:
        labels = np.asarray(Image.open(png))[::factor, ::factor]
    assert len(np.unique(labels)) > 1
    assert row["overlay_uri"] == f"file://{tmp_path}/tiled/overlays/scene.tif.jpg"
    overlay, preview = pixels(row["overlay_uri"]), pixels(preview_uri(row["mask_uri"]))
    decimated = image[::factor, ::factor]
    assert preview.shape == overlay.shape == decimated.shape
    np.testing.assert_array_equal(preview, pixels(encode_jpeg(decimated)))
    np.testing.assert_array_equal(overlay, pixels(encode_overlay(decimated, labels, describe_model(model, {}).palette)))
    jpeg_error = np.abs(preview - decimated).mean()
    whole_decimated = pixels(reference["overlay_uri"])[::factor, ::factor]
    assert np.abs(overlay - whole_decimated).mean() < 2 * jpeg_error  # each overlay's JPEG error (5.4; unblended 18)

    def thumbnail(run: str) -> np.ndarray:
        digest = digest_stats(stats_dataset(f"file://{tmp_path}/{run}/stats"), sample_size=1)
        distribution, palette = digest.heads[PRIMARY_HEAD]
        [item] = gallery(digest.sample, distribution.class_names, palette)
        assert item.data_uri, item.caption
        return pixels(base64.b64decode(item.data_uri.split(",", 1)[1]))

    whole_thumbnail = thumbnail("whole")
    (tmp_path / "in" / "scene.tif").unlink()  # the report shows the tiled image from the job's preview alone
    assert np.abs(thumbnail("tiled") - whole_thumbnail).mean() < 5  # 2.5: decimated vs filtered down


def test_windows_read_ahead_of_the_fcn_actors_are_bounded(ray_cluster):
    """Ray Data's backpressure, as ``limit_read_ahead`` sets it, keeps the windows read but not yet taken by an FCN
    actor to a few. Here the loader is instant and the actor slow: without the limit about half the windows queue."""
    import time

    import pyarrow as pa
    import ray

    from pipelines.segment.pipeline import READ_AHEAD_WINDOWS, limit_read_ahead

    tile_size, windows = 640, 40

    class Loader:  # one window per call, as the loaders read the rows of tiled images
        def __call__(self, batch: pa.Table) -> pa.Table:
            pixels = pa.array([bytes(tile_size * tile_size * 3)], pa.large_binary())
            return batch.append_column("pixels", pixels).append_column("read_at", pa.array([time.time()]))

    class SlowActor:
        def __call__(self, batch: pa.Table) -> pa.Table:
            started = time.time()
            time.sleep(0.05)
            return pa.table({"read_at": batch["read_at"], "started_at": pa.array([started])})

    pool = ray.data.ActorPoolStrategy(size=1)
    ds = ray.data.from_arrow([pa.table({"window": [i]}) for i in range(windows)])
    ds = ds.map_batches(Loader, batch_size=None, batch_format="pyarrow", num_cpus=0, compute=pool)
    ds = ds.map_batches(SlowActor, batch_size=1, batch_format="pyarrow", compute=pool)
    rows = limit_read_ahead(ds, actors=1, tile_size=tile_size).take_all()
    events = sorted([(row["read_at"], 1) for row in rows] + [(row["started_at"], -1) for row in rows])
    queued = np.cumsum([step for _, step in events])
    assert len(rows) == windows and queued.max() <= READ_AHEAD_WINDOWS, queued.max()


def _corrupt_tile(data: bytes, index: int) -> bytes:
    """``data`` with the compressed bytes of tile ``index`` of its first page overwritten."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        offset, count = tif.pages[0].dataoffsets[index], tif.pages[0].databytecounts[index]
    return data[:offset] + b"\x00" * count + data[offset + count :]


def test_a_failed_tile_makes_an_error_row_naming_its_window_and_a_rerun_redoes_only_such_windows(ray_cluster, tmp_path):
    from segment_cases import tiny_checkpoint, upload

    from pipelines.segment import run_segmentation
    from pipelines.segment.listing import list_images
    from pipelines.segment.model import describe_model
    from pipelines.segment.tiles import plan_tiles

    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=4)
    data = _corrupt_tile(
        tiled_tiff(scene(), tile=(128, 128), compression="zlib"), index=4 * 8 + 6
    )  # rows 512:640, columns 768:896
    upload(str(tmp_path / "in"), {"scene.tif": data})
    output = str(tmp_path / "out")
    config = _config(str(tmp_path / "in"), output, model, **TILE_OPTIONS)
    summary = run_segmentation(config)
    assert (summary.ok, summary.error) == (0, 1)
    [row] = _rows(output).values()
    assert row["status"] == "error" and row["mask_uri"] is None
    assert re.match(r"tile: window rows \d+:\d+, columns \d+:\d+: decode: cannot decode tile 38", row["error"]), row[
        "error"
    ]
    assert not (tmp_path / "out" / "masks").exists()  # no mask at the final path

    todo = list_images(config.input, {}).images
    work, [image] = plan_tiles(todo, config, f"file://{output}", describe_model(model, {}))
    redo = work.to_pylist()
    assert 0 < len(redo) < len(image.windows) == 12  # only the windows whose part was not written
    for window in (tuple(r["window"]) for r in redo):  # each touches the corrupt tile (rows 512:640, cols 768:896)
        assert window[0] < 640 and window[1] > 512 and window[2] < 896 and window[3] > 768
    assert row["error"].startswith(f"tile: window rows {redo[0]['window'][0]}:{redo[0]['window'][1]}")


def test_a_tile_size_the_network_cannot_tile_with_is_a_config_error_naming_it(tmp_path):
    from pipelines.segment.config import ConfigError
    from pipelines.segment.model import ModelInfo
    from pipelines.segment.schema import SOURCE_SCHEMA
    from pipelines.segment.tiles import plan_tiles

    model = ModelInfo("m.pt", "v1", {"name": "fcn8s"}, ["a"], [0, 0, 0], output_stride=32, tile_margin=288)
    config = _config(str(tmp_path), str(tmp_path / "out"), "m.pt", tile_size=600)  # 576 < 600 < 576 + 32
    with pytest.raises(ConfigError, match=r"--tile-size: must be at least 608 .* got 600") as error:
        plan_tiles(SOURCE_SCHEMA.empty_table(), config, str(tmp_path / "out"), model)
    assert error.value.param == "--tile-size"
