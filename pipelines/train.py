"""Distributed FCN training on Ray Train (V2): N data-parallel workers, whole-image batches, a
checkpoint and validation every epoch, then registration in the model registry.

    python -m pipelines.train --data s3://bucket/voc --registry s3://bucket/registry \\
        --model fcn8s_vgg16 --workers 2 --epochs 20

Every epoch writes ``<registry>/runs/<run>/epoch-NNNN/{checkpoint.pt,metrics.json,train_state.pt}``
(``checkpoint.pt`` is the model library's format; ``train_state.pt`` holds optimizer and schedule).
A worker failure restarts the workers from the latest checkpoint (``--max-failures``), and starting
the command again with the same ``--run-name`` continues that run. At the end the best epoch (by
validation mean IU) is registered as a new model version and promoted to champion if it beats the
current champion by more than ``--promote-margin``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec
import numpy as np
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fsspec.implementations.local import LocalFileSystem
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import fcn
from fcn import registry
from fcn.classes import voc_palette
from fcn.conventions import InputConvention, get_convention
from pipelines.class_weights import CLASS_WEIGHTS_HELP, MEDIAN_FREQUENCY, NO_WEIGHTS, resolve_class_weights
from pipelines.datasets import IGNORE_LABEL, BadSample, Sample, load_sample, open_dataset
from pipelines.ray_utils import connect

logger = logging.getLogger("pipelines.train")

SCORES = ("pixel_accuracy", "mean_accuracy", "mean_iu", "fw_iu")
TRAIN_STATE_FILE = "train_state.pt"
EPOCH_DIR = "epoch-{:04d}"
HISTORY_DIR = "history"  # <run>/history/epoch-NNNN.json: every epoch's metrics, never pruned


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings of a training recipe."""

    name: str
    optimizer: str  # "sgd" or "adamw"
    momentum: float  # SGD only
    weight_decay: float
    loss_reduction: str  # "sum" (reference solvers) or "mean"
    poly_power: float | None  # None: fixed learning rate
    hflip: bool
    scale_range: tuple[float, float] | None
    lr: float | None = None  # None: per-model rate from PAPER_LR

    def learning_rate(self, model: str, override: float | None) -> float:
        if override is not None:
            return override
        if self.lr is not None:
            return self.lr
        if model not in PAPER_LR:
            raise ValueError(f"lr: the {self.name} recipe has no learning rate for {model!r}; pass --lr")
        return PAPER_LR[model]

    def lr_factor(self, total_steps: int) -> Any:
        """The learning-rate multiplier as a function of the step: poly decay, or constant."""
        power, total = self.poly_power or 0.0, max(total_steps, 1)
        return lambda step: (1 - min(step, total) / total) ** power

    def make_optimizer(self, params: Any, lr: float) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)


PAPER_LR = {"fcn32s_vgg16": 1e-10, "fcn16s_vgg16": 1e-12, "fcn8s_vgg16": 1e-14, "fcn8s_atonce_vgg16": 1e-10}
"""The reference solvers' fixed rates for the unnormalised (summed) loss, batch 1, momentum 0.99."""

RECIPES = {
    "paper": Recipe("paper", "sgd", momentum=0.99, weight_decay=5e-4, loss_reduction="sum", poly_power=None,
                    hflip=False, scale_range=None),
    "modern": Recipe("modern", "adamw", momentum=0.0, weight_decay=1e-4, loss_reduction="mean", poly_power=0.9,
                     hflip=True, scale_range=(0.75, 1.25), lr=1e-3),
}  # fmt: skip


@dataclass
class TrainConfig:
    """A training run. ``registry`` receives the run's checkpoints and the registered model."""

    data: str
    registry: str
    model: str = "fcn8s_vgg16"
    init: str | None = None
    workers: int = 2
    gpus_per_worker: float = 0
    epochs: int = 10
    recipe: str = "modern"
    width: float = 1.0
    run_name: str | None = None
    promote_margin: float = 0.0
    promote: bool = True
    geometry: str = "reference"
    backbone_weights: str | None = None
    classes: str | None = None
    class_weights: str = NO_WEIGHTS
    lr: float | None = None
    batch_size: int = 1
    loss_sample_rate: float = 1.0
    input_convention: str | None = None
    cpus_per_worker: float = 1
    max_failures: int = 1
    keep_checkpoints: int | None = None
    strict: bool = False
    seed: int = 0
    ray_address: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad parameter."""
        checks = [
            ("workers", self.workers >= 1, "must be >= 1"),
            ("gpus_per_worker", self.gpus_per_worker >= 0, "must be >= 0"),
            ("cpus_per_worker", self.cpus_per_worker > 0, "must be > 0"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("recipe", self.recipe in RECIPES, f"must be one of {sorted(RECIPES)}"),
            ("width", self.width > 0 and math.isfinite(self.width), "must be a positive number"),
            ("promote_margin", self.promote_margin >= 0, "must be >= 0"),
            ("lr", self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), "must be a positive number"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("loss_sample_rate", 0 < self.loss_sample_rate <= 1, "must be in (0, 1]"),
            ("max_failures", self.max_failures >= -1, "must be >= -1 (-1 = unlimited)"),
            ("keep_checkpoints", self.keep_checkpoints is None or self.keep_checkpoints >= 1, "must be >= 1"),
            ("run_name", self.run_name is None or _safe_name(self.run_name), "may only contain letters, digits, . _ -"),
            ("class_weights", self.class_weights in (NO_WEIGHTS, MEDIAN_FREQUENCY) or _exists(self.class_weights),
             f"must be {NO_WEIGHTS!r}, {MEDIAN_FREQUENCY!r} or an existing file"),
        ]  # fmt: skip
        for name, ok, message in checks:
            if not ok:
                raise ValueError(f"{name}: {message}, got {getattr(self, name)!r}")
        if self.input_convention is not None:
            try:
                get_convention(self.input_convention)
            except ValueError as exc:
                raise ValueError(f"input_convention: {exc}") from None
        if self.backbone_weights is not None and not _exists(self.backbone_weights):
            raise ValueError(f"backbone_weights: no file at {self.backbone_weights!r}")
        RECIPES[self.recipe].learning_rate(self.model, self.lr)
        try:
            with torch.device("meta"):
                fcn.get_model(self.model, **{**self.model_kwargs(2), "backbone_weights": None})
        except (ValueError, TypeError) as exc:  # "fcn8s_vgg16: geometry must be ..." names the builder argument
            argument = str(exc).split(": ", 1)[-1].split(" ", 1)[0]
            raise ValueError(f"{argument if argument in ('geometry', 'width') else 'model'}: {exc}") from None

    def model_kwargs(self, num_classes: int) -> dict[str, Any]:
        return {
            "num_classes": num_classes,
            "width": self.width,
            "geometry": self.geometry,
            "backbone_weights": self.backbone_weights,
        }


@dataclass
class TrainSummary:
    """What a finished run produced."""

    run_name: str
    checkpoint_uri: str
    metrics: dict[str, Any]
    version: str | None
    promoted: bool
    epochs: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


DIVERGED_FILE = "diverged.json"  # in the run's folder: where the loss stopped being finite


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: final (never retried like a worker failure)."""


def run_training(config: TrainConfig) -> TrainSummary:
    """Train on Ray Train, register the best epoch and promote it if it beats the champion."""
    config.validate()
    data = open_dataset(config.data, classes=config.classes)
    try:
        class_weights = resolve_class_weights(config.class_weights, data)
    except ValueError as exc:
        raise ValueError(f"class_weights: {exc}") from None
    if class_weights is not None:
        logger.info("class weights (%s): %s", config.class_weights, [round(w, 4) for w in class_weights])
    if config.strict:
        _check_all_samples(data.train + data.val, data.num_classes)
    run_name = config.run_name or default_run_name(config.model)
    runs_uri = f"{config.registry.rstrip('/')}/runs"
    run_uri = run_folder(config.registry, run_name)
    init = _load_init(config.init) if config.init else None
    convention = config.input_convention or (init["input_convention"] if init else "torchvision")
    connect(config.ray_address)
    if init is not None:
        init["state_dict"] = ray.put(init["state_dict"])  # shipped once through the object store
    loop_config = {
        "config": asdict(config),
        "run_name": run_name,
        "class_names": list(data.class_names),
        "class_weights": class_weights,
        "train": list(data.train),
        "val": list(data.val),
        "convention": convention,
        "init": init,
    }
    storage_path, storage_filesystem = ray_storage(runs_uri)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=_scaling(config.workers, config.gpus_per_worker, config.cpus_per_worker),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.keep_checkpoints, checkpoint_score_attribute="mean_iu", checkpoint_score_order="max"
            ),
        ),
    )
    marker_fs, marker = fsspec.core.url_to_fs(f"{run_uri}/{DIVERGED_FILE}")
    if marker_fs.exists(marker):
        marker_fs.rm_file(marker)  # from an earlier attempt of this run name
    result = _fit_interruptibly(trainer)
    marker_fs.invalidate_cache()
    if marker_fs.exists(marker):
        where = json.loads(marker_fs.cat_file(marker))
        raise TrainingDiverged(
            f"run {run_name!r} diverged at epoch {where['epoch']}, step {where['step']}: loss is {where['loss']} "
            f"(lr={where['lr']:g}); lower the learning rate. Nothing was registered."
        )
    history = read_run_history(run_uri)
    if not history:
        raise RuntimeError(f"run {run_name!r} finished without a checkpoint under {run_uri}")
    best = best_epoch(history)
    checkpoint_uri = f"{run_uri}/{EPOCH_DIR.format(best['epoch'])}/{registry.CHECKPOINT_FILE}"
    version, promoted = None, False
    if math.isfinite(best["mean_iu"]):
        version = registry.register_model(config.registry, checkpoint_uri, best)
        promoted = config.promote and registry.promote_if_better(
            config.registry, version, margin=config.promote_margin
        )
    else:
        logger.warning("run %s: validation mean IU is undefined; not registering a model", run_name)
    logger.info("run %s done (ray result at %s)", run_name, result.path)
    return TrainSummary(
        run_name=run_name,
        checkpoint_uri=checkpoint_uri,
        metrics=best,
        version=version,
        promoted=promoted,
        epochs=history[-1]["epoch"],
        skipped=history[-1]["skipped_samples"],
        history=history,
    )


def run_evaluation(
    data: str,
    checkpoint: str,
    *,
    workers: int = 1,
    gpus_per_worker: float = 0,
    classes: str | None = None,
    split: str = "val",
    ray_address: str | None = None,
    storage: str | None = None,
) -> dict[str, Any]:
    """Score ``checkpoint`` (a file or a registry root) on a split of ``data`` with N Ray Train workers;
    returns the four metrics, per_class_iu, hist, and the skipped samples.

    ``storage`` (any fsspec URI) holds Ray Train's run folder; the default, a local temporary
    folder, works on a single node; multi-node clusters need shared storage.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split: must be 'train' or 'val', got {split!r}")
    dataset = open_dataset(data, classes=classes)
    connect(ray_address)
    with contextlib.ExitStack() as stack:
        if storage is None:
            storage = stack.enter_context(tempfile.TemporaryDirectory(prefix="fcn-eval-"))
        storage_path, storage_filesystem = ray_storage(storage)
        trainer = TorchTrainer(
            _eval_loop,
            train_loop_config={
                "checkpoint": registry.resolve_checkpoint_uri(checkpoint),
                "samples": list(getattr(dataset, split)),
                "num_classes": dataset.num_classes,
            },
            scaling_config=_scaling(workers, gpus_per_worker, 1),
            run_config=RunConfig(
                name=f"eval-{uuid.uuid4().hex[:8]}", storage_path=storage_path, storage_filesystem=storage_filesystem
            ),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as folder, open(os.path.join(folder, registry.METRICS_FILE)) as f:
            return json.load(f)


def ray_storage(uri: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig from any fsspec URI.

    Local paths go to Ray as they are; other filesystems (S3 with a custom endpoint, GCS, ...) are
    wrapped as a pyarrow filesystem around the fsspec one, so Ray Train writes with the same
    settings (endpoint, credentials from fsspec's config) as the rest of the pipeline.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return path, None
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _scaling(workers: int, gpus_per_worker: float, cpus_per_worker: float) -> ScalingConfig:
    resources = {"CPU": cpus_per_worker} | ({"GPU": gpus_per_worker} if gpus_per_worker else {})
    return ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources)


def _safe_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "._-" for c in name)


def _exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def _load_init(uri: str) -> dict[str, Any]:
    """State dict and input convention of the checkpoint (or registry champion) to start from."""
    try:
        ckpt = fcn.load_checkpoint(uri)
    except fcn.CheckpointError as exc:
        raise ValueError(f"init: {exc}") from None
    return {
        "uri": ckpt.uri,
        "state_dict": {k: v.cpu() for k, v in ckpt.model.state_dict().items()},
        "input_convention": ckpt.input_convention,
    }


def _check_all_samples(samples: Sequence[Sample], num_classes: int) -> None:
    """--strict: load every sample up front; raise ValueError listing the bad ones."""

    def check(sample: Sample) -> str | None:
        try:
            load_sample(sample, num_classes)
        except BadSample as bad:
            return str(bad)
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for p in pool.map(check, samples) if p]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise ValueError(f"strict: {len(problems)} bad samples: {shown}")


def _fit_interruptibly(trainer: TorchTrainer) -> Any:
    """``trainer.fit()`` on a helper thread, so that Ctrl-C reaches this thread at once as
    KeyboardInterrupt (Ray Train's own handler would only abort the run and return); the driver then
    exits, Ray ends the run's actors, the finished epochs stay, and the same run name resumes."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - handed to the calling thread
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def default_run_name(model: str) -> str:
    """``<model>-<UTC time>``, the run name when none is given."""
    return f"{model}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def best_epoch(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch with the highest validation mean IU (NaN lowest), the latest among equals: the one
    Ray Train's ``CheckpointConfig(num_to_keep, checkpoint_score_attribute="mean_iu")`` keeps."""
    return max(history, key=lambda m: (-1.0 if math.isnan(m["mean_iu"]) else m["mean_iu"], m["epoch"]))


def run_folder(registry_uri: str, run_name: str) -> str:
    """``<registry>/runs/<run>``: Ray Train's storage for the run, plus its history and markers."""
    return f"{registry_uri.rstrip('/')}/runs/{run_name}"


def read_run_history(run_uri: str) -> list[dict[str, Any]]:
    """The metrics of every finished epoch of a run, in epoch order, from ``history/`` (which
    ``--keep-checkpoints`` never prunes) and from the checkpoint folders (runs written before it)."""
    fs, root = fsspec.core.url_to_fs(run_uri)
    fs.invalidate_cache(root)
    files = fs.glob(f"{root}/epoch-*/{registry.METRICS_FILE}") + fs.glob(f"{root}/{HISTORY_DIR}/epoch-*.json")
    by_epoch = {m["epoch"]: m for m in (json.loads(fs.cat_file(p)) for p in sorted(files))}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def copy_matching_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy every tensor whose name and shape match (e.g. FCN-32s -> FCN-16s); return (copied, left)."""
    own = model.state_dict()
    copied = [k for k, v in state_dict.items() if k in own and own[k].shape == v.shape]
    model.load_state_dict({k: state_dict[k] for k in copied}, strict=False)
    return copied, [k for k in own if k not in copied]


# ----------------------------------------------------------------------------------------------
# Worker side


class _Images(Dataset):
    """Samples as (image tensor 3xHxW, labels HxW int64) or the BadSample they raise."""

    def __init__(self, samples: Sequence[Sample], num_classes: int, convention: InputConvention,
                 recipe: Recipe, seed: int) -> None:  # fmt: skip
        self.samples, self.num_classes, self.convention = list(samples), num_classes, convention
        self.recipe, self.seed, self.epoch = recipe, seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | BadSample:
        try:
            rgb, labels = load_sample(self.samples[index], self.num_classes)
        except BadSample as bad:
            return bad
        image, target = self.convention.to_tensor(rgb), torch.from_numpy(labels.astype(np.int64))
        return augment(image, target, self.recipe, np.random.default_rng([self.seed, self.epoch, index]))


def augment(
    image: torch.Tensor, target: torch.Tensor, recipe: Recipe, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's random horizontal flip and random rescale (bilinear image, nearest labels)."""
    if recipe.hflip and rng.random() < 0.5:
        image, target = image.flip(-1), target.flip(-1)
    if recipe.scale_range is not None:
        scale = rng.uniform(*recipe.scale_range)
        size = [max(1, round(s * scale)) for s in image.shape[-2:]]
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        target = F.interpolate(target[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, target


def pad_collate(items: list[Any]) -> tuple[torch.Tensor | None, torch.Tensor | None, list[BadSample]]:
    """Batch whole images of different sizes: pad to the largest, image with 0, labels with 255 (ignored)."""
    bad = [x for x in items if isinstance(x, BadSample)]
    good = [x for x in items if not isinstance(x, BadSample)]
    if not good:
        return None, None, bad
    height = max(x.shape[-2] for x, _ in good)
    width = max(x.shape[-1] for x, _ in good)
    images = torch.zeros(len(good), 3, height, width)
    targets = torch.full((len(good), height, width), IGNORE_LABEL, dtype=torch.int64)
    for i, (x, y) in enumerate(good):
        images[i, :, : x.shape[-2], : x.shape[-1]] = x
        targets[i, : y.shape[-2], : y.shape[-1]] = y
    return images, targets, bad


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _train_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker training function: build or restore the model, then train, validate and
    report one checkpoint per epoch."""
    config = TrainConfig(**loop_config["config"])
    recipe = RECIPES[config.recipe]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    class_names = loop_config["class_names"]
    num_classes = len(class_names)
    convention = get_convention(loop_config["convention"])
    torch.manual_seed(config.seed)

    model = fcn.get_model(config.model, **config.model_kwargs(num_classes))
    start_epoch, train_state = 0, None
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as folder:
            model.load_state_dict(fcn.load_checkpoint(os.path.join(folder, registry.CHECKPOINT_FILE)).model.state_dict())
            train_state = torch.load(os.path.join(folder, TRAIN_STATE_FILE), weights_only=True)
        start_epoch = train_state["epoch"]
        if rank == 0:
            logger.info("run %s: resuming after epoch %d", loop_config["run_name"], start_epoch)
    elif loop_config["init"] is not None:
        copied, left = copy_matching_weights(model, ray.get(loop_config["init"]["state_dict"]))
        if rank == 0:
            logger.info("init from %s: copied %d tensors, %d new: %s", loop_config["init"]["uri"],
                        len(copied), len(left), left)  # fmt: skip
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    dataset = _Images(loop_config["train"], num_classes, convention, recipe, config.seed)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, collate_fn=pad_collate)
    trainable = [p for p in model.parameters() if p.requires_grad]  # frozen bilinear upsampling stays fixed
    optimizer = recipe.make_optimizer(trainable, recipe.learning_rate(config.model, config.lr))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_factor(config.epochs * len(loader)))
    if train_state is not None:
        optimizer.load_state_dict(train_state["optimizer"])
        schedule.load_state_dict(train_state["schedule"])
    loss_generator = torch.Generator(device=device).manual_seed(config.seed * 1000 + rank)
    class_weights = loop_config["class_weights"]
    loss_weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32, device=device)

    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        dataset.epoch = epoch
        loss_sum, steps, skipped, diverged = _train_epoch(model, loader, optimizer, schedule, recipe.loss_reduction,
                                                          config.loss_sample_rate, loss_generator, loss_weight,
                                                          device)  # fmt: skip
        divergences = _merge_across_workers({f"{rank:06d}": diverged} if diverged else {}, world)
        if divergences:  # every rank stops here together: final, not a worker failure to retry
            if rank == 0:
                loss, step, lr = next(iter(divergences.values()))
                marker = f"{run_folder(config.registry, loop_config['run_name'])}/{DIVERGED_FILE}"
                with fsspec.open(marker, "w") as f:
                    json.dump({"epoch": epoch + 1, "step": step, "loss": repr(loss), "lr": lr}, f)
            return
        hist, val_skipped = _validate(module, loop_config["val"], num_classes, convention, device, rank, world)
        totals = torch.tensor([loss_sum, steps], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(totals)
        all_skipped = _merge_across_workers(skipped | val_skipped, world)
        scores = fcn.ConfusionMatrix(num_classes, hist).scores()
        metrics = {
            "epoch": epoch + 1,
            "run_name": loop_config["run_name"],
            "model": config.model,
            "recipe": config.recipe,
            "lr": schedule.get_last_lr()[0],
            "train_loss": float(totals[0] / max(totals[1], 1)),
            **{k: scores[k] for k in SCORES},
            "per_class_iu": scores["per_class_iu"],
            "class_names": class_names,
            "class_weights": class_weights,
            "hist": hist.tolist(),
            "skipped": len(all_skipped),
            "skipped_samples": all_skipped,
            "resumed_from_epoch": start_epoch if resume is not None else None,
            "world_size": world,
        }
        if all_skipped and rank == 0:
            logger.warning("epoch %d: skipped %d bad samples: %s", epoch + 1, len(all_skipped),
                           "; ".join(f"{k}: {v}" for k, v in list(all_skipped.items())[:5]))  # fmt: skip
        if rank == 0:
            logger.info("epoch %d/%d loss %.4f | %s", epoch + 1, config.epochs, metrics["train_loss"],
                        " ".join(f"{k} {metrics[k]:.4f}" for k in SCORES))  # fmt: skip

        def write(folder: str) -> None:
            fcn.save_checkpoint(
                module, os.path.join(folder, registry.CHECKPOINT_FILE), class_names=class_names,
                palette=voc_palette(), input_convention=convention.name, epoch=epoch + 1,
                run_name=loop_config["run_name"], recipe=config.recipe, mean_iu=metrics["mean_iu"],
                class_weights=class_weights,
            )  # fmt: skip
            torch.save({"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()},
                       os.path.join(folder, TRAIN_STATE_FILE))  # fmt: skip

        if rank == 0:  # the history outlives the checkpoint folders that --keep-checkpoints prunes
            fs, history = fsspec.core.url_to_fs(run_folder(config.registry, loop_config["run_name"]))
            fs.makedirs(f"{history}/{HISTORY_DIR}", exist_ok=True)
            registry.write_atomic(fs, f"{history}/{HISTORY_DIR}/{EPOCH_DIR.format(epoch + 1)}.json", json.dumps(metrics).encode())
        _report(metrics, EPOCH_DIR.format(epoch + 1), rank, write)


def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, schedule: Any,
                 reduction: str, sample_rate: float, generator: torch.Generator, class_weight: torch.Tensor | None,
                 device: torch.device) -> tuple[float, int, dict[str, str], tuple[float, int, float] | None]:  # fmt: skip
    """One pass over this worker's share; returns (summed loss, steps, bad samples seen, divergence):
    the pass stops at the first non-finite loss, and divergence is (that loss, its step, the learning
    rate), else None.

    Workers may take different numbers of steps (bad samples are skipped), so DDP's ``join`` keeps
    the gradient all-reduces matched.
    """
    model.train()
    loss_sum, steps, skipped = 0.0, 0, {}
    joined = model.join() if isinstance(model, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
    with joined:
        for images, targets, bad in loader:
            skipped.update({b.sample_id: b.reason for b in bad})
            if images is None:
                continue
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device):
                logits = model(images)
            loss = fcn.cross_entropy(logits.float(), targets, reduction=reduction, sample_rate=sample_rate,
                                     generator=generator, weight=class_weight)  # fmt: skip
            if not torch.isfinite(loss):  # the other ranks finish their pass under DDP's join
                return loss_sum, steps, skipped, (float(loss.item()), steps, schedule.get_last_lr()[0])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item()
            steps += 1
    return loss_sum, steps, skipped, None


def _merge_across_workers(local: dict[str, Any], world: int) -> dict[str, Any]:
    """Union of every worker's dict (bad sample id -> reason, rank -> divergence), sorted by key."""
    parts = [local]
    if world > 1:
        parts = [{} for _ in range(world)]
        dist.all_gather_object(parts, local)
    return dict(sorted(kv for part in parts for kv in part.items()))


def _report(metrics: dict[str, Any], dir_name: str, rank: int, write: Any = None) -> None:
    """Every rank reports (Ray Train needs all of them); rank 0 also persists a folder with
    ``metrics.json`` and whatever ``write(folder)`` adds, as ``<run>/<dir_name>/``."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            if write is not None:
                write(folder)
            with open(os.path.join(folder, registry.METRICS_FILE), "w") as f:
                json.dump(metrics, f, indent=1)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(flat, checkpoint=checkpoint, checkpoint_dir_name=dir_name)


def _validate(module: nn.Module, samples: Sequence[Sample], num_classes: int, convention: InputConvention,
              device: torch.device, rank: int, world: int) -> tuple[np.ndarray, dict[str, str]]:  # fmt: skip
    """Confusion matrix over this worker's share of ``samples`` (every world-th one, no duplicates),
    summed over all workers with an all-reduce; returns (hist, bad samples seen here)."""
    cuda = device.type == "cuda"
    predictor = fcn.Predictor(module, input_convention=convention, device=device, bf16=cuda, channels_last=cuda)
    matrix = fcn.ConfusionMatrix(num_classes)
    skipped = {}
    for sample in samples[rank::world]:
        try:
            rgb, labels = load_sample(sample, num_classes)
        except BadSample as bad:
            skipped[bad.sample_id] = bad.reason
            continue
        matrix.update(predictor(rgb).labels, labels)
    hist = torch.from_numpy(matrix.hist).to(device)
    if world > 1:
        dist.all_reduce(hist)
    return hist.cpu().numpy(), skipped


def _eval_loop(loop_config: dict[str, Any]) -> None:
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    ckpt = fcn.load_checkpoint(loop_config["checkpoint"])
    module = ckpt.model.to(device)
    num_classes = loop_config["num_classes"]
    hist, skipped = _validate(module, loop_config["samples"], num_classes, get_convention(ckpt.input_convention),
                              device, context.get_world_rank(), context.get_world_size())  # fmt: skip
    scores = fcn.ConfusionMatrix(num_classes, hist).scores()
    skipped = _merge_across_workers(skipped, context.get_world_size())
    # The results travel to the driver as a checkpoint folder holding only metrics.json.
    _report({**scores, "hist": hist.tolist(), "skipped_samples": skipped}, "evaluation", context.get_world_rank())


# ----------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.train",
        description="Train an FCN with Ray Train on a VOC-layout or images/+masks/ dataset and register it.",
    )
    add = parser.add_argument
    add("--data", required=True, help="dataset root (any fsspec URI): VOC layout or images/ + masks/")
    add("--registry", required=True, help="model registry root (any fsspec URI)")
    add("--model", default="fcn8s_vgg16", help="network builder name (default: %(default)s)")
    add("--init", help="checkpoint or registry to start from; tensors with matching names and shapes are copied")
    add("--backbone-weights", help="backbone weights for the builder (see fcn.get_model)")
    add("--workers", type=int, default=2, help="data-parallel workers (default: %(default)s)")
    add("--gpus-per-worker", type=float, default=0, help="GPUs per worker; > 0 trains with NCCL on GPUs")
    add("--cpus-per-worker", type=float, default=1)
    add("--epochs", type=int, default=10)
    add("--recipe", default="modern", help="'modern' (mean loss, poly lr, flips, scale) or 'paper' (summed loss, "
        "SGD momentum 0.99, fixed lr 1e-10/1e-12/1e-14 for 32s/16s/8s)")  # fmt: skip
    add("--lr", type=float, help="learning rate (default: the recipe's)")
    add("--width", type=float, default=1.0, help="channel width multiplier (default: %(default)s)")
    add("--geometry", default="reference", help="'reference' (pad 100, as the paper) or 'aligned'")
    add("--batch-size", type=int, default=1, help="images per worker step, padded with ignored pixels")
    add("--loss-sample-rate", type=float, default=1.0, help="fraction of loss terms kept (paper 3.4)")
    add("--input-convention", help="'torchvision' or 'caffe' (default: the --init checkpoint's, else torchvision)")
    add("--classes", help="file with one class name per line (default: <data>/class_names.txt, else VOC's for "
        "VOC-layout data with label ids up to 20, else class_0... up to the largest label id of the train split)")
    add("--class-weights", default=TrainConfig.class_weights, help=f"{CLASS_WEIGHTS_HELP} (default: %(default)s)")
    add("--run-name", help="run folder under <registry>/runs/; an existing run is resumed")
    add("--promote-margin", type=float, default=0.0, help="mean IU the run must beat the champion by")
    add("--no-promote", dest="promote", action="store_false", help="register the model version only")
    add("--max-failures", type=int, default=1, help="worker failures to recover from (-1: unlimited)")
    add("--keep-checkpoints", type=int, help="keep only the N best epochs (default: all)")
    add("--strict", action="store_true", help="check every sample first; fail on any bad sample")
    add("--seed", type=int, default=0)
    add("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    add("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: exit 0 on success, 2 on bad arguments or data, 1 if training fails."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.DEBUG if args.pop("verbose") else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    config = TrainConfig(**args)
    config.run_name = config.run_name or default_run_name(config.model)  # named here, so a resume can be told
    try:
        summary = run_training(config)  # validates the config first: ValueError names the option
    except ValueError as exc:
        parser.error(_cli_message(str(exc)))
    except KeyboardInterrupt:
        print(f"interrupted: run the same command with --run-name {config.run_name} to resume after the last "
              "finished epoch", file=sys.stderr)  # fmt: skip
        return 130
    except Exception as exc:  # noqa: BLE001  (report, do not dump a traceback on the user)
        logger.debug("training failed", exc_info=True)
        print(f"training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(_summary_report(summary), indent=2))
    return 0


def _cli_message(message: str) -> str:
    """'batch_size: ...' -> '--batch-size: ...' so the message names the option as typed."""
    name, sep, rest = message.partition(":")
    if sep and name in {f.replace("-", "_") for f in TrainConfig.__dataclass_fields__}:
        return f"--{name.replace('_', '-')}:{rest}"
    return message


def _summary_report(summary: TrainSummary) -> dict[str, Any]:
    return {
        "run_name": summary.run_name,
        "checkpoint": summary.checkpoint_uri,
        "epochs": summary.epochs,
        "best_epoch": summary.metrics["epoch"],
        **{k: summary.metrics[k] for k in SCORES},
        "version": summary.version,
        "promoted": summary.promoted,
        "skipped": summary.skipped,
    }


if __name__ == "__main__":
    sys.exit(main())
