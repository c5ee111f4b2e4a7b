"""The training worker with torch alone: build or restore the network, then train, validate and report
one checkpoint per epoch (``run_training_worker``), or score a checkpoint (``run_evaluation_worker``).

Nothing here imports Ray: Ray Train runs these functions through ``loop.py``, and a caller without Ray
runs them with a ``LocalWorkerContext`` and ``torch.distributed`` initialised by hand (gloo on CPU,
NCCL on CUDA). Training end to end, then a resume of the same run::

    import torch
    import torch.distributed as dist
    from pipelines.train.datasets import open_dataset
    from pipelines.train.config import TrainConfig
    from pipelines.train.worker import LocalWorkerContext, make_loop_config, run_folder, run_training_worker

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

A run writes under ``<registry>/runs/<run>/``: ``epoch-NNNN/{checkpoint.pt,metrics.json,train_state.pt}``
(the checkpoint folders, which ``--keep-checkpoints`` prunes on Ray Train), ``history/epoch-NNNN.json``
(every epoch's metrics, never pruned) and ``diverged.json`` where the loss stopped being finite.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, Protocol

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import fcn
from fcn import registry
from fcn.classes import voc_palette
from fcn.conventions import InputConvention, get_convention
from pipelines.common.options import ConfigError, flag
from pipelines.train.class_weights import resolve_class_weights
from pipelines.train.config import TrainConfig
from pipelines.train.data import EpochIndices, Labels, TrainImages, pad_collate
from pipelines.train.datasets import BadSample, Sample, SegmentationData, read_example
from pipelines.train.recipes import RECIPES

logger = logging.getLogger("pipelines.train")

SCORES = ("pixel_accuracy", "mean_accuracy", "mean_iu", "fw_iu")
"""The paper's four metrics. metrics.json holds the first head's at the top level (registry promotion
ranks by its ``mean_iu``) and each further head's under ``heads[<task>]``."""
TRAIN_STATE_FILE = "train_state.pt"
EPOCH_DIR = "epoch-{:04d}"
HISTORY_DIR = "history"
DIVERGED_FILE = "diverged.json"
MAX_LOADER_WORKERS = 4
"""The default data loader processes of a training worker on a GPU (at most its CPUs)."""

Batch = tuple[torch.Tensor | None, Labels | None, list[BadSample]]
Divergence = tuple[float, int, float]
"""Where the loss stopped being finite: (that loss, its step, the learning rate)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: final (never retried like a worker failure)."""


def raise_if_diverged(run_uri: str, run_name: str) -> None:
    """TrainingDiverged naming the epoch, step, loss and learning rate where the run's workers stopped on a
    non-finite loss (its ``diverged.json``); nothing where they did not."""
    fs, marker = fsspec.core.url_to_fs(f"{run_uri}/{DIVERGED_FILE}")
    fs.invalidate_cache()
    if fs.exists(marker):
        where = json.loads(fs.cat_file(marker))
        raise TrainingDiverged(
            f"run {run_name!r} diverged at epoch {where['epoch']}, step {where['step']}: loss is {where['loss']} "
            f"(lr={where['lr']:g}); lower the learning rate. Nothing was registered."
        )


class WorkerContext(Protocol):
    """What a worker needs from the engine that runs it (Ray Train, or ``LocalWorkerContext``)."""

    rank: int
    world_size: int
    device: torch.device

    def resume_folder(self) -> contextlib.AbstractContextManager[str | None]:
        """A local folder holding the checkpoint to resume from, or None to start afresh."""

    def report(self, metrics: dict[str, Any], dir_name: str, write: Callable[[str], None] | None = None) -> None:
        """Called by every rank; rank 0's ``metrics`` (and whatever ``write(folder)`` adds) become the
        run's folder ``<dir_name>`` (see ``write_report_folder``)."""


def write_report_folder(folder: str, metrics: dict[str, Any], write: Callable[[str], None] | None) -> None:
    """Fill ``folder`` with what ``write(folder)`` writes, then ``metrics.json``."""
    if write is not None:
        write(folder)
    with open(os.path.join(folder, registry.METRICS_FILE), "w") as f:
        json.dump(metrics, f, indent=1)


class LocalWorkerContext:
    """A worker's context without Ray: rank and world size from ``torch.distributed`` (0 and 1 where it
    is not initialised), reported folders saved as ``<run_uri>/<dir_name>/`` (any fsspec URI), and a
    resume from the latest complete ``epoch-NNNN`` folder there. ``reports`` lists every (dir_name,
    metrics) reported by this process."""

    def __init__(self, run_uri: str, device: torch.device | str) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if initialised else 0
        self.world_size = dist.get_world_size() if initialised else 1
        self.device = torch.device(device)
        self.run_uri = run_uri.rstrip("/")
        self.reports: list[tuple[str, dict[str, Any]]] = []

    @contextlib.contextmanager
    def resume_folder(self) -> Iterator[str | None]:
        fs, root = fsspec.core.url_to_fs(self.run_uri)
        fs.invalidate_cache(root)
        complete = [
            p.rsplit("/", 2)[-2]
            for p in fs.glob(f"{root}/epoch-*/{registry.METRICS_FILE}")
            if fs.exists(f"{p.rsplit('/', 1)[0]}/{TRAIN_STATE_FILE}")
        ]
        if not complete:
            yield None
            return
        latest = f"{root}/{max(complete)}"  # EPOCH_DIR's numbers are zero-padded
        with tempfile.TemporaryDirectory(prefix="fcn-resume-") as folder:
            for path in fs.ls(latest, detail=False):
                fs.get_file(path, os.path.join(folder, path.rsplit("/", 1)[-1]))
            yield folder

    def report(self, metrics: dict[str, Any], dir_name: str, write: Callable[[str], None] | None = None) -> None:
        self.reports.append((dir_name, metrics))
        if self.rank != 0:
            return
        fs, root = fsspec.core.url_to_fs(f"{self.run_uri}/{dir_name}")
        fs.makedirs(root, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            write_report_folder(folder, metrics, write)
            names = sorted(os.listdir(folder), key=lambda name: name == registry.METRICS_FILE)  # metrics.json last
            for name in names:  # a folder with metrics.json is complete
                fs.put_file(os.path.join(folder, name), f"{root}/{name}")


def run_folder(registry_uri: str, run_name: str) -> str:
    """``<registry>/runs/<run>``: the run's checkpoint folders, history and markers."""
    return f"{registry_uri.rstrip('/')}/runs/{run_name}"


def default_run_name(model: str) -> str:
    """``<model>-<UTC time>``, the run name when none is given."""
    return f"{model}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def make_loop_config(config: TrainConfig, data: SegmentationData) -> dict[str, Any]:
    """The workers' configuration for training ``config`` on the opened ``data``: the heads sized from
    the data, the class weights, the ``--init`` weights and the input convention resolved.

    Raises ConfigError naming the parameter where the model, data, class weights or ``--init`` do not fit
    (``--strict``: where any sample is bad). ``config`` must be valid (``config.validate()``).
    """
    with torch.device("meta"):
        network = fcn.get_model(config.model, width=config.width, geometry=config.geometry)
    heads = fit_to_data(network, data, network_param=flag("model"), data_param=flag("data"))
    if len(heads) < len(data.heads):
        logger.info(
            "%s has the head(s) %s: the data's further head(s) %s are not trained",
            config.model,
            list(heads),
            [task for task in data.heads if task not in heads],
        )
    try:
        class_weights = resolve_class_weights(config.class_weights, data)
    except ValueError as error:
        raise ConfigError(flag("class_weights"), str(error)) from None
    if class_weights is not None:
        logger.info(
            "class weights (%s) of the semantic head: %s", config.class_weights, [round(w, 4) for w in class_weights]
        )
    if config.strict:
        check_all_samples(data.train + data.val, network.modalities, {task: len(n) for task, n in heads.items()})
    init = load_init(config.init) if config.init else None
    return {
        "config": asdict(config),
        "run_name": config.run_name or default_run_name(config.model),
        "heads": {task: list(names) for task, names in heads.items()},
        "layout": data.layout,
        "class_weights": class_weights,
        "train": list(data.train),
        "val": list(data.val),
        "convention": config.input_convention or (init["input_convention"] if init else "torchvision"),
        "init": init,
    }


def fit_to_data(
    network: nn.Module, data: SegmentationData, *, network_param: str, data_param: str
) -> dict[str, tuple[str, ...]]:
    """The class names of each of ``network``'s heads, from ``data``.

    Raises ConfigError (naming ``network_param`` and ``data_param``) when the data lacks an input
    modality or a head of the network. A data head the network lacks is left out (a one-head network
    on SIFT Flow data trains its semantic head only).
    """
    name = network.arch["name"]
    where = f"{data_param} {data.root} ({data.layout} layout)"
    missing = [m for m in network.modalities if m not in data.modalities]
    if missing:
        raise ConfigError(
            network_param,
            f"{name} reads {list(network.modalities)}, but {where} has no {missing}: "
            f"choose a model that reads only {list(data.modalities)}",
        )
    lacking = [task for task in network.head_classes if task not in data.heads]
    if lacking:
        raise ConfigError(
            network_param,
            f"{name} has the heads {list(network.head_classes)}, but {where} has no "
            f"{lacking} labels: choose a model with only {list(data.heads)}",
        )
    return {task: data.heads[task] for task in network.head_classes}


def check_all_samples(samples: Sequence[Sample], modalities: Sequence[str], head_classes: dict[str, int]) -> None:
    """``--strict``: read every sample's ``modalities`` and labels up front; ConfigError listing the bad ones."""

    def check(sample: Sample) -> str | None:
        try:
            read_example(sample, modalities, head_classes)
        except BadSample as bad:
            return str(bad)
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for p in pool.map(check, samples) if p]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise ConfigError(flag("strict"), f"{len(problems)} bad samples: {shown}")


def load_init(uri: str) -> dict[str, Any]:
    """State dict (on the CPU) and input convention of the checkpoint (or registry champion) to start from."""
    try:
        ckpt = fcn.load_checkpoint(uri)
    except fcn.CheckpointError as error:
        raise ConfigError(flag("init"), str(error)) from None
    return {
        "uri": ckpt.uri,
        "state_dict": {k: v.cpu() for k, v in ckpt.model.state_dict().items()},
        "input_convention": ckpt.input_convention,
    }


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
    return {
        **{k: scores[k] for k in SCORES},
        "per_class_iu": scores["per_class_iu"],
        "class_names": list(class_names),
        "hist": hist.tolist(),
    }


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
    head_classes = {task: len(names) for task, names in heads.items()}
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
                "epoch %d/%d loss %.4f | %s", epoch + 1, config.epochs, metrics["train_loss"], _described(metrics)
            )

        def write(folder: str) -> None:
            first, *further = heads
            fcn.save_checkpoint(
                module,
                os.path.join(folder, registry.CHECKPOINT_FILE),
                class_names=heads[first],
                head_class_names={task: heads[task] for task in further},
                palette=voc_palette(),
                input_convention=convention.name,
                epoch=epoch + 1,
                run_name=loop_config["run_name"],
                recipe=config.recipe,
                layout=loop_config["layout"],
                mean_iu=metrics["mean_iu"],
                head_scores={task: {k: m[k] for k in SCORES} for task, m in metrics["heads"].items()},
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
            first = next(iter(targets))
            with _autocast(device):
                outputs = model(images)
            scores = outputs if isinstance(outputs, dict) else {first: outputs}
            loss = sum(
                fcn.cross_entropy(
                    scores[head].float(),
                    target,
                    reduction=reduction,
                    sample_rate=sample_rate,
                    generator=generator,
                    weight=class_weight if head == first else None,
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
        for head, matrix in matrices.items():  # the first head's prediction is the Prediction itself
            matrix.update(prediction.heads.get(head, prediction).labels, example.labels[head])
    hists = {}
    for head, matrix in matrices.items():
        hist = torch.from_numpy(matrix.hist).to(device)
        if world > 1:
            dist.all_reduce(hist)
        hists[head] = hist.cpu().numpy()
    return hists, skipped


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


def _described(metrics: dict[str, Any]) -> str:
    """The four metrics of every head, for the log."""
    heads = {"": metrics, **{f"{task}: ": scores for task, scores in metrics["heads"].items()}}
    return " | ".join(prefix + " ".join(f"{k} {m[k]:.4f}" for k in SCORES) for prefix, m in heads.items())


def merge_across_workers(local: dict[str, Any], world: int) -> dict[str, Any]:
    """Union of every worker's dict (bad sample id -> reason, rank -> divergence), sorted by key."""
    parts = [local]
    if world > 1:
        parts = [{} for _ in range(world)]
        dist.all_gather_object(parts, local)
    return dict(sorted(kv for part in parts for kv in part.items()))


def _use_device(device: torch.device | str) -> torch.device:
    """``device`` with its index (``cuda``: the current GPU), made the current GPU: NCCL and
    ``all_gather_object`` use the current one."""
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where ``fcn.resolve_precision`` picks it (Ampere or newer GPUs), else fp32."""
    if fcn.resolve_precision("auto", device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
