"""The masks of tiled images as standard tools read them, and tiled TIFFs whose Orientation tag turns them.

The job segments a small tiled GeoTIFF and two turned tiled TIFFs by windows (the tile threshold forced low) and
whole; the tiled masks are then opened by GDAL (through rasterio's wheel, which bundles it; QGIS reads rasters
through GDAL, so what GDAL reports here is what QGIS overlays) and by OpenSlide (its "generic tiled TIFF" format,
as whole-slide viewers built on it read the mask).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_gigapixel import GEOTAGS, TILE_OPTIONS, _config, _rows, noise, scene, tiled_tiff

from pipelines.common.decode import decode_image
from pipelines.segment import mask_tiff, tiff

OVERVIEW_SIDE = 256
"""The masks' overview side in these runs, so that the 700 x 900 scene's mask is a pyramid of factors 1, 2 and 4."""
FACTORS = (1, 2, 4)
TURNED = {"turned.tif": 6, "upside-down.tif": 3}
"""Tiled TIFFs of the scene with an Orientation tag other than 1 (90 degrees clockwise, 180 degrees)."""


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory) -> dict[str, Any]:
    """The job over a tiled GeoTIFF and the ``TURNED`` TIFFs, once by windows and once whole (local files)."""
    from segment_cases import tiny_checkpoint, upload

    from pipelines.segment import run_segmentation
    from pipelines.segment.model import describe_model

    root = tmp_path_factory.mktemp("mask-readers")
    model = tiny_checkpoint(str(root / "model.pt"), num_classes=4)
    files = {"geo.tif": tiled_tiff(scene(), tile=(128, 128), compression="zlib", extratags=GEOTAGS)}
    for name, orientation in TURNED.items():
        files[name] = tiled_tiff(
            scene(), tile=(128, 128), compression="zlib", extratags=[(274, 3, 1, orientation, True)]
        )
    upload(str(root / "in"), files)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mask_tiff, "OVERVIEW_SIDE", OVERVIEW_SIDE)  # the masks are written by the driver
        tiled = run_segmentation(_config(str(root / "in"), str(root / "tiled"), model, **TILE_OPTIONS))
    whole = run_segmentation(_config(str(root / "in"), str(root / "whole"), model))
    assert (tiled.ok, tiled.error, whole.ok, whole.error) == (3, 0, 3, 0), tiled.errors
    return {
        "in": root / "in",
        "tiled": _rows(str(root / "tiled")),
        "whole": _rows(str(root / "whole")),
        "palette": np.array(describe_model(model, {}).palette, np.uint8).reshape(-1, 3),
    }


def _path(uri: str) -> str:
    return uri.removeprefix("file://")


def _whole_labels(runs: dict[str, Any], key: str) -> np.ndarray:
    return np.asarray(Image.open(_path(runs["whole"][key]["mask_uri"])))


def test_gdal_reads_the_mask_with_the_sources_georeferencing_overview_labels_and_colours(runs):
    import rasterio

    labels = _whole_labels(runs, "geo.tif")
    assert len(np.unique(labels)) > 1
    mask_path = _path(runs["tiled"]["geo.tif"]["mask_uri"])
    with rasterio.open(runs["in"] / "geo.tif") as source, rasterio.open(mask_path) as mask:
        assert (mask.width, mask.height, mask.count) == (source.width, source.height, 1)
        assert mask.crs == source.crs and mask.crs.to_epsg() == 32633
        assert mask.transform == source.transform == rasterio.Affine(0.5, 0, 500000, 0, -0.5, 4200000)
        assert mask.overviews(1) == [2, 4]
        window = rasterio.windows.Window(col_off=130, row_off=37, width=600, height=500)
        np.testing.assert_array_equal(mask.read(1, window=window), labels[37:537, 130:730])
        colours = mask.colormap(1)
        assert [colours[label][:3] for label in range(4)] == [tuple(rgb) for rgb in runs["palette"][:4]]
    for overview_level, factor in enumerate(FACTORS[1:]):
        with rasterio.open(mask_path, overview_level=overview_level) as overview:
            np.testing.assert_array_equal(overview.read(1), labels[::factor, ::factor])


def test_openslide_reads_the_mask_as_a_pyramid_of_label_colours(runs):
    import openslide

    labels = _whole_labels(runs, "geo.tif")
    mask_path = _path(runs["tiled"]["geo.tif"]["mask_uri"])
    assert openslide.OpenSlide.detect_format(mask_path) == "generic-tiff"
    with openslide.OpenSlide(mask_path) as slide:
        assert slide.level_dimensions == ((900, 700), (450, 350), (225, 175))  # the full resolution, ..., the overview
        region = np.asarray(slide.read_region((130, 37), 0, (600, 500)))
        np.testing.assert_array_equal(region[..., :3], runs["palette"][labels[37:537, 130:730]])
        assert (region[..., 3] == 255).all()
        for level, factor in enumerate(FACTORS[1:], 1):
            reduced = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]))
            np.testing.assert_array_equal(reduced[..., :3], runs["palette"][labels[::factor, ::factor]])


@pytest.mark.parametrize("key", sorted(TURNED))
def test_a_turned_tiled_tiff_is_masked_as_the_whole_image_shows_it(runs, key):
    """The windows are read as displayed (Orientation applied, as Pillow does on the whole-image path), so the
    network sees the same pixels: the mask and the row equal the whole image's."""
    row, reference = runs["tiled"][key], runs["whole"][key]
    labels = _whole_labels(runs, key)
    assert labels.shape == ((900, 700) if TURNED[key] == 6 else (700, 900))
    with tifffile.TiffFile(_path(row["mask_uri"])) as mask:
        [series] = mask.series
        assert len(series.levels) == len(FACTORS)
        for factor, level in zip(FACTORS, series.levels):
            np.testing.assert_array_equal(level.asarray(), labels[::factor, ::factor])
    assert (row["width"], row["height"]) == (reference["width"], reference["height"]) == labels.shape[::-1]
    assert row["pixel_counts"] == reference["pixel_counts"]
    assert row["mean_confidence"] == pytest.approx(reference["mean_confidence"], rel=1e-9)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_windows_of_a_turned_tiff_are_those_of_the_image_as_displayed(tmp_path, orientation):
    data = tiled_tiff(noise(300, 500), tile=(64, 128), compression="zlib", extratags=[(274, 3, 1, orientation, True)])
    (tmp_path / "image.tif").write_bytes(data)
    shown = decode_image(data, max_pixels=10**6)  # the whole-image path: Pillow applies the orientation
    with tiff.WindowReader(str(tmp_path / "image.tif"), {}) as reader:
        height, width = reader.layout.height, reader.layout.width
        assert (height, width) == shown.shape[:2] == ((500, 300) if orientation > 4 else (300, 500))
        for y0, y1, x0, x1 in [(0, height, 0, width), (37, 211, 130, 299), (5, 6, 7, 9)]:
            np.testing.assert_array_equal(reader.read(y0, y1, x0, x1), shown[y0:y1, x0:x1], err_msg=str((y0, x0)))
        np.testing.assert_array_equal(reader.read_decimated(7), shown[::7, ::7])


def test_gdal_and_openslide_read_every_level_of_the_masks_pyramid(tmp_path, monkeypatch):
    """GDAL lists the mask's reduced levels as overviews of factors 2, 4, 8, ...; OpenSlide's generic TIFF, which
    takes only tiled pages as levels, lists the same levels; both read each as the labels' every n-th pixel."""
    import openslide
    import rasterio

    monkeypatch.setattr(mask_tiff, "OVERVIEW_SIDE", 128)
    labels = (np.arange(600)[:, None] // 7 + np.arange(1100)[None, :] // 11).astype(np.uint8) % 5
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
    mask_tiff.write_mask(str(tmp_path / "mask.tif"), 600, 1100, [labels], palette=palette.ravel().tolist())
    factors = [1, 2, 4, 8, 16]  # 1100 / 16 = 68.75: the first level of at most 128 px
    with rasterio.open(tmp_path / "mask.tif") as mask:
        assert mask.overviews(1) == factors[1:]
    for overview_level, factor in enumerate(factors[1:]):
        with rasterio.open(tmp_path / "mask.tif", overview_level=overview_level) as overview:
            np.testing.assert_array_equal(overview.read(1), labels[::factor, ::factor], err_msg=str(factor))
    with openslide.OpenSlide(str(tmp_path / "mask.tif")) as slide:
        assert slide.level_dimensions == tuple((-(-1100 // f), -(-600 // f)) for f in factors)
        for level, factor in enumerate(factors):
            region = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]))
            np.testing.assert_array_equal(region[..., :3], palette[labels[::factor, ::factor]], err_msg=str(factor))


KEYS_POINT = GEOTAGS[2][:3] + (tuple(2 if i == 11 else v for i, v in enumerate(GEOTAGS[2][3])), True)
GEOREFERENCING = {
    "scale": GEOTAGS,
    "scale-pixel-is-point": [GEOTAGS[0], GEOTAGS[1], KEYS_POINT, GEOTAGS[3]],
    "rotated-transformation": [
        (34264, 12, 16, (0.5, 0.1, 0, 500000, 0.2, -0.5, 0, 4200000, 0, 0, 0, 0, 0, 0, 0, 1), True),
        *GEOTAGS[2:],
    ],
    "ground-control-points": [
        (
            33922,
            12,
            18,
            (
                10.5,
                20.5,
                0,
                500000,
                4200000,
                0,
                400.5,
                30.5,
                0,
                500200,
                4199990,
                0,
                200.5,
                250.5,
                0,
                500100,
                4199900,
                0,
            ),
            True,
        ),
        *GEOTAGS[2:],
    ],
}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("georeferencing", sorted(GEOREFERENCING))
def test_a_mask_drawn_as_displayed_overlays_its_turned_geotiff_in_gdal(tmp_path, orientation, georeferencing):
    """GDAL draws a GeoTIFF's stored pixels whatever its Orientation; the mask, drawn as displayed, is georeferenced
    (``WindowReader.geotags``) so that each of its pixels lands on the ground where the same source pixel lies."""
    import rasterio

    stored = noise(300, 500)
    tags = [*GEOREFERENCING[georeferencing], (274, 3, 1, orientation, True)]
    (tmp_path / "scene.tif").write_bytes(tiled_tiff(stored, tile=(64, 64), extratags=tags))
    with tiff.WindowReader(str(tmp_path / "scene.tif"), {}) as reader:
        shown = reader.read(0, reader.layout.height, 0, reader.layout.width)[..., 0]  # the red channel as labels
        mask_tiff.write_mask(str(tmp_path / "mask.tif"), *shown.shape, [shown], extratags=reader.geotags)
    rng = np.random.default_rng(orientation)
    rows, columns = rng.integers(0, shown.shape[0], 200), rng.integers(0, shown.shape[1], 200)
    with rasterio.open(tmp_path / "scene.tif") as source, rasterio.open(tmp_path / "mask.tif") as mask:
        assert mask.crs == source.crs
        if georeferencing == "ground-control-points":
            (source_points, _), (mask_points, _) = source.gcps, mask.gcps
            assert [(p.x, p.y) for p in mask_points] == [(p.x, p.y) for p in source_points]
            pairs = [(int(s.row), int(s.col), int(m.row), int(m.col)) for s, m in zip(source_points, mask_points)]
        else:
            xs, ys = mask.xy(rows, columns)
            pairs = [(*source.index(x, y), r, c) for x, y, r, c in zip(xs, ys, rows, columns)]
        band = source.read(1)
        assert [band[r, c] for r, c, _, _ in pairs] == [shown[r, c] for _, _, r, c in pairs]
