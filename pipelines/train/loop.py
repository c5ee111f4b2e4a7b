"""The Ray Train adapter of the training worker (``worker.py``): ``train_loop`` and ``eval_loop`` are
the per-worker functions that ``TorchTrainer`` runs; they give the worker Ray Train's rank, device,
checkpoint to resume from and reporting.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import ray
import ray.train
import ray.train.torch

from pipelines.train.context import write_report_folder
from pipelines.train.worker import run_evaluation_worker, run_training_worker


class RayWorkerContext:
    """A worker's context on Ray Train: rank, world size and device from Ray Train, the checkpoint it
    restores after a failure or for a resumed run, and ``ray.train.report`` (a checkpoint from rank 0)."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    @contextlib.contextmanager
    def resume_folder(self) -> Iterator[str | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield folder

    def report(self, metrics: dict[str, Any], dir_name: str, write: Callable[[str], None] | None = None) -> None:
        flat = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                write_report_folder(folder, metrics, write)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(flat, checkpoint=checkpoint, checkpoint_dir_name=dir_name)


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker training function (``run_training_worker``); the ``--init`` state dict
    travels through the object store and is fetched only by a run that does not resume."""
    init = loop_config["init"]
    if init is not None:
        reference = init["state_dict"]
        loop_config = {**loop_config, "init": {**init, "state_dict": lambda: ray.get(reference)}}
    run_training_worker(loop_config, RayWorkerContext())


def eval_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker evaluation function (``run_evaluation_worker``)."""
    run_evaluation_worker(loop_config, RayWorkerContext())
