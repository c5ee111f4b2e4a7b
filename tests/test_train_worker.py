"""The training worker with torch alone (no Ray): importable and runnable with Ray, Prefect and s3fs
unimportable; a resume from optimizer state saved on a GPU; data loader processes; collective tensors on
the worker's device; the class weights reaching the loss; divergence on one rank (through DDP's join)
and after an epoch already checkpointed; whole GPUs per worker."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils.data.distributed import DistributedSampler

import fcn
from fcn.classes import voc_palette
from fcn.conventions import get_convention
from pipelines.common.options import ConfigError
from pipelines.synthetic import write_synthetic_voc
from pipelines.train.config import TrainConfig
from pipelines.train.context import (
    DIVERGED_FILE,
    HISTORY_DIR,
    TRAIN_STATE_FILE,
    LocalWorkerContext,
    TrainingDiverged,
    raise_if_diverged,
    run_folder,
)
from pipelines.train.data import TrainImages
from pipelines.train.datasets import open_dataset
from pipelines.train.prepare import make_loop_config
from pipelines.train.recipes import RECIPES
from pipelines.train.worker import loader_workers, make_loader, run_training_worker

REPO = Path(__file__).resolve().parents[1]
TINY = {"model": "fcn8s_vgg16", "width": 0.0625, "geometry": "aligned", "workers": 1}
RANK_TIMEOUT_S = 240

RAY_FREE_RUN = r"""
import json, sys


class Unimportable:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "prefect", "s3fs"):
            raise ImportError(f"{name} is not installed here")


sys.meta_path.insert(0, Unimportable())
import torch
import torch.distributed as dist

import fcn
from pipelines.train.datasets import open_dataset
from pipelines.train.config import TrainConfig
from pipelines.train.context import LocalWorkerContext, run_folder
from pipelines.train.prepare import make_loop_config
from pipelines.train.worker import run_training_worker

data, registry, epochs, store = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
config = TrainConfig(data=data, registry=registry, model="fcn8s_vgg16", width=0.0625, geometry="aligned", workers=1,
                     epochs=epochs, run_name="local", loader_workers=1)
config.validate()
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
loop_config = make_loop_config(config, open_dataset(data))
context = LocalWorkerContext(run_folder(registry, "local"), torch.device("cpu"))
run_training_worker(loop_config, context)
dist.destroy_process_group()
print(json.dumps({"reports": context.reports, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def _tag_storages(path: Path, location: str) -> None:
    """Rewrite a torch.save file so that its tensors are recorded as saved on ``location`` (e.g. "cuda:0"):
    a file written on a GPU, made without one."""
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info.filename)) for info in archive.infolist()]
    cpu, tagged = b"X\x03\x00\x00\x00cpu", b"X" + len(location).to_bytes(4, "little") + location.encode()
    with zipfile.ZipFile(path, "w") as archive:
        for info, content in members:
            if info.filename.endswith("/data.pkl"):
                assert cpu in content
                content = content.replace(cpu, tagged)
            archive.writestr(info, content)


def test_worker_trains_and_resumes_without_ray_prefect_or_s3fs(tmp_path: Path) -> None:
    """The worker runs end to end in a process where Ray, Prefect and s3fs cannot be imported, with
    torch.distributed initialised by hand; then the run resumes from epoch 1, whose optimizer state is
    recorded as saved on a GPU (it loads on a machine without one)."""
    data, registry = tmp_path / "data", tmp_path / "registry"
    write_synthetic_voc(str(data), num_images=6, seed=0, min_size=32, max_size=40)

    def run(epochs: int) -> dict[str, Any]:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                RAY_FREE_RUN,
                str(data),
                str(registry),
                str(epochs),
                str(tmp_path / f"store-{epochs}"),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.splitlines()[-1])

    first = run(1)
    assert not {"ray", "prefect", "s3fs"} & set(first["loaded"])
    assert [name for name, _ in first["reports"]] == ["epoch-0001"]
    epoch_one = registry / "runs/local/epoch-0001"
    state = torch.load(epoch_one / TRAIN_STATE_FILE, weights_only=True)
    assert state["epoch"] == 1 and state["optimizer"]["state"]  # AdamW's moments
    _tag_storages(epoch_one / TRAIN_STATE_FILE, "cuda:0")
    with pytest.raises(RuntimeError, match="CUDA"):  # what a resume without map_location meets
        torch.load(epoch_one / TRAIN_STATE_FILE, weights_only=True)

    second = run(2)
    ((name, metrics),) = second["reports"]
    assert (name, metrics["epoch"], metrics["resumed_from_epoch"]) == ("epoch-0002", 2, 1)
    assert metrics["train_images_per_s"] > 0 and 0 <= metrics["loader_wait_fraction"] <= 1
    assert fcn.load_checkpoint(str(registry / "runs/local/epoch-0002/checkpoint.pt")).meta["epoch"] == 2
    assert sorted(p.name for p in (registry / "runs/local" / HISTORY_DIR).iterdir()) == [
        "epoch-0001.json",
        "epoch-0002.json",
    ]


def _tiny_run(tmp_path: Path, name: str, **options: Any) -> tuple[dict[str, Any], LocalWorkerContext]:
    """Train ``options`` on tmp_path/data in this process (world size 1); return (loop config, context)."""
    config = TrainConfig(
        data=str(tmp_path / "data"), registry=str(tmp_path / "registry"), run_name=name, **{**TINY, **options}
    )
    config.validate()
    loop_config = make_loop_config(config, open_dataset(config.data))
    context = LocalWorkerContext(run_folder(config.registry, name), "cpu")
    run_training_worker(loop_config, context)
    return loop_config, context


def test_loader_processes_augment_each_epoch_as_the_worker_itself_does(tmp_path: Path) -> None:
    """With persistent loader processes, every epoch gets its own augmentation (the epoch travels with
    each index), the same as without them; so two epochs of training give the same network."""
    write_synthetic_voc(str(tmp_path / "data"), num_images=6, seed=1, min_size=32, max_size=40)
    data = open_dataset(str(tmp_path / "data"))
    dataset = TrainImages(
        data.train, ("rgb",), {"semantic": data.num_classes}, get_convention("torchvision"), RECIPES["modern"], seed=0
    )
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    epochs = {}
    for workers in (0, 2):
        loader = make_loader(dataset, sampler, 1, workers, torch.device("cpu"))
        assert (loader.num_workers, loader.persistent_workers) == (workers, workers > 0)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            epochs[workers, epoch] = dict(zip(list(sampler), [images for images, _, _ in loader], strict=True))
    for epoch in (0, 1):
        assert epochs[0, epoch].keys() == epochs[2, epoch].keys()
        assert all(torch.equal(epochs[0, epoch][i], epochs[2, epoch][i]) for i in epochs[0, epoch])
    changed = [i for i in epochs[2, 0] if not torch.equal(epochs[2, 0][i], epochs[2, 1][i])]
    assert len(changed) >= len(dataset) // 2  # flipped or rescaled anew

    _, without = _tiny_run(tmp_path, "no-loader-processes", epochs=2, loader_workers=0)
    _, with_processes = _tiny_run(tmp_path, "loader-processes", epochs=2, loader_workers=2)
    assert [m["train_loss"] for _, m in without.reports] == [m["train_loss"] for _, m in with_processes.reports]
    weights = [
        fcn.load_checkpoint(str(tmp_path / f"registry/runs/{name}/epoch-0002/checkpoint.pt")).model.state_dict()
        for name in ("no-loader-processes", "loader-processes")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_class_weights_reach_the_semantic_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's loss is the loss under the class weights of the run: recomputed by hand from the
    logits and labels of each step (recorded as the worker computed them) with those weights, it gives
    the reported train loss, which the unweighted loss does not."""
    write_synthetic_voc(str(tmp_path / "data"), num_images=6, seed=2, min_size=32, max_size=40)
    weights = [4.0, 0.5, 0.25, 1.0, 0.5, 2.0]  # the background (most pixels) weighs most
    (tmp_path / "weights.txt").write_text("\n".join(map(str, weights)))
    steps: list[tuple[torch.Tensor, torch.Tensor, str]] = []
    real = fcn.cross_entropy

    def recording(logits: torch.Tensor, target: torch.Tensor, **options: Any) -> torch.Tensor:
        steps.append((logits.detach().clone(), target.clone(), options["reduction"]))
        return real(logits, target, **options)

    monkeypatch.setattr(fcn, "cross_entropy", recording)
    _, context = _tiny_run(
        tmp_path,
        "weighted",
        epochs=1,
        recipe="paper",  # summed: the weights show at once
        class_weights=str(tmp_path / "weights.txt"),
    )
    reported = context.reports[0][1]["train_loss"]
    weighted = np.mean([float(real(x, y, reduction=r, weight=torch.tensor(weights))) for x, y, r in steps])
    unweighted = np.mean([float(real(x, y, reduction=r)) for x, y, r in steps])
    assert len(steps) == 4 and abs(weighted - unweighted) > 0.5 * unweighted
    assert reported == pytest.approx(weighted, rel=1e-5)


def write_square_scenes(root: Path, sizes: dict[str, int], val: list[str]) -> None:
    """Square scenes of the given sizes in the VOC layout, every pixel labelled 1 ("thing")."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for sample_id, size in sizes.items():
        Image.fromarray(np.full((size, size, 3), 120, np.uint8)).save(root / "JPEGImages" / f"{sample_id}.jpg")
        mask = Image.fromarray(np.ones((size, size), np.uint8), mode="P")
        mask.putpalette(voc_palette())
        mask.save(root / "SegmentationClass" / f"{sample_id}.png")
    train = [s for s in sizes if s not in val]
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(train) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(val) + "\n")
    (root / "class_names.txt").write_text("background\nthing\n")


def overflowing_init(path: Path) -> str:
    """An FCN-32s whose class-0 score is 1e35 everywhere: the paper's summed loss is ~1e35 per labelled
    pixel, finite for a 24x24 image (< 6e37) and infinite in float32 for a 128x128 one (> 1e39)."""
    model = fcn.get_model("fcn32s_vgg16", num_classes=2, width=0.0625, geometry="aligned")
    with torch.no_grad():
        model.heads.semantic.rgb.score_fr.bias[0] = 1e35
    return fcn.save_checkpoint(model, str(path), class_names=["background", "thing"])


DIVERGING = {"model": "fcn32s_vgg16", "width": 0.0625, "geometry": "aligned", "recipe": "paper", "lr": 1e-40}
"""With the overflowing init: a rate that keeps the huge scores (and the upsampling's huge gradients) from
moving the weights, so that only a large image makes the loss infinite."""


def _rank_main(rank: int, world: int, store: str, loop_config: dict[str, Any], out: str) -> None:
    """One of ``world`` gloo ranks training ``loop_config``; writes what it reported and every tensor it
    passed to a collective (device, and whether it was made without naming a device) to ``out``."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=RANK_TIMEOUT_S / 2),
    )  # a mismatch fails, never hangs
    collectives: list[dict[str, Any]] = []

    def spy(collective: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            for t in tensor if isinstance(tensor, list) else [tensor]:
                collectives.append({"device": str(t.device), "default_device": getattr(t, "_made_on_default", False)})
            return collective(tensor, *args, **kwargs)

        return recorded

    for name in ("all_reduce", "all_gather", "broadcast", "reduce"):
        setattr(dist, name, spy(getattr(dist, name)))
    context = LocalWorkerContext(run_folder(loop_config["config"]["registry"], loop_config["run_name"]), "cpu")
    with _DefaultDeviceFactories():
        run_training_worker(loop_config, context)
    dist.destroy_process_group()
    Path(out).write_text(
        json.dumps({"reports": context.reports, "collectives": collectives, "device": str(context.device)})
    )


class _DefaultDeviceFactories(TorchFunctionMode):
    """Marks every tensor that a factory function made without a ``device=`` (on the default device, the
    CPU, whatever the model's device is)."""

    FACTORIES = (torch.tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.as_tensor, torch.arange)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in self.FACTORIES and kwargs.get("device") is None:
            result._made_on_default = True
        return result


def _run_ranks(tmp_path: Path, loop_config: dict[str, Any], world: int = 2) -> list[dict[str, Any]]:
    """Run ``world`` ranks in spawned processes (gloo on CPU); each must exit 0 within RANK_TIMEOUT_S."""
    spawn = multiprocessing.get_context("spawn")
    store = tmp_path / f"store-{os.urandom(4).hex()}"
    outs = [tmp_path / f"rank-{rank}-{store.name}.json" for rank in range(world)]
    ranks = [
        spawn.Process(target=_rank_main, args=(rank, world, str(store), loop_config, str(out)))
        for rank, out in enumerate(outs)
    ]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + RANK_TIMEOUT_S
    try:
        for process in ranks:
            process.join(max(0.0, deadline - time.monotonic()))
        assert [p.exitcode for p in ranks] == [0] * world, "a rank hung or failed"
    finally:
        for process in ranks:
            if process.is_alive():
                process.kill()
                process.join()
    return [json.loads(out.read_text()) for out in outs]


def test_two_ranks_reduce_on_the_models_device_and_agree(tmp_path: Path) -> None:
    """Two gloo ranks: every tensor passed to a collective is on the worker's device and was made there
    (not on the default device, which NCCL would refuse for a GPU model); the ranks report the same
    merged metrics."""
    write_synthetic_voc(str(tmp_path / "data"), num_images=8, seed=3, min_size=32, max_size=40)
    config = TrainConfig(
        data=str(tmp_path / "data"),
        registry=str(tmp_path / "registry"),
        run_name="two",
        epochs=1,
        **{**TINY, "workers": 2},
    )
    results = _run_ranks(tmp_path, make_loop_config(config, open_dataset(config.data)))
    for result in results:
        assert len(result["collectives"]) >= 2  # the epoch's totals and the confusion matrix
        assert all(c["device"] == result["device"] for c in result["collectives"]), result["collectives"]
        assert not [c for c in result["collectives"] if c["default_device"]], result["collectives"]
    merged = [result["reports"][0][1] for result in results]
    assert merged[0]["world_size"] == 2 and merged[0]["train_loss"] == merged[1]["train_loss"]
    assert merged[0]["hist"] == merged[1]["hist"]


def test_divergence_on_one_rank_stops_both_through_ddps_join(tmp_path: Path) -> None:
    """Only the rank that draws the large image sees an infinite loss (the paper's summed loss
    overflows there); the other keeps stepping under DDP's join. Both stop after the pass, nothing is
    reported, and diverged.json names epoch 1."""
    data, registry = tmp_path / "data", tmp_path / "registry"
    write_square_scenes(data, {"small-1": 24, "small-2": 24, "small-3": 24, "large": 128, "val": 24}, val=["val"])
    config = TrainConfig(
        data=str(data),
        registry=str(registry),
        run_name="one-rank",
        epochs=2,
        workers=2,
        init=overflowing_init(tmp_path / "init.pt"),
        **DIVERGING,
    )
    results = _run_ranks(tmp_path, make_loop_config(config, open_dataset(config.data)))
    assert [result["reports"] for result in results] == [[], []]
    run_uri = run_folder(str(registry), "one-rank")
    marker = json.loads(Path(run_uri, DIVERGED_FILE).read_text())
    assert marker["epoch"] == 1 and marker["loss"] == "inf"
    with pytest.raises(TrainingDiverged, match=r"run 'one-rank' diverged at epoch 1, step \d: loss is inf"):
        raise_if_diverged(run_uri, "one-rank")
    assert not list(Path(run_uri).glob("epoch-*")) and not Path(run_uri, HISTORY_DIR).exists()


def test_divergence_after_a_checkpointed_epoch_keeps_it_and_names_the_epoch(tmp_path: Path) -> None:
    """Epoch 1 trains and is checkpointed; the resumed run meets an image whose summed loss overflows in
    epoch 2: it stops there, epoch 1's folder and history stay as they were, and the driver's reading
    of the marker names epoch 2."""
    data, registry = tmp_path / "data", tmp_path / "registry"
    write_square_scenes(data, {"a": 24, "b": 24, "val": 24}, val=["val"])
    init = overflowing_init(tmp_path / "init.pt")
    _tiny_run(tmp_path, "later", epochs=1, init=init, **DIVERGING)
    run_uri = Path(run_folder(str(registry), "later"))
    epoch_one = {p.relative_to(run_uri): p.read_bytes() for p in run_uri.rglob("*") if p.is_file()}
    raise_if_diverged(str(run_uri), "later")  # epoch 1 did not diverge

    write_square_scenes(data, {"a": 24, "b": 128, "val": 24}, val=["val"])  # "b" is now large
    _, context = _tiny_run(tmp_path, "later", epochs=2, init=init, **DIVERGING)
    assert context.reports == []
    with pytest.raises(TrainingDiverged, match=r"run 'later' diverged at epoch 2, step \d: loss is inf"):
        raise_if_diverged(str(run_uri), "later")
    assert {
        p.relative_to(run_uri): p.read_bytes() for p in run_uri.rglob("*") if p.is_file() and p.name != DIVERGED_FILE
    } == epoch_one


@pytest.mark.parametrize("gpus", [0.5, 0.25, 1.5])
def test_fractional_gpus_per_worker_are_refused_naming_the_flag(tmp_path: Path, gpus: float) -> None:
    config = TrainConfig(data=str(tmp_path), registry=str(tmp_path), gpus_per_worker=gpus)
    with pytest.raises(ConfigError, match=r"--gpus-per-worker: must be 0 .* whole number of GPUs .*NCCL"):
        config.validate()
    for whole in (0, 1, 2.0):
        TrainConfig(data=str(tmp_path), registry=str(tmp_path), gpus_per_worker=whole).validate()


def test_loader_processes_default_to_the_workers_cpus_on_a_gpu_and_none_on_the_cpu(tmp_path: Path) -> None:
    def config(**options: Any) -> TrainConfig:
        return TrainConfig(data=str(tmp_path), registry=str(tmp_path), **options)

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert [loader_workers(config(cpus_per_worker=c), cuda) for c in (0.5, 1, 3, 16)] == [1, 1, 3, 4]
    assert loader_workers(config(cpus_per_worker=16), cpu) == 0
    assert [loader_workers(config(loader_workers=n), d) for n in (0, 2) for d in (cuda, cpu)] == [0, 0, 2, 2]
    with pytest.raises(ConfigError, match="--loader-workers: must be >= 0"):
        config(loader_workers=-1).validate()
