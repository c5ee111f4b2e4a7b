"""Tiled images on a cluster: the windows of one image spread over the FCN actors, their progress is shown before
the image is assembled, and a model that reads depth maps refuses what it cannot read whole."""

from __future__ import annotations

import io
import json
import logging
import re

import fsspec
import numpy as np
import pyarrow as pa
from test_gigapixel import _config, _rows, scene, tiled_tiff

TILE_OPTIONS = {"tile_pixels": 1, "tile_size": 640}  # the tiny network's margin is 288 px: cores of 352 px
TWO_WINDOWS = (600, 700)  # 1 x 2 windows of 640 px: as many as there are FCN actors


def _work(whole: int, windows_per_image: list[int]) -> pa.Table:
    """A work table as ``plan_tiles`` makes it: ``whole`` images, then the windows of tiled images."""
    rows = [{"key": f"w{i}", "source_size": 10, "window": None, "tile_part": None} for i in range(whole)]
    for image, count in enumerate(windows_per_image):
        part = f"out/_tiles/t{image}"
        rows += [
            {"key": f"t{image}", "source_size": 10, "window": [0, 1, i, i + 1], "tile_part": part} for i in range(count)
        ]
    return pa.Table.from_pylist(rows)


def test_each_window_is_an_input_block_of_its_own_and_whole_images_are_blocked_as_before():
    from pipelines.segment.pipeline import plan_blocks

    work = _work(100, [5, 3])
    blocks = plan_blocks(work, rows=256, megabytes=32, min_blocks=8)
    assert [b.num_rows for b in blocks] == [13] * 7 + [9] + [1] * 8  # ceil(100 / 8) whole images a block
    assert [b["key"][0].as_py() for b in blocks[8:]] == ["t0"] * 5 + ["t1"] * 3
    without_windows = plan_blocks(work.slice(0, 100), rows=256, megabytes=32, min_blocks=8)
    assert [b.num_rows for b in without_windows] == [b.num_rows for b in blocks[:8]]


def test_calls_hold_few_enough_windows_for_every_actor_to_take_some_of_each_image():
    from pipelines.segment.tiles import WINDOWS_PER_CALL, rows_per_call

    assert rows_per_call(_work(50, []), batch_size=16, actors=2) == 16  # ordinary runs: --batch-size
    assert rows_per_call(_work(50, [484]), batch_size=16, actors=2) == WINDOWS_PER_CALL == 2
    assert rows_per_call(_work(0, [4]), batch_size=16, actors=2) == 2  # the 10 MP case: 2 calls of 2 windows
    assert rows_per_call(_work(0, [4, 484]), batch_size=16, actors=4) == 1
    assert rows_per_call(_work(0, [2, 484]), batch_size=16, actors=2) == 1
    assert rows_per_call(_work(0, [1, 484]), batch_size=16, actors=2) == 2  # one window: one actor anyway
    assert rows_per_call(_work(0, [484]), batch_size=1, actors=2) == 1


def test_progress_counts_windows_while_their_images_are_in_flight(monkeypatch, caplog):
    from pipelines.segment import progress
    from pipelines.segment.progress import Progress

    stream = io.StringIO()
    live = Progress(2, windows=4, live=True, stream=stream)
    live.set_segmented(1, windows=3)
    live.update(1, 0, windows=2)
    live.close()
    last = stream.getvalue().split("\r")[-1]
    assert last.startswith(
        "[################--------] 1/2 images windows 3/4 (66.7%) | written: ok 1 error 0 windows 2 |"
    )
    assert "img/s" in last and "windows/s" in last

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="pipelines.segment"):
        logged = Progress(1, windows=484, live=False)
        logged.update(1, 0)  # the image written: the windows still go on
        logged.set_segmented(1, windows=120)
        logged.update(0, 0, windows=118)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("progress: 1/1 images windows 120/484 (24.9%) | written: ok 1 error 0 windows 118 |")

    windows_only = Progress(0, windows=4, live=True, stream=io.StringIO())
    windows_only.set_segmented(0, windows=9)  # a window retried after an actor died is counted twice: clamped
    assert windows_only.line().startswith("windows 4/4 (100.0%) | written: ok 0 error 0 windows 0 | ")


def test_fcn_actors_that_start_late_still_take_windows(ray_cluster):
    """``start_actors_first``: Ray Data starts every pool's first actors before any block flows. Without it the
    first FCN actor up takes the first calls, as many as Ray Data queues on an actor (2), here both windows, before
    the second has started. Each call waits (up to ``wait_s``) for the other actor to take a window, so the test
    does not depend on how soon Ray Data dispatches the second window: on a loaded machine its backpressure held a
    loader's output for seconds, and an actor free again by then took it."""
    import time

    import ray

    from pipelines.segment.pipeline import start_actors_first

    tile_size, late_s, wait_s = 640, 8.0, 30.0

    @ray.remote(num_cpus=0)
    class Calls:
        def __init__(self) -> None:
            self.started, self.took = 0, set()

        def start(self) -> int:
            self.started += 1
            return self.started

        def take(self, actor: int) -> bool:
            """Note a window taken by ``actor``; whether another actor has taken one."""
            self.took.add(actor)
            return len(self.took) > 1

    class Loader:
        def __call__(self, batch: pa.Table) -> pa.Table:
            return batch.append_column("pixels", pa.array([bytes(tile_size * tile_size * 3)], pa.large_binary()))

    class FcnActor:
        def __init__(self, calls) -> None:
            self.calls = calls
            self.order = ray.get(calls.start.remote())
            time.sleep(0 if self.order == 1 else late_s)

        def __call__(self, batch: pa.Table) -> pa.Table:
            deadline = time.monotonic() + wait_s
            while not ray.get(self.calls.take.remote(self.order)) and time.monotonic() < deadline:
                time.sleep(0.2)
            return pa.table({"actor": [self.order] * batch.num_rows})

    ds = ray.data.from_arrow([pa.table({"window": [i]}) for i in range(2)])
    pool = ray.data.ActorPoolStrategy(size=1)
    ds = ds.map_batches(Loader, batch_size=None, batch_format="pyarrow", num_cpus=0, compute=pool)
    ds = ds.map_batches(
        FcnActor,
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=2),
        fn_constructor_kwargs={"calls": Calls.remote()},
    )
    ds = start_actors_first(ds, fit=True)
    actors = [row["actor"] for row in ds.take_all()]
    assert sorted(actors) == [1, 2], actors


def test_the_windows_of_one_image_spread_over_the_fcn_actors(ray_cluster, tmp_path, monkeypatch, caplog):
    """Two FCN actors and an image of two windows: each actor does one. The progress lines (``--no-progress``)
    count the windows as they are done, before the image is assembled."""
    from segment_cases import tiny_checkpoint, upload

    from pipelines.segment import progress, run_segmentation

    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=4)
    image = scene()[: TWO_WINDOWS[0], : TWO_WINDOWS[1]]
    upload(str(tmp_path / "in"), {"two.tif": tiled_tiff(image, tile=(128, 128))})
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a progress line at every change
    output = f"file://{tmp_path}/out"
    with caplog.at_level(logging.INFO, logger="pipelines.segment"):
        summary = run_segmentation(_config(str(tmp_path / "in"), output, model, actors=2, **TILE_OPTIONS))
    assert (summary.ok, summary.error) == (1, 0), summary.errors
    assert _rows(output)["two.tif"]["status"] == "ok"
    manifest = json.loads(fsspec.open(summary.manifest_uri).open().read())
    [tiled] = manifest["tiled_images"]
    assert (tiled["tiles"], tiled["fcn_actors"]) == (2, 2)

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress: ")]
    assert lines[-1].startswith("progress: windows 2/2 (100.0%) | written: ok 0 error 0 windows 2 |"), lines
    counts = [int(line.split("windows ")[1].split("/")[0]) for line in lines]
    assert counts == sorted(counts), lines


def test_a_depth_model_reads_tiled_tiffs_whole_and_refuses_those_above_the_limit_by_name(ray_cluster, tmp_path):
    """An RGB-HHA model: its depth maps are PNGs, read whole, so its images are too (never by window). A tiled TIFF
    within --max-image-pixels is segmented whole; one above it is an error row naming the limit and why, not the
    tiled formats' own lack of one, and is not fetched."""
    from PIL import Image
    from segment_cases import tiny_checkpoint, upload

    from pipelines.segment import run_segmentation

    model = tiny_checkpoint(str(tmp_path / "rgbhha.pt"), num_classes=4, arch="fcn32s_rgbhha_vgg16")
    sizes = {"big": (700, 900), "medium": (400, 500)}
    upload(
        str(tmp_path / "in"),
        {f"{name}.tif": tiled_tiff(scene()[:h, :w], tile=(128, 128)) for name, (h, w) in sizes.items()},
    )
    rng = np.random.default_rng(0)
    for name, (height, width) in sizes.items():
        (tmp_path / "depth").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(500, 6000, (height, width)).astype(np.uint16)).save(
            tmp_path / "depth" / f"{name}.png"
        )
    output = str(tmp_path / "out")
    config = _config(
        str(tmp_path / "in"), output, model, depth=str(tmp_path / "depth"), max_image_pixels=300_000, **TILE_OPTIONS
    )
    summary = run_segmentation(config)
    assert (summary.ok, summary.error) == (1, 1), summary.errors
    rows = _rows(output)
    assert rows["medium.tif"]["status"] == "ok" and rows["medium.tif"]["mask_uri"].endswith("medium.tif.png")
    assert rows["big.tif"]["status"] == "error" and rows["big.tif"]["read_ms"] is None  # refused from its header
    assert re.fullmatch(
        r"decode: 900x700 = 630,000 pixels, more than the limit of 300,000 \(--max-image-pixels\) of images read "
        r"whole: a model that reads depth maps \(RGB-D/HHA\) .* for RGB models only",
        rows["big.tif"]["error"],
    ), rows["big.tif"]["error"]
    manifest = json.loads(fsspec.open(summary.manifest_uri).open().read())
    assert manifest["tiled_images"] == []


def test_every_fcn_actor_stays_busy_on_the_windows_of_one_image(ray_cluster):
    """``limit_read_ahead`` bounds the windows read ahead, yet leaves every FCN actor a call to run: with an instant
    loader, calls of 2 windows and a writer, each of 2 actors takes about half of 24 windows. With half the budget,
    Ray Data's share for the FCN actors held one call at a time: one actor took them all."""
    import os
    import time

    import ray

    from pipelines.segment.pipeline import limit_read_ahead, start_actors_first

    tile_size, windows = 2048, 24

    class Loader:
        def __call__(self, batch: pa.Table) -> pa.Table:
            return batch.append_column("pixels", pa.array([bytes(tile_size * tile_size * 3)], pa.large_binary()))

    class FcnActor:
        def __call__(self, batch: pa.Table) -> pa.Table:
            time.sleep(0.2 * batch.num_rows)
            return pa.table({"actor": [os.getpid()] * batch.num_rows})

    class Writer:
        def __call__(self, batch: pa.Table) -> pa.Table:
            return batch

    ds = ray.data.from_arrow([pa.table({"window": [i]}) for i in range(windows)])
    pool = ray.data.ActorPoolStrategy(size=1)
    ds = ds.map_batches(Loader, batch_size=None, batch_format="pyarrow", num_cpus=0, compute=pool)
    ds = ds.map_batches(FcnActor, batch_size=2, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=2))
    ds = ds.map_batches(Writer, batch_size=2, batch_format="pyarrow", num_cpus=0, compute=pool)
    ds = start_actors_first(limit_read_ahead(ds, actors=2, tile_size=tile_size), fit=True)
    taken = sorted(np.unique([row["actor"] for row in ds.take_all()], return_counts=True)[1].tolist())
    assert len(taken) == 2 and taken[0] >= windows // 4, taken
