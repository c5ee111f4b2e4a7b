"""Distributed training on a real local Ray cluster: a small FCN-8s learns the synthetic scenes with 2
workers, skips bad samples, checkpoints every epoch (on S3), registers and promotes; validation merged
over workers equals single-worker scoring; training resumes after a killed worker and after a driver
restart."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest
import torch
from test_train_data import BAD, FOUR_CLASSES, PLOT_IDS, corrupt, write_voc_layout
from test_train_worker import DIVERGING, overflowing_init, write_square_scenes

import fcn
from fcn import registry
from pipelines.common.processes import alive, command_line, descendants
from pipelines.synthetic import write_synthetic_voc
from pipelines.train import (
    SCORES,
    TrainConfig,
    TrainingDiverged,
    TrainSummary,
    read_run_history,
    run_evaluation,
    run_training,
)
from pipelines.train.class_weights import median_frequency_weights
from pipelines.train.datasets import open_dataset
from pipelines.train.driver import _fit_interruptibly

REPO = Path(__file__).resolve().parents[1]
SMALL = {"model": "fcn8s_vgg16", "width": 1 / 16, "geometry": "aligned", "workers": 2}
EPOCHS = 16


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> str:
    """160 synthetic scenes (48-64 px; 120 train, 40 val), 4 of them broken in different ways."""
    root = tmp_path_factory.mktemp("scenes")
    write_synthetic_voc(str(root), num_images=160, seed=0, min_size=48, max_size=64)
    corrupt(root)
    return str(root)


def _read_json(uri: str) -> dict:
    with fsspec.open(uri, "r") as f:
        return json.load(f)


def test_fcn8s_learns_registers_and_scores_consistently(ray_cluster: None, scenes: str, s3_bucket: str) -> None:
    reg = f"{s3_bucket}/registry"
    config = TrainConfig(data=scenes, registry=reg, epochs=EPOCHS, lr=3e-3, run_name="synthetic-8s", **SMALL)
    first = run_training(config)

    # Shown, not claimed: mean IU 0.30+ on 6 classes, far above the all-background baseline (~0.14).
    history = first.history
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert first.metrics["mean_iu"] >= 0.30, first.metrics
    assert first.metrics["mean_iu"] > history[0]["mean_iu"] + 0.15
    # Bad samples skipped, counted, named with their reason; the run did not crash.
    assert set(first.skipped) == set(BAD) and all(h["skipped"] == 4 for h in history)
    for sample_id, reason in BAD.items():
        assert reason in first.skipped[sample_id]
    # A checkpoint in fcn's format and the metrics beside it, every epoch, in the registry's runs/.
    for epoch in range(1, EPOCHS + 1):
        folder = f"{reg}/runs/synthetic-8s/epoch-{epoch:04d}"
        metrics = _read_json(f"{folder}/metrics.json")
        assert all(0.0 <= metrics[k] <= 1.0 for k in SCORES) and metrics["world_size"] == 2
        ckpt = fcn.load_checkpoint(f"{folder}/checkpoint.pt")
        assert ckpt.meta["epoch"] == epoch and ckpt.class_names[4] == "ring"
    # Registered and promoted (first model in this registry); the registry root loads the champion.
    assert (first.version, first.promoted) == ("v0001", True)
    champion = fcn.load_checkpoint(reg)
    assert champion.uri.endswith("models/v0001/checkpoint.pt")
    assert champion.meta["epoch"] == first.metrics["epoch"]

    # The hist merged from 2 workers during training equals scoring the same weights with 1 worker.
    single = run_evaluation(scenes, reg, workers=1)
    assert single["hist"] == first.metrics["hist"]
    assert single["mean_iu"] == pytest.approx(first.metrics["mean_iu"])
    assert sum(map(sum, single["hist"])) > 0


def test_median_frequency_weights_recorded_in_checkpoint_and_metrics(ray_cluster: None, tmp_path: Path) -> None:
    data, reg = tmp_path / "data", tmp_path / "registry"
    write_synthetic_voc(str(data), num_images=8, seed=11, min_size=48, max_size=64)
    config = TrainConfig(
        data=str(data),
        registry=str(reg),
        epochs=1,
        lr=3e-3,
        run_name="balanced",
        class_weights="median-frequency",
        **(SMALL | {"workers": 1}),
    )

    summary = run_training(config)

    expected = median_frequency_weights(open_dataset(str(data)).train_labels, 6)
    assert len({round(w, 6) for w in expected}) > 2  # balanced: not all equal
    folder = reg / "runs/balanced/epoch-0001"
    assert _read_json(str(folder / "metrics.json"))["class_weights"] == pytest.approx(expected)
    assert fcn.load_checkpoint(str(folder / "checkpoint.pt")).meta["class_weights"] == pytest.approx(expected)
    assert summary.metrics["class_weights"] == pytest.approx(expected)


def test_custom_voc_layout_data_trains_a_model_of_its_own_classes(ray_cluster: None, tmp_path: Path) -> None:
    """Data in the VOC layout that is not PASCAL VOC, with label ids 0-3 and no class names, trains
    through the CLI into a model with 4 outputs named class_0 ... class_3, and the run warns how to name them."""
    import ray

    data, reg = tmp_path / "plots", tmp_path / "registry"
    write_voc_layout(data, PLOT_IDS)
    command = [sys.executable, "-m", "pipelines.train", "--data", str(data), "--registry", str(reg)]
    command += ["--model", "fcn8s_vgg16", "--width", "0.0625", "--workers", "1", "--epochs", "1"]
    command += ["--ray-address", ray.get_runtime_context().gcs_address]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "class_0 ... class_3" in run.stderr and "class_names.txt" in run.stderr, run.stderr[-3000:]
    # Ray Train's own lines for each report and checkpoint (every metric as a dict) are not on the console.
    assert "Reporting training result" not in run.stderr and "Checkpoint successfully created" not in run.stderr
    champion = fcn.load_checkpoint(str(reg))
    assert champion.class_names == list(FOUR_CLASSES) and champion.arch["kwargs"]["num_classes"] == 4
    assert champion.model(torch.zeros(1, 3, 32, 32))["semantic"].shape[1] == 4


def _train_workers() -> list[int]:
    """PIDs of the Ray Train worker processes descending from this test process (Linux /proc)."""
    found = []
    for pid in descendants(os.getpid()):
        try:
            if "RayTrainWorker" in command_line(pid):
                found.append(pid)
        except OSError:
            continue
    return sorted(found)


def _text(path: Path) -> str:
    """The file's text, or "" while it is being replaced."""
    try:
        return path.read_text()
    except OSError:
        return ""


def test_resumes_after_killed_worker_and_driver_restart(ray_cluster: None, tmp_path: Path) -> None:
    data, reg = tmp_path / "data", tmp_path / "registry"
    write_synthetic_voc(str(data), num_images=24, seed=5, min_size=48, max_size=64)
    config = TrainConfig(
        data=str(data), registry=str(reg), epochs=3, lr=3e-3, run_name="killed", max_failures=1, **SMALL
    )
    result: dict[str, TrainSummary | BaseException] = {}

    def train() -> None:
        try:
            result["summary"] = run_training(config)
        except BaseException as exc:  # surfaced by the assertions below
            result["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    # Wait until Ray Train has registered epoch 1's checkpoint (its run snapshot lists it), then kill.
    snapshot = reg / "runs/killed/checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline:
        if snapshot.exists() and "epoch-0001" in snapshot.read_text():
            break
        time.sleep(0.05)
    assert "epoch-0001" in snapshot.read_text(), result
    victims = _train_workers()
    assert len(victims) == 2
    os.kill(victims[-1], signal.SIGKILL)  # a worker dies during epoch 2
    thread.join(timeout=300)

    assert "error" not in result, result.get("error")
    summary = result["summary"]
    epochs = [h["epoch"] for h in summary.history]
    assert epochs == [1, 2, 3] and summary.epochs == 3
    assert summary.history[0]["resumed_from_epoch"] is None  # the first attempt
    resumed = summary.history[-1]["resumed_from_epoch"]
    assert resumed is not None and resumed >= 1, [(h["epoch"], h["resumed_from_epoch"]) for h in summary.history]
    assert not alive(victims[-1])
    assert summary.version == "v0001" and summary.promoted

    # Driver restart with the same run name: continues after epoch 3 instead of starting over.
    again = run_training(TrainConfig(**{**config.__dict__, "epochs": 4, "promote_margin": 1.0}))
    assert [h["epoch"] for h in again.history] == [1, 2, 3, 4]
    assert again.history[-1]["resumed_from_epoch"] == 3
    untouched = [(h["epoch"], h["train_loss"], h["hist"]) for h in summary.history]
    assert [(h["epoch"], h["train_loss"], h["hist"]) for h in again.history[:3]] == untouched
    # Registered as a new version, but not promoted: it cannot beat the champion by a margin of 1.0.
    assert (again.version, again.promoted) == ("v0002", False)
    assert registry.get_champion(str(reg))["version"] == "v0001"


def test_diverging_training_stops_at_once_with_exit_1_and_registers_nothing(ray_cluster: None, tmp_path: Path) -> None:
    """A learning rate that blows the loss up, under --max-failures -1 (retry worker failures forever):
    divergence is final, not a failure to retry. The command exits 1 naming the epoch and step, and
    no version is registered."""
    import ray

    data, reg = tmp_path / "data", tmp_path / "registry"
    write_synthetic_voc(str(data), num_images=16, seed=7, min_size=48, max_size=64)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.train",
            "--data",
            str(data),
            "--registry",
            str(reg),
            "--model",
            "fcn8s_vgg16",
            "--width",
            "0.0625",
            "--geometry",
            "aligned",
            "--workers",
            "2",
            "--epochs",
            "3",
            "--lr",
            "1e8",
            "--max-failures",
            "-1",
            "--run-name",
            "diverging",
            "--ray-address",
            ray.get_runtime_context().gcs_address,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert run.returncode == 1, run.stderr[-3000:]
    assert re.search(
        r"training failed: TrainingDiverged: run 'diverging' diverged at epoch 1, step \d+: loss is (nan|inf)",
        run.stderr,
    ), run.stderr[-3000:]
    assert registry.list_versions(str(reg)) == [] and registry.get_champion(str(reg)) is None


def test_divergence_after_a_checkpointed_epoch_names_that_epoch_and_registers_nothing(
    ray_cluster: None, tmp_path: Path
) -> None:
    """A run whose epoch 1 was checkpointed (and registered) resumes and diverges in epoch 2, where an
    image now overflows the summed loss: run_training raises naming epoch 2, epoch 1's history stays,
    and no further version is registered."""
    data, reg = tmp_path / "data", tmp_path / "registry"
    write_square_scenes(data, {"a": 24, "b": 24, "val": 24}, val=["val"])
    options = {
        "data": str(data),
        "registry": str(reg),
        "run_name": "later",
        "workers": 1,
        "init": overflowing_init(tmp_path / "init.pt"),
        **DIVERGING,
    }
    run_training(TrainConfig(epochs=1, **options))
    versions = registry.list_versions(str(reg))
    write_square_scenes(data, {"a": 24, "b": 128, "val": 24}, val=["val"])  # "b" is now large
    with pytest.raises(TrainingDiverged, match=r"run 'later' diverged at epoch 2, step \d: loss is inf"):
        run_training(TrainConfig(epochs=2, **options))
    assert registry.list_versions(str(reg)) == versions
    assert [m["epoch"] for m in read_run_history(f"{reg}/runs/later")] == [1]


def test_keep_checkpoints_prunes_folders_but_not_the_history(ray_cluster: None, tmp_path: Path) -> None:
    """``--keep-checkpoints 1`` keeps the best epoch's folder (by mean IU) and the latest one (Ray
    Train keeps it to resume from); every epoch's metrics stay in ``history/``, and the best epoch is
    the one registered."""
    data, reg = tmp_path / "data", tmp_path / "registry"
    write_synthetic_voc(str(data), num_images=16, seed=9, min_size=48, max_size=64)
    config = TrainConfig(
        data=str(data), registry=str(reg), epochs=4, lr=3e-3, run_name="pruned", keep_checkpoints=1, **SMALL
    )

    summary = run_training(config)

    assert [h["epoch"] for h in summary.history] == [1, 2, 3, 4]
    best = max(summary.history, key=lambda h: (h["mean_iu"], h["epoch"]))["epoch"]  # the latest of equals
    folders = sorted(p.name for p in (reg / "runs" / "pruned").glob("epoch-*"))
    assert folders == sorted({f"epoch-{best:04d}", "epoch-0004"}), (folders, best)
    assert (
        summary.metrics["epoch"] == best
        and registry.read_version(str(reg), summary.version)["metrics"]["epoch"] == best
    )


def test_sigint_exits_130_and_the_named_run_resumes(ray_cluster: None, tmp_path: Path) -> None:
    import ray

    data, reg = tmp_path / "data", tmp_path / "registry"
    write_synthetic_voc(str(data), num_images=16, seed=3, min_size=48, max_size=64)
    command = [
        sys.executable,
        "-m",
        "pipelines.train",
        "--data",
        str(data),
        "--registry",
        str(reg),
        "--model",
        "fcn8s_vgg16",
        "--width",
        "0.0625",
        "--geometry",
        "aligned",
        "--workers",
        "2",
        "--epochs",
        "6",
        "--lr",
        "3e-3",
        "--ray-address",
        ray.get_runtime_context().gcs_address,
    ]
    log = tmp_path / "driver.log"  # a file, not a pipe: a full pipe that nobody reads would stall the driver
    with log.open("w") as stderr_file:
        driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr_file)
    try:
        deadline = time.monotonic() + 240
        # Ctrl-C once Ray Train has registered epoch 1's checkpoint (its run snapshot lists it)
        while not any("epoch-0001" in _text(p) for p in (reg / "runs").glob("*/checkpoint_manager_snapshot.json")):
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no epoch finished"
            time.sleep(0.1)
        driver.send_signal(signal.SIGINT)
        driver.wait(timeout=120)
    finally:
        driver.kill()
    stderr = log.read_text()
    # 130 every time, never -11: the driver ends while trainer.fit() is still inside Ray on its thread
    assert driver.returncode == 130, stderr[-3000:]
    named = re.search(r"interrupted: run the same command with --run-name (\S+) to resume", stderr)
    assert named, stderr[-3000:]
    assert registry.list_versions(str(reg)) == []

    resumed = subprocess.run(
        [*command, "--run-name", named.group(1)], cwd=REPO, capture_output=True, text=True, timeout=420
    )

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout)
    assert (report["epochs"], report["version"]) == (6, "v0001")
    history = read_run_history(f"{reg}/runs/{named.group(1)}")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6] and history[-1]["resumed_from_epoch"] >= 1


def test_ray_train_finds_the_autoscaling_coordinator_already_answering(ray_cluster: None) -> None:
    """Ray Train's controller gives each resource request to the cluster's autoscaling coordinator 5 s,
    the first time including the actor's start-up, which on a busy machine takes longer: a warning with a
    traceback that asks nothing of the user. The driver starts the coordinator before the trainer runs."""
    import ray

    name = "AutoscalingCoordinator"  # Ray's detached actor, in a namespace of the same name
    with contextlib.suppress(ValueError):  # started by an earlier run on this cluster
        ray.kill(ray.get_actor(name, namespace=name))
    deadline = time.monotonic() + 60
    while _named_actor_exists(name):
        assert time.monotonic() < deadline, "the coordinator was not removed"
        time.sleep(0.1)

    class Trainer:  # in place of TorchTrainer: its controller's first look at the coordinator
        def fit(self) -> bool:
            coordinator = ray.get_actor(name, namespace=name)
            return ray.get(coordinator.__ray_ready__.remote(), timeout=5)

    assert _fit_interruptibly(Trainer()) is True


def _named_actor_exists(name: str) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace=name)
    except ValueError:
        return False
    return True
