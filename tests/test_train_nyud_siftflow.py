"""The NYUDv2 and SIFT Flow nets on a real local Ray cluster: small nets (width 1/16) train for a few
epochs on synthetic data in each layout. The loss falls, every head gets the paper's four metrics, and
the registered checkpoint carries every head's class names, the input modalities and the layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fcn
from fcn import registry
from fcn.classes import NYUD40_CLASSES, SIFTFLOW_CLASSES, SIFTFLOW_GEOMETRIC_CLASSES
from pipelines.synthetic import write_synthetic_nyud, write_synthetic_siftflow
from pipelines.train import SCORES, TrainConfig, main, read_run_history, run_evaluation, run_training

SYNTHETIC = {"num_images": 12, "seed": 0, "min_size": 48, "max_size": 64}  # 9 train, 3 val
EPOCHS = 4


def _assert_scores(metrics: dict, classes: int) -> None:
    assert all(0.0 <= metrics[k] <= 1.0 for k in SCORES), metrics
    assert len(metrics["class_names"]) == len(metrics["per_class_iu"]) == len(metrics["hist"]) == classes
    assert sum(map(sum, metrics["hist"])) > 0


def test_nyud_rgb_hha_net_trains_from_the_cli(
    ray_cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Late fusion of a colour and an HHA stream (HHA computed from the depth PNGs), sized for NYUDv2's 40 classes."""
    data, reg = tmp_path / "nyud", tmp_path / "registry"
    write_synthetic_nyud(str(data), **SYNTHETIC)

    code = main(
        [
            "--data",
            str(data),
            "--registry",
            str(reg),
            "--model",
            "fcn32s_rgbhha_vgg16",
            "--width",
            "0.0625",
            "--geometry",
            "aligned",
            "--lr",
            "3e-3",
            "--epochs",
            str(EPOCHS),
            "--workers",
            "1",
            "--run-name",
            "nyud",
        ]
    )

    assert code == 0
    report = json.loads(capsys.readouterr().out)
    history = read_run_history(f"{reg}/runs/nyud")
    losses = [h["train_loss"] for h in history]
    assert len(losses) == EPOCHS and losses[-1] < 0.8 * losses[0], losses
    for h in history:
        _assert_scores(h, 40)
        assert h["heads"] == {}  # one head
    assert report["heads"] == {} and report["version"] == "v0001" and report["promoted"]
    champion = fcn.load_checkpoint(str(reg))
    assert champion.modalities == ["rgb", "hha"] and champion.model.in_channels == 6
    assert list(champion.heads) == ["semantic"] and champion.class_names == list(NYUD40_CLASSES)
    assert champion.meta["layout"] == "nyud" and champion.meta["mean_iu"] == report["mean_iu"]


def test_siftflow_net_trains_and_scores_both_heads(ray_cluster: None, tmp_path: Path) -> None:
    """One trunk, a semantic and a geometric head, 2 workers: both heads' scores in metrics.json, the
    history, the registry and the checkpoint; the hists merged over workers equal a 1-worker evaluation."""
    data, reg = tmp_path / "siftflow", tmp_path / "registry"
    write_synthetic_siftflow(str(data), **SYNTHETIC)
    config = TrainConfig(
        data=str(data),
        registry=str(reg),
        model="fcn16s_siftflow_vgg16",
        width=1 / 16,
        geometry="aligned",
        lr=3e-3,
        epochs=EPOCHS,
        workers=2,
        run_name="siftflow",
    )

    summary = run_training(config)

    losses = [h["train_loss"] for h in summary.history]
    assert len(losses) == EPOCHS and losses[-1] < 0.8 * losses[0], losses
    for h in summary.history:
        _assert_scores(h, 33)
        assert list(h["heads"]) == ["geometric"]
        _assert_scores(h["heads"]["geometric"], 3)
    best = summary.metrics
    assert best["class_names"] == list(SIFTFLOW_CLASSES)
    assert best["heads"]["geometric"]["class_names"] == list(SIFTFLOW_GEOMETRIC_CLASSES)
    assert registry.read_version(str(reg), summary.version)["metrics"]["heads"] == best["heads"]
    champion = fcn.load_checkpoint(str(reg))
    assert {task: head["class_names"] for task, head in champion.heads.items()} == {
        "semantic": list(SIFTFLOW_CLASSES),
        "geometric": list(SIFTFLOW_GEOMETRIC_CLASSES),
    }
    assert champion.modalities == ["rgb"] and champion.meta["layout"] == "siftflow"
    assert champion.meta["head_scores"]["geometric"] == {k: best["heads"]["geometric"][k] for k in SCORES}

    single = run_evaluation(str(data), str(reg), workers=1)
    assert single["hist"] == best["hist"]
    assert single["heads"]["geometric"]["hist"] == best["heads"]["geometric"]["hist"]
    assert single["heads"]["geometric"]["mean_iu"] == pytest.approx(best["heads"]["geometric"]["mean_iu"])
