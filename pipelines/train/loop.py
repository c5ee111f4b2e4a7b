"""The Ray Train worker side: the training loop (build or restore the network, then train, validate and
report one checkpoint per epoch), validation with the paper's four metrics per head, and the evaluation loop.

A run writes under ``<registry>/runs/<run>/``: ``epoch-NNNN/{checkpoint.pt,metrics.json,train_state.pt}``
(Ray Train's checkpoint folders, which ``--keep-checkpoints`` prunes), ``history/epoch-NNNN.json`` (every
epoch's metrics, never pruned) and ``diverged.json`` where the loss stopped being finite.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import fcn
from fcn import registry
from fcn.classes import voc_palette
from fcn.conventions import InputConvention, get_convention
from pipelines.datasets import BadSample, Sample, read_example
from pipelines.train.config import TrainConfig
from pipelines.train.data import Labels, TrainImages, pad_collate
from pipelines.train.recipes import RECIPES

logger = logging.getLogger("pipelines.train")

SCORES = ("pixel_accuracy", "mean_accuracy", "mean_iu", "fw_iu")
"""The paper's four metrics. metrics.json holds the first head's at the top level (registry promotion
ranks by its ``mean_iu``) and each further head's under ``heads[<task>]``."""
TRAIN_STATE_FILE = "train_state.pt"
EPOCH_DIR = "epoch-{:04d}"
HISTORY_DIR = "history"
DIVERGED_FILE = "diverged.json"

Batch = tuple[torch.Tensor | None, Labels | None, list[BadSample]]
Divergence = tuple[float, int, float]
"""Where the loss stopped being finite: (that loss, its step, the learning rate)."""


def run_folder(registry_uri: str, run_name: str) -> str:
    """``<registry>/runs/<run>``: Ray Train's storage for the run, plus its history and markers."""
    return f"{registry_uri.rstrip('/')}/runs/{run_name}"


def copy_matching_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy every tensor whose name and shape match (e.g. FCN-32s -> FCN-16s); return (copied, left)."""
    own = model.state_dict()
    copied = [k for k, v in state_dict.items() if k in own and own[k].shape == v.shape]
    model.load_state_dict({k: state_dict[k] for k in copied}, strict=False)
    return copied, [k for k in own if k not in copied]


def scores_by_head(hists: Mapping[str, np.ndarray], heads: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The scores of metrics.json: the first head's four metrics, ``per_class_iu``, ``class_names`` and
    ``hist`` at the top level, and the same for each further head under ``heads[<task>]``."""
    first, *further = (_head_scores(hists[task], names) for task, names in heads.items())
    return {**first, "heads": dict(zip(list(heads)[1:], further))}


def _head_scores(hist: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    scores = fcn.ConfusionMatrix(len(class_names), hist).scores()
    return {**{k: scores[k] for k in SCORES}, "per_class_iu": scores["per_class_iu"],
            "class_names": list(class_names), "hist": hist.tolist()}  # fmt: skip


def train_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker training function: build or restore the model, then train, validate and report
    one checkpoint per epoch. ``loop_config["heads"]`` gives each head's class names (first: semantic)."""
    config = TrainConfig(**loop_config["config"])
    recipe = RECIPES[config.recipe]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    heads = loop_config["heads"]
    head_classes = {task: len(names) for task, names in heads.items()}
    convention = get_convention(loop_config["convention"])
    torch.manual_seed(config.seed)

    model = fcn.get_model(config.model, **config.model_kwargs(head_classes))
    start_epoch, train_state = 0, None
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as folder:
            saved = fcn.load_checkpoint(os.path.join(folder, registry.CHECKPOINT_FILE))
            model.load_state_dict(saved.model.state_dict())
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

    dataset = TrainImages(loop_config["train"], module.modalities, head_classes, convention, recipe, config.seed)
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
    run_uri = run_folder(config.registry, loop_config["run_name"])

    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        dataset.epoch = epoch
        loss_sum, steps, skipped, diverged = train_epoch(model, loader, optimizer, schedule, recipe.loss_reduction,
                                                         config.loss_sample_rate, loss_generator, loss_weight,
                                                         device)  # fmt: skip
        divergences = _merge_across_workers({f"{rank:06d}": diverged} if diverged else {}, world)
        if divergences:  # every rank stops here together: final, not a worker failure to retry
            if rank == 0:
                loss, step, lr = next(iter(divergences.values()))
                with fsspec.open(f"{run_uri}/{DIVERGED_FILE}", "w") as f:
                    json.dump({"epoch": epoch + 1, "step": step, "loss": repr(loss), "lr": lr}, f)
            return
        hists, val_skipped = validate(module, loop_config["val"], head_classes, convention, device, rank, world)
        totals = torch.tensor([loss_sum, steps], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(totals)
        all_skipped = _merge_across_workers(skipped | val_skipped, world)
        metrics = {
            "epoch": epoch + 1,
            "run_name": loop_config["run_name"],
            "model": config.model,
            "recipe": config.recipe,
            "lr": schedule.get_last_lr()[0],
            "train_loss": float(totals[0] / max(totals[1], 1)),
            **scores_by_head(hists, heads),
            "class_weights": class_weights,
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
                        _described(metrics))  # fmt: skip

        def write(folder: str) -> None:
            first, *further = heads
            fcn.save_checkpoint(
                module, os.path.join(folder, registry.CHECKPOINT_FILE), class_names=heads[first],
                head_class_names={task: heads[task] for task in further}, palette=voc_palette(),
                input_convention=convention.name, epoch=epoch + 1, run_name=loop_config["run_name"],
                recipe=config.recipe, layout=loop_config["layout"], mean_iu=metrics["mean_iu"],
                head_scores={task: {k: m[k] for k in SCORES} for task, m in metrics["heads"].items()},
                class_weights=class_weights,
            )  # fmt: skip
            torch.save({"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()},
                       os.path.join(folder, TRAIN_STATE_FILE))  # fmt: skip

        if rank == 0:  # the history outlives the checkpoint folders that --keep-checkpoints prunes
            fs, history = fsspec.core.url_to_fs(f"{run_uri}/{HISTORY_DIR}")
            fs.makedirs(history, exist_ok=True)
            registry.write_atomic(fs, f"{history}/{EPOCH_DIR.format(epoch + 1)}.json", json.dumps(metrics).encode())
        _report(metrics, EPOCH_DIR.format(epoch + 1), rank, write)


def train_epoch(model: nn.Module, loader: Iterable[Batch], optimizer: torch.optim.Optimizer, schedule: Any,
                reduction: str, sample_rate: float, generator: torch.Generator, class_weight: torch.Tensor | None,
                device: torch.device) -> tuple[float, int, dict[str, str], Divergence | None]:  # fmt: skip
    """One pass over this worker's share; returns (summed loss, steps, bad samples seen, divergence):
    the pass stops at the first non-finite loss, and divergence is (that loss, its step, the learning
    rate), else None.

    The loss is the sum of the heads' losses (as the reference SIFT Flow nets train), each ignoring
    label 255; ``class_weight`` weighs the first (semantic) head's. Workers may take different numbers
    of steps (bad samples are skipped), so DDP's ``join`` keeps the gradient all-reduces matched.
    """
    model.train()
    loss_sum, steps, skipped = 0.0, 0, {}
    joined = model.join() if isinstance(model, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
    with joined:
        for images, targets, bad in loader:
            skipped.update({b.sample_id: b.reason for b in bad})
            if images is None:
                continue
            images = images.to(device, non_blocking=True)
            targets = {head: target.to(device, non_blocking=True) for head, target in targets.items()}
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            first = next(iter(targets))
            with _autocast(device):
                outputs = model(images)
            scores = outputs if isinstance(outputs, dict) else {first: outputs}
            loss = sum(
                fcn.cross_entropy(scores[head].float(), target, reduction=reduction, sample_rate=sample_rate,
                                  generator=generator, weight=class_weight if head == first else None)
                for head, target in targets.items()
            )  # fmt: skip
            if not torch.isfinite(loss):  # the other ranks finish their pass under DDP's join
                return loss_sum, steps, skipped, (float(loss.item()), steps, schedule.get_last_lr()[0])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item()
            steps += 1
    return loss_sum, steps, skipped, None


def validate(module: nn.Module, samples: Sequence[Sample], head_classes: Mapping[str, int],
             convention: InputConvention, device: torch.device, rank: int,
             world: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:  # fmt: skip
    """Each head's confusion matrix over this worker's share of ``samples`` (every world-th one, no
    duplicates), summed over all workers with an all-reduce; returns (hists by head, bad samples seen here)."""
    cuda = device.type == "cuda"
    predictor = fcn.Predictor(module, input_convention=convention, device=device, bf16=cuda, channels_last=cuda)
    matrices = {head: fcn.ConfusionMatrix(classes) for head, classes in head_classes.items()}
    skipped = {}
    for sample in samples[rank::world]:
        try:
            example = read_example(sample, predictor.modalities, head_classes)
        except BadSample as bad:
            skipped[bad.sample_id] = bad.reason
            continue
        prediction = predictor(example.modalities)
        for head, matrix in matrices.items():  # the first head's prediction is the Prediction itself
            matrix.update(prediction.heads.get(head, prediction).labels, example.labels[head])
    hists = {}
    for head, matrix in matrices.items():
        hist = torch.from_numpy(matrix.hist).to(device)
        if world > 1:
            dist.all_reduce(hist)
        hists[head] = hist.cpu().numpy()
    return hists, skipped


def eval_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker evaluation function: score ``loop_config["checkpoint"]`` on its share of the samples."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    ckpt = fcn.load_checkpoint(loop_config["checkpoint"])
    heads = loop_config["heads"]
    hists, skipped = validate(ckpt.model.to(device), loop_config["samples"], {t: len(n) for t, n in heads.items()},
                              get_convention(ckpt.input_convention), device, rank, world)  # fmt: skip
    skipped = _merge_across_workers(skipped, world)
    # The results travel to the driver as a checkpoint folder holding only metrics.json.
    _report({**scores_by_head(hists, heads), "skipped_samples": skipped}, "evaluation", rank)


def _described(metrics: dict[str, Any]) -> str:
    """The four metrics of every head, for the log."""
    heads = {"": metrics, **{f"{task}: ": scores for task, scores in metrics["heads"].items()}}
    return " | ".join(prefix + " ".join(f"{k} {m[k]:.4f}" for k in SCORES) for prefix, m in heads.items())


def _merge_across_workers(local: dict[str, Any], world: int) -> dict[str, Any]:
    """Union of every worker's dict (bad sample id -> reason, rank -> divergence), sorted by key."""
    parts = [local]
    if world > 1:
        parts = [{} for _ in range(world)]
        dist.all_gather_object(parts, local)
    return dict(sorted(kv for part in parts for kv in part.items()))


def _report(metrics: dict[str, Any], dir_name: str, rank: int, write: Callable[[str], None] | None = None) -> None:
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


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
