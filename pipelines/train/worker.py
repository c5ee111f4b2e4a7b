"""The training worker with torch alone: build or restore the network, then train, validate and report
one checkpoint per epoch (``run_training_worker``), or score a checkpoint (``run_evaluation_worker``).

Nothing here imports Ray: Ray Train runs these functions through ``loop.py``, and a caller without Ray
runs them with a ``LocalWorkerContext`` and ``torch.distributed`` initialised by hand (gloo on CPU,
NCCL on CUDA). Training end to end, then a resume of the same run::

    import torch
    import torch.distributed as dist
    from pipelines.train.datasets import open_dataset
    from pipelines.train.config import TrainConfig
    from pipelines.train.context import LocalWorkerContext, run_folder
    from pipelines.train.prepare import make_loop_config
    from pipelines.train.worker import run_training_worker

    config = TrainConfig(data="/data/voc", registry="/tmp/registry", model="fcn8s_vgg16", workers=1,
                         gpus_per_worker=1, epochs=2, run_name="check")
    config.validate()
    loop_config = make_loop_config(config, open_dataset(config.data))
    device = torch.device("cuda", 0)  # or torch.device("cpu") with the "gloo" backend
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29500", rank=0, world_size=1, device_id=device)
    context = LocalWorkerContext(run_folder(config.registry, loop_config["run_name"]), device)
    run_training_worker(loop_config, context)  # writes <registry>/runs/check/epoch-0001, epoch-0002
    context.reports[-1][1]["mean_iu"], context.reports[-1][1]["train_images_per_s"]
    # the same run_name resumes from its latest epoch folder (model, optimizer and schedule)
    more = make_loop_config(TrainConfig(**{**loop_config["config"], "epochs": 3}), open_dataset(config.data))
    run_training_worker(more, LocalWorkerContext(run_folder(config.registry, "check"), device))
    dist.destroy_process_group()

The run's folders are described in ``context.py``; one epoch's training and validation passes live in
``epoch.py``, what the driver prepares for the workers in ``prepare.py``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import fsspec
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import fcn
from fcn import registry
from fcn.classes import voc_palette
from fcn.conventions import get_convention
from fcn.heads import split_heads
from pipelines.train.config import TrainConfig
from pipelines.train.context import DIVERGED_FILE, EPOCH_DIR, HISTORY_DIR, TRAIN_STATE_FILE, WorkerContext, run_folder
from pipelines.train.data import EpochIndices, TrainImages, pad_collate
from pipelines.train.epoch import (
    SCORES,
    TimedBatches,
    describe_scores,
    merge_across_workers,
    scores_by_head,
    train_epoch,
    validate,
)
from pipelines.train.prepare import copy_matching_weights
from pipelines.train.recipes import RECIPES

logger = logging.getLogger("pipelines.train")

MAX_LOADER_WORKERS = 4
"""The default data loader processes of a training worker on a GPU (at most its CPUs)."""


def loader_workers(config: TrainConfig, device: torch.device) -> int:
    """``--loader-workers``, else ``MAX_LOADER_WORKERS`` (at most the worker's CPUs) on a GPU and 0 on
    the CPU, where the network and the decoding share the worker's CPUs anyway."""
    if config.loader_workers is not None:
        return config.loader_workers
    return max(1, min(MAX_LOADER_WORKERS, int(config.cpus_per_worker))) if device.type == "cuda" else 0


def make_loader(
    dataset: TrainImages, sampler: DistributedSampler, batch_size: int, workers: int, device: torch.device
) -> DataLoader:
    """Batches of ``dataset`` in ``sampler``'s order, decoded and augmented by ``workers`` persistent
    processes (0: in this one) ahead of the network, in pinned memory for a GPU. Each index carries the
    sampler's epoch (``EpochIndices``), so the augmentation changes every epoch in every process; the
    loader draws its own seeds from a generator of its own, so that the global one (dropout) runs the
    same with any number of processes."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochIndices(sampler),
        collate_fn=pad_collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(dataset.seed),
    )


def run_training_worker(loop_config: dict[str, Any], context: WorkerContext) -> None:
    """One training worker (``context.rank`` of ``context.world_size``): build the model, or restore it,
    its optimizer and schedule from ``context.resume_folder()``; then train, validate and report one
    checkpoint folder per epoch. ``loop_config`` comes from ``make_loop_config``; its ``init`` state dict
    may be given as a loader (a callable returning it). Stops, writing ``diverged.json``, on every rank
    at once when any rank's loss is not finite."""
    config = TrainConfig(**loop_config["config"])
    recipe = RECIPES[config.recipe]
    rank, world, device = context.rank, context.world_size, _use_device(context.device)
    heads = loop_config["heads"]
    head_classes = {head: len(names) for head, names in heads.items()}
    convention = get_convention(loop_config["convention"])
    torch.manual_seed(config.seed)

    model = fcn.get_model(config.model, **config.model_kwargs(head_classes))
    start_epoch, train_state, resumed = 0, None, False
    with context.resume_folder() as folder:
        if folder is not None:
            saved = fcn.load_checkpoint(os.path.join(folder, registry.CHECKPOINT_FILE))
            model.load_state_dict(saved.model.state_dict())
            # saved from rank 0's device: onto the CPU here, the optimizer moves it onto its parameters' device
            train_state = torch.load(os.path.join(folder, TRAIN_STATE_FILE), map_location="cpu", weights_only=True)
            start_epoch, resumed = train_state["epoch"], True
    if resumed and rank == 0:
        logger.info("run %s: resuming after epoch %d", loop_config["run_name"], start_epoch)
    elif not resumed and loop_config["init"] is not None:
        state_dict = loop_config["init"]["state_dict"]
        copied, left = copy_matching_weights(model, state_dict() if callable(state_dict) else state_dict)
        if rank == 0:
            logger.info(
                "init from %s: copied %d tensors, %d new: %s", loop_config["init"]["uri"], len(copied), len(left), left
            )
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    dataset = TrainImages(loop_config["train"], module.modalities, head_classes, convention, recipe, config.seed)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
    loader = make_loader(dataset, sampler, config.batch_size, loader_workers(config, device), device)
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
        timed = TimedBatches(loader)
        loss_sum, steps, skipped, diverged = train_epoch(
            model,
            timed,
            optimizer,
            schedule,
            recipe.loss_reduction,
            config.loss_sample_rate,
            loss_generator,
            loss_weight,
            device,
        )
        seconds = time.perf_counter() - timed.started
        divergences = merge_across_workers({f"{rank:06d}": diverged} if diverged else {}, world)
        if divergences:  # every rank stops here together: final, not a worker failure to retry
            if rank == 0:
                loss, step, lr = next(iter(divergences.values()))
                with fsspec.open(f"{run_uri}/{DIVERGED_FILE}", "w") as f:
                    json.dump({"epoch": epoch + 1, "step": step, "loss": repr(loss), "lr": lr}, f)
            return
        hists, val_skipped = validate(module, loop_config["val"], head_classes, convention, device, rank, world)
        # summed over the ranks: loss, steps, images, seconds waiting for the loader, seconds of the pass
        totals = torch.tensor(
            [loss_sum, steps, timed.images, timed.wait_s, seconds], dtype=torch.float64, device=device
        )
        if world > 1:
            dist.all_reduce(totals)
        loss_total, steps_total, images, wait_s, pass_s = totals.tolist()
        all_skipped = merge_across_workers(skipped | val_skipped, world)
        metrics = {
            "epoch": epoch + 1,
            "run_name": loop_config["run_name"],
            "model": config.model,
            "recipe": config.recipe,
            "lr": schedule.get_last_lr()[0],
            "train_loss": loss_total / max(steps_total, 1),
            **scores_by_head(hists, heads),
            "class_weights": class_weights,
            "skipped": len(all_skipped),
            "skipped_samples": all_skipped,
            "resumed_from_epoch": start_epoch if resumed else None,
            "world_size": world,
            "train_images_per_s": images / max(pass_s / world, 1e-9),
            "loader_wait_fraction": wait_s / max(pass_s, 1e-9),
        }
        if all_skipped and rank == 0:
            logger.warning(
                "epoch %d: skipped %d bad samples: %s",
                epoch + 1,
                len(all_skipped),
                "; ".join(f"{k}: {v}" for k, v in list(all_skipped.items())[:5]),
            )
        if rank == 0:
            logger.info(
                "epoch %d/%d loss %.4f | %s", epoch + 1, config.epochs, metrics["train_loss"], describe_scores(metrics)
            )

        def write(folder: str) -> None:
            primary, further = split_heads(heads)
            fcn.save_checkpoint(
                module,
                os.path.join(folder, registry.CHECKPOINT_FILE),
                class_names=heads[primary],
                head_class_names={head: heads[head] for head in further},
                palette=voc_palette(),
                input_convention=convention.name,
                epoch=epoch + 1,
                run_name=loop_config["run_name"],
                recipe=config.recipe,
                layout=loop_config["layout"],
                mean_iu=metrics["mean_iu"],
                head_scores={head: {k: m[k] for k in SCORES} for head, m in metrics["heads"].items()},
                class_weights=class_weights,
            )
            torch.save(
                {"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()},
                os.path.join(folder, TRAIN_STATE_FILE),
            )

        if rank == 0:  # the history outlives the checkpoint folders that --keep-checkpoints prunes
            fs, history = fsspec.core.url_to_fs(f"{run_uri}/{HISTORY_DIR}")
            fs.makedirs(history, exist_ok=True)
            registry.write_atomic(fs, f"{history}/{EPOCH_DIR.format(epoch + 1)}.json", json.dumps(metrics).encode())
        context.report(metrics, EPOCH_DIR.format(epoch + 1), write)


def run_evaluation_worker(loop_config: dict[str, Any], context: WorkerContext) -> None:
    """One evaluation worker: score ``loop_config["checkpoint"]`` on its share of ``loop_config["samples"]``;
    rank 0 reports every head's scores and the skipped samples as the folder ``evaluation``."""
    rank, world, device = context.rank, context.world_size, _use_device(context.device)
    ckpt = fcn.load_checkpoint(loop_config["checkpoint"])
    heads = loop_config["heads"]
    hists, skipped = validate(
        ckpt.model.to(device),
        loop_config["samples"],
        {t: len(n) for t, n in heads.items()},
        get_convention(ckpt.input_convention),
        device,
        rank,
        world,
    )
    skipped = merge_across_workers(skipped, world)
    context.report({**scores_by_head(hists, heads), "skipped_samples": skipped}, "evaluation")


def _use_device(device: torch.device | str) -> torch.device:
    """``device`` with its index (``cuda``: the current GPU), made the current GPU: NCCL and
    ``all_gather_object`` use the current one."""
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device
