"""The segmentation pipeline on a real local Ray cluster, against loopback S3 (moto) and local folders."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import fsspec
import numpy as np
import polars
import pyarrow.parquet as pq
import pytest
from PIL import Image
from segment_cases import awkward_images, displayed, good_images, tiny_checkpoint, upload

import fcn
from pipelines import segment
from pipelines.segment import SegmentConfig, infer, run_segmentation
from pipelines.segment.keys import output_name

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4


def _config(input: str, output: str, model: str, **kwargs) -> SegmentConfig:
    small = {"actors": 1, "cpus_per_actor": 1, "batch_size": 4, "progress": False}
    return SegmentConfig(input=input, output=output, model=model, **(small | kwargs))


def _stats(output: str):
    fs, root = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()
    return pq.read_table(f"{root}/stats", filesystem=fs)


def _check_one_row_per_key(table, keys: set[str]) -> None:
    rows = table["key"].to_pylist()
    assert len(rows) == len(set(rows)) and set(rows) == keys


def _check_masks(output: str, table, files: dict[str, bytes], model_uri: str) -> None:
    """Every ok row's mask: palette PNG of the displayed size whose pixels are the network's labels
    and whose class counts are the row's pixel_counts."""
    checkpoint = fcn.load_checkpoint(model_uri)
    predictor = fcn.Predictor.from_checkpoint(checkpoint, device="cpu")
    for row in table.to_pylist():
        if row["status"] != "ok":
            continue
        with fsspec.open(row["mask_uri"], "rb") as f:
            mask = Image.open(io.BytesIO(f.read()))
        image = displayed(files[row["key"]])
        assert row["mask_uri"] == f"{output}/masks/{output_name(row['key'])}.png"
        assert mask.mode == "P" and mask.size == image.size == (row["width"], row["height"])
        assert mask.getpalette()[: 3 * NUM_CLASSES] == checkpoint.palette[: 3 * NUM_CLASSES]
        labels = np.asarray(mask)
        expected = predictor(image).labels
        assert (labels == expected).mean() > 0.99  # same network, same pixels (ties aside)
        counts = np.bincount(labels.ravel(), minlength=NUM_CLASSES)
        assert row["pixel_counts"] == counts.tolist() and sum(row["pixel_counts"]) == row["width"] * row["height"]
        assert np.isclose(sum(row["class_fractions"]), 1.0) and row["dominant_class"] == int(counts.argmax())
        assert 0.0 < row["mean_confidence"] <= 1.0


def test_s3_bucket_end_to_end_then_reruns_skip_done_images(ray_cluster: None, s3_bucket: str) -> None:
    model = tiny_checkpoint(f"{s3_bucket}/registry/model.pt", num_classes=NUM_CLASSES)
    odd, expected = awkward_images()
    files = {**good_images(count=3), **odd}
    upload(f"{s3_bucket}/incoming", files)
    output = f"{s3_bucket}/results"
    config = _config(f"{s3_bucket}/incoming", output, model, rows_per_file=5)

    summary = run_segmentation(config)

    errors = {k for k, v in expected.items() if v != "ok"}
    assert (summary.ok, summary.error, summary.skipped) == (len(files) - len(errors), len(errors), 0)
    table = _stats(output)
    _check_one_row_per_key(table, set(files))
    assert len({r["run_id"] for r in table.to_pylist()}) == 1 and summary.listed == len(files)
    for row in table.to_pylist():
        if row["key"] in errors:
            assert row["status"] == "error" and expected[row["key"]] in row["error"] and row["mask_uri"] is None
        else:
            assert row["status"] == "ok" and row["error"] is None, row
        assert row["source_size"] == len(files[row["key"]]) and row["source_etag"]
        assert row["image_uri"] == f"{s3_bucket}/incoming/{row['key']}"
    _check_masks(output, table, files, model)
    assert json.loads(table.schema.metadata[b"class_names"]) == [f"class_{i}" for i in range(NUM_CLASSES)]
    fs, root = fsspec.core.url_to_fs(output)
    assert fs.isfile(f"{root}/_SUCCESS")
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    assert manifest["run_id"] == summary.run_id and (manifest["ok"], manifest["error"]) == (summary.ok, summary.error)
    assert manifest["model_id"] == model
    stats_files = [path.rsplit("/", 1)[-1] for path in fs.find(f"{root}/stats")]
    assert len(files) > 5 and len(stats_files) == 1  # the parts of rows_per_file=5 rows, merged at the end
    assert stats_files[0].startswith(f"part-{summary.run_id}-merged-")
    assert 0 < summary.startup_s < summary.duration_s and manifest["startup_s"] == summary.startup_s
    assert summary.end_to_end_images_per_second == pytest.approx(
        (summary.ok + summary.error) / summary.duration_s, rel=0.01
    )

    # Rerun after adding images and changing one: those are processed, error rows are retried,
    # the other ok images are skipped; still exactly one row per image.
    changed = "photos/night/img0_0.jpg"
    extra = good_images(seed=7, count=2)
    upload(f"{s3_bucket}/incoming", {**extra, changed: next(iter(good_images(seed=9, count=1).values()))})
    again = run_segmentation(config)
    assert (again.ok, again.error, again.skipped) == (len(extra) + 1, len(errors), summary.ok - 1)
    table = _stats(output)
    _check_one_row_per_key(table, set(files) | set(extra))
    runs = {r["key"]: r["run_id"] for r in table.to_pylist()}
    assert runs[changed] == runs["odd/zero.jpg"] == again.run_id and runs["odd/cmyk.jpg"] == summary.run_id


def test_local_folder_manifest_overlays_and_an_actor_killed_mid_run(
    ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input from a manifest file in a local folder, with overlays; the FCN actor kills its own
    process on its first batch: Ray restarts it, retries the batch, and every image lands once."""
    import cloudpickle

    marker = tmp_path / "crash-once"
    marker.touch()

    class CrashOnce(infer.Segmenter):
        def __call__(self, batch):
            try:
                os.remove(marker)
            except FileNotFoundError:
                return super().__call__(batch)
            os._exit(1)

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    monkeypatch.setattr(infer, "Segmenter", CrashOnce)
    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=NUM_CLASSES)
    files = good_images(seed=3, count=9)
    upload(str(tmp_path / "in"), files)
    chosen = sorted(files)[:8]
    manifest = tmp_path / "in" / "todo.txt"
    manifest.write_text("\n".join(chosen) + "\n")
    output = f"file://{tmp_path}/out"

    summary = run_segmentation(_config(str(manifest), output, model, overlays=True, batch_size=2))

    assert not marker.exists()  # the actor really died once
    assert (summary.ok, summary.error) == (len(chosen), 0)
    table = _stats(output)
    _check_one_row_per_key(table, {key.split("/", 1)[1] for key in chosen})  # relative to the common folder
    [(count, pixels, area)] = duckdb.sql(
        f"select count(*), sum(list_sum(pixel_counts)), sum(width * height) "
        f"from read_parquet('{tmp_path}/out/stats/**/*.parquet') where status = 'ok'"
    ).fetchall()
    assert count == len(chosen) and pixels == area
    frame = polars.read_parquet(f"{tmp_path}/out/stats/*.parquet")
    assert frame.height == len(chosen)
    assert (frame["pixel_counts"].list.sum() == frame["width"] * frame["height"]).all()
    for row in table.to_pylist():
        overlay = Image.open(row["overlay_uri"].removeprefix("file://"))
        assert overlay.size == (row["width"], row["height"])


def test_interrupted_run_resumes_with_each_image_once(ray_cluster: None, tmp_path: Path) -> None:

    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=NUM_CLASSES)
    files = good_images(seed=11, count=24)
    upload(str(tmp_path / "in"), files)
    output = tmp_path / "out"
    output.mkdir()
    (output / "_SUCCESS").write_text("stale marker of an earlier run")
    driver = subprocess.Popen(
        _one_image_per_part_command(tmp_path / "in", output, model),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not list((output / "stats").glob("*.parquet")):
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no stats part file appeared"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)  # the driver dies mid-run, without any cleanup
    finally:
        driver.wait(30)
    assert not (output / "_SUCCESS").exists()  # the stale marker was removed at the start
    settled, seen = time.monotonic(), None
    while time.monotonic() - settled < 3:  # a writer of the dead driver's job may finish one last part
        parts = sorted((output / "stats").glob("*.parquet"))
        if parts != seen:
            settled, seen = time.monotonic(), parts
        time.sleep(0.2)
    partial = _stats(str(output))
    finished = {row["key"]: row["run_id"] for row in partial.to_pylist() if row["status"] == "ok"}
    assert 0 < len(finished) < len(files)

    config = _config(str(tmp_path / "in"), str(output), model)
    summary = run_segmentation(config)

    # every image the first run finished is skipped, none is redone, and only the others are segmented
    assert (summary.skipped, summary.ok) == (len(finished), len(files) - len(finished))
    final = _stats(str(output))
    _check_one_row_per_key(final, set(files))
    runs = {row["key"]: row["run_id"] for row in final.to_pylist()}
    assert {key: runs[key] for key in finished} == finished
    assert {runs[key] for key in set(files) - set(finished)} == {summary.run_id}
    assert (output / "_SUCCESS").exists()
    again = run_segmentation(config)  # nothing left to do: no Ray work, a fresh manifest and _SUCCESS
    assert (again.ok, again.error, again.skipped) == (0, 0, len(files))
    assert json.loads((output / "manifest.json").read_text())["run_id"] == again.run_id


def test_storage_options_reach_input_output_and_a_registry_model(
    ray_cluster: None, private_s3_options: dict, tmp_path: Path
) -> None:
    """Input, output and model (a registry copied from a local disk) all live on an S3 endpoint that
    only ``storage_options`` reach: the environment points at another endpoint without that bucket."""
    from fcn import registry

    options = private_s3_options
    fs = fsspec.filesystem("s3", **options)
    fs.mkdir("private")
    local_registry = tmp_path / "registry"
    version = registry.register_model(
        str(local_registry), tiny_checkpoint(str(tmp_path / "model.pt")), {"mean_iu": 0.5}
    )
    registry.promote(str(local_registry), version)
    fs.put(str(local_registry), "private/registry", recursive=True)
    files = good_images(seed=11, count=5)
    for key, data in files.items():
        fs.pipe_file(f"private/in/{key}", data)

    summary = run_segmentation(
        _config("s3://private/in", "s3://private/out", "s3://private/registry", storage_options=options)
    )

    assert (summary.ok, summary.error) == (5, 0)
    assert summary.model_id == "s3://private/registry/models/v0001/checkpoint.pt"
    assert not fsspec.filesystem("s3", skip_instance_cache=True).exists("private")  # nothing via the environment
    fs.invalidate_cache()
    table = pq.read_table("private/out/stats", filesystem=fs)
    assert sorted(table["key"].to_pylist()) == sorted(files) and set(table["status"].to_pylist()) == {"ok"}
    assert all(fs.exists(uri) for uri in table["mask_uri"].to_pylist())
    # Without the options the model is looked up through the environment, and the error names --model.
    with pytest.raises(segment.ConfigError, match="--model"):
        run_segmentation(_config("s3://private/in", "s3://private/out2", "s3://private/registry"))


def test_progress_counts_images_as_actors_segment_them(
    ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bar follows the FCN actors, not the Parquet parts: with one part for the whole run, it shows
    the first batch segmented (written 0) while the actor holds the second batch back."""
    import threading

    import cloudpickle

    release, first = tmp_path / "release", tmp_path / "first-batch-rows"

    class HoldSecondBatch(infer.Segmenter):
        calls = 0

        def __call__(self, batch):
            HoldSecondBatch.calls += 1
            if HoldSecondBatch.calls == 1:  # Ray Data may bundle blocks into a first batch of any size
                first.write_text(str(batch.num_rows))
            deadline = time.monotonic() + 120
            while HoldSecondBatch.calls > 1 and not release.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            return super().__call__(batch)

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(infer, "Segmenter", HoldSecondBatch)
    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=NUM_CLASSES)
    upload(str(tmp_path / "in"), good_images(seed=5, count=9))
    config = _config(str(tmp_path / "in"), str(tmp_path / "out"), model, progress=True)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=run_segmentation(config)))
    thread.start()
    shown, expected, deadline = "", None, time.monotonic() + 120
    try:
        while (expected is None or expected not in shown) and time.monotonic() < deadline:
            time.sleep(0.1)
            shown += capsys.readouterr().err
            if expected is None and first.exists() and first.read_text():
                rows = int(first.read_text())
                expected = f"{rows}/9 images ({100 * rows / 9:.1f}%) | written: ok 0 error 0"
    finally:
        release.touch()
        thread.join(timeout=300)
    shown += capsys.readouterr().err
    assert expected is not None and int(first.read_text()) < 9
    assert expected in shown, shown.split("\r")
    assert result["summary"].ok == 9
    assert "9/9 images (100.0%) | written: ok 9 error 0" in shown.split("\r")[-1]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_hostile_s3_keys_get_one_row_each_and_nothing_lands_outside_the_output(
    ray_cluster: None, s3_bucket: str, tmp_path: Path, where: str
) -> None:
    """Object names with '.', '..', empty segments, backslashes and C0/C1 control characters, written
    with overlays to a local folder or to S3: every object gets one row; those that cannot name a file
    under the output are 'key:' error rows, ``in/x.png`` and ``in//x.png`` never share a mask, and names
    holding '?', '#' or '%' get masks and overlays of their own (escaped), where the row says."""
    import s3fs

    image = next(iter(good_images(seed=2, count=1).values()))
    escaped = {  # key: output name
        "ok.png": "ok.png",
        "x.png": "x.png",
        "q?x=1.png": "q%3Fx=1.png",
        "h#f.png": "h%23f.png",
        "q%3Fx=1.png": "q%253Fx=1.png",
    }
    keys = [
        *escaped,
        "/x.png",
        "./dot.png",
        "/double.png",
        "../../../escape.png",
        "a/../../../../escape2.png",
        "back\\slash.png",
        "tab\there.png",
        "nel\x85.png",
    ]
    fs = s3fs.S3FileSystem()
    bucket = s3_bucket.removeprefix("s3://")
    for key in keys:
        fs.pipe_file(f"{bucket}/in/{key}", image)
    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=NUM_CLASSES)
    sandbox = tmp_path / "sandbox"
    output = f"file://{sandbox}/deep/out" if where == "local" else f"{s3_bucket}/deep/out"

    summary = run_segmentation(_config(f"{s3_bucket}/in", output, model, overlays=True))

    assert (summary.listed, summary.ok, summary.error) == (len(keys), len(escaped), len(keys) - len(escaped))
    table = _stats(output)
    _check_one_row_per_key(table, set(keys))
    for row in table.to_pylist():
        if row["key"] in escaped:
            name = escaped[row["key"]]
            assert row["status"] == "ok" and row["mask_uri"] == f"{output}/masks/{name}.png", row
            assert row["overlay_uri"] == f"{output}/overlays/{name}.jpg", row
        else:
            assert row["status"] == "error" and row["error"].startswith("key: ") and row["mask_uri"] is None, row
            assert row["overlay_uri"] is None
    if where == "local":
        written = {f"{p.relative_to(sandbox).as_posix()}" for p in sandbox.rglob("*") if p.is_file()}
    else:
        fs.invalidate_cache()
        written = {p.removeprefix(f"{bucket}/") for p in fs.find(bucket) if not p.startswith(f"{bucket}/in/")}
    assert all(p.startswith("deep/out/") for p in written), written
    assert {p for p in written if "/masks/" in p} == {f"deep/out/masks/{name}.png" for name in escaped.values()}
    assert {p for p in written if "/overlays/" in p} == {f"deep/out/overlays/{name}.jpg" for name in escaped.values()}


def test_images_whose_names_hold_a_query_get_masks_of_their_own_on_s3(
    ray_cluster: None, s3_bucket: str, tmp_path: Path
) -> None:
    """s3fs reads 'a?versionId=1.png' as object 'a' (version '1.png'): local images named so, written to
    S3, would share one mask. Each gets its own mask and overlay, under its escaped name, of its own size."""
    images = list(good_images(seed=31, count=4).values())  # four sizes
    files = dict(zip(["a.png", "a?versionId=1.png", "a?versionId=2.png", "a%3FversionId=1.png"], images))
    upload(str(tmp_path / "in"), files)
    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=NUM_CLASSES)
    output = f"{s3_bucket}/out"

    summary = run_segmentation(_config(str(tmp_path / "in"), output, model, overlays=True))

    assert (summary.ok, summary.error) == (len(files), 0)
    table = _stats(output)
    _check_one_row_per_key(table, set(files))
    fs, root = fsspec.core.url_to_fs(output)
    masks = sorted(p.removeprefix(f"{root}/masks/") for p in fs.find(f"{root}/masks"))
    assert masks == ["a%253FversionId=1.png.png", "a%3FversionId=1.png.png", "a%3FversionId=2.png.png", "a.png.png"]
    assert len(fs.find(f"{root}/overlays")) == len(files)
    _check_masks(output, table, files, model)  # each mask has its own image's size and labels


@pytest.mark.parametrize("stage", ["loader", "segmenter"])
def test_an_image_that_ends_the_process_every_time_becomes_one_error_row(
    ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """A loader or FCN actor whose process dies whenever one image is in its call (a decoder's crash, a fatal
    device error): Ray restarts it and retries; the image is isolated and given up after CRASH_LIMIT deaths,
    and every other image lands once."""
    import cloudpickle

    from pipelines.segment import load
    from pipelines.segment.crashes import CRASH_LIMIT

    deaths = tmp_path / "deaths"
    deaths.mkdir()
    files = good_images(seed=5, count=8)
    poison = sorted(files)[3]

    def die_on_poison(batch) -> None:
        errors = batch["error"].to_pylist() if "error" in batch.column_names else [None] * batch.num_rows
        poisoned = any(uri.endswith(poison) and not error for uri, error in zip(batch["image_uri"].to_pylist(), errors))
        count = len(os.listdir(deaths))
        if poisoned and count < CRASH_LIMIT + 2:  # a few more than the limit: without the guard, ok rows, not a hang
            (deaths / str(count)).touch()
            os._exit(1)

    class PoisonedLoader(load.ImageLoader):
        def load(self, batch):
            die_on_poison(batch)
            return super().load(batch)

    class PoisonedSegmenter(infer.Segmenter):
        def _segment(self, batch):
            die_on_poison(batch)
            return super()._segment(batch)

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    if stage == "loader":
        monkeypatch.setattr(load, "ImageLoader", PoisonedLoader)
    else:
        monkeypatch.setattr(infer, "Segmenter", PoisonedSegmenter)
    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=NUM_CLASSES)
    upload(str(tmp_path / "in"), files)
    output = f"file://{tmp_path}/out"

    summary = run_segmentation(_config(str(tmp_path / "in"), output, model, batch_size=4))

    assert len(os.listdir(deaths)) == CRASH_LIMIT
    assert (summary.ok, summary.error) == (len(files) - 1, 1)
    table = _stats(output)
    _check_one_row_per_key(table, set(files))
    [failed] = [row for row in table.to_pylist() if row["status"] != "ok"]
    prefix = "decode: the loader's" if stage == "loader" else "inference: the FCN actor's"
    assert failed["key"] == poison
    assert failed["error"].startswith(f"{prefix} process ended {CRASH_LIMIT} times with this row in its call")
    _check_masks(output, table, files, model)


def test_sigint_exits_130_and_the_same_command_resumes(ray_cluster: None, tmp_path: Path) -> None:

    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=NUM_CLASSES)
    files = good_images(seed=13, count=24)
    upload(str(tmp_path / "in"), files)
    output = tmp_path / "out"
    command = _one_image_per_part_command(tmp_path / "in", output, model)
    log = tmp_path / "driver.log"  # a file, not a pipe: a full pipe that nobody reads would stall the driver
    with log.open("w") as stderr_file:
        driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr_file)
    try:
        deadline = time.monotonic() + 240
        while not list((output / "stats").glob("*.parquet")):
            assert driver.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "no stats part file appeared"
            time.sleep(0.05)
        driver.send_signal(signal.SIGINT)  # Ctrl-C
        driver.wait(timeout=60)
    finally:
        driver.kill()
    stderr = log.read_text()
    # 130 every time, never -11: the driver ends while Ray Data's threads are still inside Ray
    assert driver.returncode == 130, stderr[-2000:]
    assert "interrupted: rerun the same command to resume" in stderr and "Traceback" not in stderr
    assert not (output / "_SUCCESS").exists()

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)

    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout)
    assert summary["skipped"] > 0 and summary["ok"] + summary["skipped"] == len(files)
    _check_one_row_per_key(_stats(str(output)), set(files))
    assert (output / "_SUCCESS").exists()


def test_credentials_appear_in_no_output_and_no_log(
    ray_cluster: None, private_s3_options: dict, tmp_path: Path
) -> None:
    """The environment's AWS secret and session token, and a secret passed the recommended way
    (``--storage-options @FILE``), appear nowhere: not in the process list while the run goes on, nor
    in what it leaves: its console output, the Parquet data and schema metadata, manifest.json, the
    masks, and the Ray cluster's logs."""
    import ray
    from conftest import SECRETS

    fs = fsspec.filesystem("s3", **private_s3_options)
    fs.mkdir("secrets")
    for key, data in {**good_images(seed=17, count=3), "odd/text.jpg": b"not an image"}.items():
        fs.pipe_file(f"secrets/in/{key}", data)
    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=NUM_CLASSES)
    options_file = tmp_path / "storage-options.json"
    options_file.write_text(json.dumps(private_s3_options))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.segment",
            "--input",
            "s3://secrets/in",
            "--output",
            "s3://secrets/out",
            "--model",
            model,
            "--storage-options",
            f"@{options_file}",
            "--ray-address",
            ray.get_runtime_context().gcs_address,
            "--actors",
            "1",
            "--cpus-per-actor",
            "1",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process_lists = []
    while process.poll() is None:  # every process's whole command line (-ww), as anyone on the machine sees them
        process_lists.append(subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout)
        time.sleep(0.2)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    assert any(f"@{options_file}" in listing for listing in process_lists)  # the run was seen in them
    assert "given on the command line" not in stderr  # (the warning of secrets passed inline)
    fs.invalidate_cache()
    outputs = {path: fs.cat_file(path) for path in fs.find("secrets/out")}
    assert any(path.endswith("manifest.json") for path in outputs) and any(
        path.endswith(".parquet") for path in outputs
    )
    table = pq.read_table("secrets/out/stats", filesystem=fs)  # Parquet pages are compressed: decode them too
    outputs["stats, decoded"] = repr((table.to_pylist(), table.schema.metadata)).encode()
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    places = {
        "stdout": stdout.encode(),
        "stderr": stderr.encode(),
        **outputs,
        **{f"ps -ww -eo args #{i}": listing.encode() for i, listing in enumerate(process_lists)},
        **{str(p): p.read_bytes() for p in logs.rglob("*") if p.is_file()},
    }
    for secret in SECRETS:
        leaks = [name for name, content in places.items() if secret.encode() in content]
        assert not leaks, f"{secret} found in {leaks}"


def test_a_store_that_fails_the_first_writes_of_every_object_still_gets_every_mask_and_row(
    ray_cluster: None, s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    """The first 6 PUTs and DELETEs of every mask and stats object through a loopback proxy fail (500,
    503 SlowDown, connection reset mid-body, twice over). s3fs gives up on a 500 at once (botocore's own
    retries off), so the job's write retries are what saves the run: it completes, every image has one
    row, every ok row's mask exists, and _SUCCESS is written; a rerun after an image changed compacts
    through the same faults. Without the job's retries the faults reach the writes (the output probe,
    manifest and _SUCCESS are not faulted): a mask that cannot be written is a 'write:' error row, and a
    stats part that cannot be written fails the run with an error naming it, and leaves no _SUCCESS."""
    import ray
    from faulty_proxy import FaultyProxy

    files = good_images(seed=19, count=12)
    upload(f"{s3_bucket}/in", files)
    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=NUM_CLASSES)
    fs, bucket = fsspec.core.url_to_fs(s3_bucket)

    def run_through(proxy: FaultyProxy, output: str, **kwargs):
        options = {"endpoint_url": proxy.url, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
        try:
            return run_segmentation(
                _config(
                    f"{s3_bucket}/in",
                    f"{s3_bucket}/{output}",
                    model,
                    rows_per_file=3,
                    storage_options=options,
                    **kwargs,
                )
            )
        finally:
            fs.invalidate_cache()

    def masks_and_stats(path: str) -> bool:
        return "/masks/" in path or "/stats/" in path

    proxy = FaultyProxy(s3_endpoint, failures=6, methods=("PUT", "DELETE"), faulty=masks_and_stats)
    try:
        summary = run_through(proxy, "out")
        assert all(proxy.faults.values()), proxy.faults  # each kind of fault was injected
        assert (summary.ok, summary.error) == (len(files), 0)
        table = _stats(f"{s3_bucket}/out")
        _check_one_row_per_key(table, set(files))
        assert all(fs.exists(uri) for uri in table["mask_uri"].to_pylist())
        assert fs.isfile(f"{bucket}/out/_SUCCESS")

        changed = sorted(files)[0]  # its old row is superseded: compaction rewrites its part and deletes the old one
        upload(f"{s3_bucket}/in", {changed: next(iter(good_images(seed=20, count=1).values()))})
        again = run_through(proxy, "out")
    finally:
        proxy.close()
    assert (again.ok, again.skipped) == (1, len(files) - 1)
    table = _stats(f"{s3_bucket}/out")
    _check_one_row_per_key(table, set(files))
    assert {row["run_id"] for row in table.to_pylist() if row["key"] == changed} == {again.run_id}
    compaction = {method for method, path in proxy.faulted if "/part-compacted-" in path or method == "DELETE"}
    assert compaction == {"PUT", "DELETE"}  # its writes and deletes met the faults

    # No retries, faults on masks only: every image is an error row naming the write, and no mask exists.
    proxy = FaultyProxy(s3_endpoint, failures=6, faulty=lambda path: "/masks/" in path)
    try:
        summary = run_through(proxy, "masks-fail", write_retries=0)
    finally:
        proxy.close()
    assert (summary.ok, summary.error) == (0, len(files))
    for row in _stats(f"{s3_bucket}/masks-fail").to_pylist():
        assert row["status"] == "error" and row["mask_uri"] is None, row
        assert re.fullmatch(r"write: OSError: .*injected", row["error"], re.S), row["error"]
    assert not fs.exists(f"{bucket}/masks-fail/masks")

    # No retries, faults on stats parts only: the masks are written, the first part that fails ends the run
    # (Ray Data's task error, carrying the writer's).
    proxy = FaultyProxy(s3_endpoint, failures=6, faulty=lambda path: "/stats/" in path)
    try:
        expected = rf"OSError: write: stats part {s3_bucket}/parts-fail/stats/part-\S+\.parquet: OSError: .*injected"
        with pytest.raises(ray.exceptions.RayTaskError, match=expected):
            run_through(proxy, "parts-fail", write_retries=0)
    finally:
        proxy.close()
    assert {method for method, path in proxy.faulted} == {"PUT"} and fs.find(f"{bucket}/parts-fail/masks")
    assert not fs.exists(f"{bucket}/parts-fail/_SUCCESS") and not fs.exists(f"{bucket}/parts-fail/stats")


def test_a_two_head_model_writes_a_mask_and_columns_per_head(ray_cluster: None, tmp_path: Path) -> None:
    """SIFT Flow's two-task net: masks/ for the semantic head, masks_geometric/ for the geometric one,
    the geometric head's statistics as geometric_* columns, and both heads in the schema metadata."""
    files = good_images(seed=23, count=3)
    upload(str(tmp_path / "in"), files)
    model = tiny_checkpoint(str(tmp_path / "siftflow.pt"), num_classes=NUM_CLASSES, arch="fcn16s_siftflow_vgg16")
    output = f"file://{tmp_path / 'out'}"
    summary = run_segmentation(_config(str(tmp_path / "in"), output, model))
    assert (summary.ok, summary.error) == (len(files), 0)
    table = _stats(output)
    heads = json.loads(table.schema.metadata[b"heads"])
    assert list(heads) == ["semantic", "geometric"] and heads["geometric"]["class_names"] == [
        "class_0",
        "class_1",
        "class_2",
    ]
    predictor = fcn.Predictor.from_checkpoint(model, device="cpu")
    seen_geometric = set()
    for row in table.to_pylist():
        image = displayed(files[row["key"]])
        expected = predictor(image)
        for column, folder, prediction in (
            ("mask_uri", "masks", expected),
            ("geometric_mask_uri", "masks_geometric", expected.heads["geometric"]),
        ):
            assert row[column] == f"{output}/{folder}/{row['key']}.png"
            with fsspec.open(row[column], "rb") as f:
                labels = np.asarray(Image.open(io.BytesIO(f.read())))
            assert (labels == prediction.labels).mean() > 0.99
        counts = np.bincount(
            np.asarray(Image.open(row["geometric_mask_uri"].removeprefix("file://"))).ravel(), minlength=3
        )
        assert row["geometric_pixel_counts"] == counts.tolist() and row["geometric_dominant_class"] == int(
            counts.argmax()
        )
        assert (
            row["geometric_dominant_class_name"] == f"class_{counts.argmax()}"
            and 0 < row["geometric_mean_confidence"] <= 1
        )
        assert len(row["pixel_counts"]) == NUM_CLASSES and np.isclose(sum(row["geometric_class_fractions"]), 1.0)
        seen_geometric |= set(np.flatnonzero(counts).tolist())
    assert len(seen_geometric) > 1  # the heads differ: the geometric one is not a copy of class 0


def test_an_rgb_hha_model_reads_depth_maps_beside_the_images(ray_cluster: None, tmp_path: Path) -> None:
    """--depth: each image's 16-bit depth map is read beside it and turned into HHA on the workers; a
    missing or mis-sized depth map is an error row naming it; a depth model without --depth, or
    --depth for an RGB model, is a message naming --depth."""
    from fcn.depth import hha

    files = good_images(seed=29, count=4)
    upload(str(tmp_path / "in"), files)
    rng = np.random.default_rng(0)
    keys = sorted(files)
    depths = {}
    for key in keys[:2]:
        width, height = displayed(files[key]).size
        depths[key] = rng.integers(500, 6000, (height, width)).astype(np.uint16)
    missing, mis_sized = keys[2], keys[3]
    depths[mis_sized] = np.full((7, 9), 1500, np.uint16)
    for key, depth_mm in depths.items():
        path = tmp_path / "depth" / (os.path.splitext(key)[0] + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(depth_mm).save(path)
    model = tiny_checkpoint(str(tmp_path / "rgbhha.pt"), num_classes=NUM_CLASSES, arch="fcn32s_rgbhha_vgg16")
    output = str(tmp_path / "out")
    with pytest.raises(segment.ConfigError, match="--depth: .*reads \\['rgb', 'hha'\\]"):
        run_segmentation(_config(str(tmp_path / "in"), output, model))
    summary = run_segmentation(_config(str(tmp_path / "in"), output, model, depth=str(tmp_path / "depth")))
    assert (summary.ok, summary.error) == (2, 2)
    rows = {row["key"]: row for row in _stats(output).to_pylist()}
    assert (
        rows[missing]["error"].startswith("depth read: file not found")
        and os.path.splitext(missing)[0] + ".png" in rows[missing]["error"]
    )
    assert "depth: " in rows[mis_sized]["error"] and "is 9x7, the image" in rows[mis_sized]["error"]
    predictor = fcn.Predictor.from_checkpoint(model, device="cpu")
    for key in keys[:2]:
        rgb = np.asarray(displayed(files[key]).convert("RGB"))
        expected = predictor({"rgb": rgb, "hha": hha(depths[key] / 1000.0)}).labels
        labels = np.asarray(Image.open(rows[key]["mask_uri"].removeprefix("file://")))
        assert rows[key]["status"] == "ok" and (labels == expected).mean() > 0.99
    rgb_model = tiny_checkpoint(str(tmp_path / "rgb.pt"), num_classes=NUM_CLASSES)
    with pytest.raises(segment.ConfigError, match="--depth: .*reads only RGB"):
        run_segmentation(
            _config(str(tmp_path / "in"), str(tmp_path / "out2"), rgb_model, depth=str(tmp_path / "depth"))
        )


def test_cuda_on_a_cluster_without_gpus_waits_then_names_the_flags(ray_cluster: None, tmp_path: Path) -> None:
    """``--device cuda`` waits (here 2 s) for the autoscaler to bring a GPU, then fails with a message
    naming --device and --gpu-wait-s; nothing is written as done."""
    upload(str(tmp_path / "in"), good_images(seed=31, count=2))
    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=NUM_CLASSES)
    output = tmp_path / "out"
    start = time.monotonic()
    with pytest.raises(segment.ConfigError) as error:
        run_segmentation(_config(str(tmp_path / "in"), str(output), model, device="cuda", gpu_wait_s=2))
    waited = time.monotonic() - start
    assert error.value.param == "--device" and "--gpu-wait-s" in str(error.value) and "within 2 s" in str(error.value)
    assert 2 <= waited < 60
    assert not (output / "_SUCCESS").exists() and not (output / "stats").exists()


RAY_CORE_ERROR = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ E \d+ \d+\] ", re.MULTILINE)  # Ray's C++ log line prefix


def test_the_cli_prints_no_ray_internal_error_or_progress_bar_notice(ray_cluster: None, tmp_path: Path) -> None:
    """Ray Data's actor pools start restartable actors with object-store arguments of its own, for which
    Ray's core worker logs an ERROR line once per driver; the driver spends it before any job (see
    pipelines.common.ray_utils), and Ray Data's notice that its progress bars are off (ours counts) is dropped."""
    import ray

    upload(str(tmp_path / "in"), good_images(seed=23, count=3))
    model = tiny_checkpoint(str(tmp_path / "model.pt"), num_classes=NUM_CLASSES)
    command = [sys.executable, "-m", "pipelines.segment", "--input", str(tmp_path / "in")]
    command += ["--output", str(tmp_path / "out"), "--model", model, "--actors", "1"]
    command += ["--ray-address", ray.get_runtime_context().gcs_address]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["ok"] == 3
    assert not RAY_CORE_ERROR.search(run.stderr), run.stderr[-3000:]
    assert "constructor arguments in the object store" not in run.stderr
    assert "Progress bars disabled" not in run.stderr, run.stderr[-3000:]


def _one_image_per_part_command(inputs: Path, output: Path, model: str) -> list[str]:
    """The segmentation CLI on the session's cluster, one image per batch and per Parquet part, so that an
    interrupt lands between parts."""
    import ray

    return [
        sys.executable,
        "-m",
        "pipelines.segment",
        "--input",
        str(inputs),
        "--output",
        str(output),
        "--model",
        model,
        "--ray-address",
        ray.get_runtime_context().gcs_address,
        "--actors",
        "1",
        "--cpus-per-actor",
        "1",
        "--batch-size",
        "1",
        "--rows-per-file",
        "1",
    ]
