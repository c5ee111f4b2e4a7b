"""One training pass and one validation pass of a worker, the reductions across workers, and the scores
that metrics.json holds (the paper's four metrics per head)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import fcn
from fcn.conventions import InputConvention
from fcn.heads import nest_heads, split_heads
from pipelines.train.data import Labels
from pipelines.train.datasets import BadSample, Sample, read_example

SCORES = ("pixel_accuracy", "mean_accuracy", "mean_iu", "fw_iu")
"""The paper's four metrics. metrics.json holds the primary head's at the top level (registry promotion
ranks by its ``mean_iu``) and each further head's under ``heads[<head>]`` (``fcn.heads.nest_heads``)."""

Batch = tuple[torch.Tensor | None, Labels | None, list[BadSample]]
Divergence = tuple[float, int, float]
"""Where the loss stopped being finite: (that loss, its step, the learning rate)."""


class TimedBatches:
    """The batches of ``loader``, counting the images they hold and the seconds spent waiting for them."""

    def __init__(self, loader: Iterable[Batch]) -> None:
        self.loader, self.images, self.wait_s, self.started = loader, 0, 0.0, time.perf_counter()

    def __iter__(self) -> Iterator[Batch]:
        batches = iter(self.loader)
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            self.wait_s += time.perf_counter() - asked
            if batch is None:
                return
            self.images += 0 if batch[0] is None else len(batch[0])
            yield batch


def train_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    reduction: str,
    sample_rate: float,
    generator: torch.Generator,
    class_weight: torch.Tensor | None,
    device: torch.device,
) -> tuple[float, int, dict[str, str], Divergence | None]:
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
            primary, _ = split_heads(targets)
            with _autocast(device):
                scores = model(images)
            loss = sum(
                fcn.cross_entropy(
                    scores[head].float(),
                    target,
                    reduction=reduction,
                    sample_rate=sample_rate,
                    generator=generator,
                    weight=class_weight if head == primary else None,
                )
                for head, target in targets.items()
            )
            if not torch.isfinite(loss):  # the other ranks finish their pass under DDP's join
                if isinstance(model, nn.parallel.DistributedDataParallel):
                    # this step's gradient all-reduce, which the other ranks are in: zeros from here
                    sum(p.view(-1)[:0].sum() for p in model.parameters() if p.requires_grad).backward()
                return loss_sum, steps, skipped, (float(loss.item()), steps, schedule.get_last_lr()[0])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item()
            steps += 1
    return loss_sum, steps, skipped, None


def validate(
    module: nn.Module,
    samples: Sequence[Sample],
    head_classes: Mapping[str, int],
    convention: InputConvention,
    device: torch.device,
    rank: int,
    world: int,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Each head's confusion matrix over this worker's share of ``samples`` (every world-th one, no
    duplicates), summed over all workers with an all-reduce; returns (hists by head, bad samples seen here)."""
    cuda = device.type == "cuda"
    bf16 = fcn.resolve_precision("auto", device) == "bf16"
    predictor = fcn.Predictor(module, input_convention=convention, device=device, bf16=bf16, channels_last=cuda)
    matrices = {head: fcn.ConfusionMatrix(classes) for head, classes in head_classes.items()}
    skipped = {}
    for sample in samples[rank::world]:
        try:
            example = read_example(sample, predictor.modalities, head_classes)
        except BadSample as bad:
            skipped[bad.sample_id] = bad.reason
            continue
        prediction = predictor(example.modalities)
        for head, matrix in matrices.items():
            matrix.update(prediction.heads[head].labels, example.labels[head])
    hists = {}
    for head, matrix in matrices.items():
        hist = torch.from_numpy(matrix.hist).to(device)
        if world > 1:
            dist.all_reduce(hist)
        hists[head] = hist.cpu().numpy()
    return hists, skipped


def scores_by_head(hists: Mapping[str, np.ndarray], heads: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The scores of metrics.json: each head's four metrics, ``per_class_iu``, ``class_names`` and ``hist``,
    the primary head's at the top level and each further head's under ``heads[<head>]``."""
    return nest_heads({head: _head_scores(hists[head], names) for head, names in heads.items()})


def _head_scores(hist: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    scores = fcn.ConfusionMatrix(len(class_names), hist).scores()
    return {
        **{k: scores[k] for k in SCORES},
        "per_class_iu": scores["per_class_iu"],
        "class_names": list(class_names),
        "hist": hist.tolist(),
    }


def describe_scores(metrics: dict[str, Any]) -> str:
    """The four metrics of every head, for the log."""
    heads = {"": metrics, **{f"{head}: ": scores for head, scores in metrics["heads"].items()}}
    return " | ".join(prefix + " ".join(f"{k} {m[k]:.4f}" for k in SCORES) for prefix, m in heads.items())


def merge_across_workers(local: dict[str, Any], world: int) -> dict[str, Any]:
    """Union of every worker's dict (bad sample id -> reason, rank -> divergence), sorted by key."""
    parts = [local]
    if world > 1:
        parts = [{} for _ in range(world)]
        dist.all_gather_object(parts, local)
    return dict(sorted(kv for part in parts for kv in part.items()))


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where ``fcn.resolve_precision`` picks it (Ampere or newer GPUs), else fp32."""
    if fcn.resolve_precision("auto", device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
