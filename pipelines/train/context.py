"""Where a training run lives and how a worker reaches it: the run folder's layout, the ``WorkerContext``
a worker resumes from and reports to (Ray Train's, or ``LocalWorkerContext`` without Ray), and the
marker of a diverged run.

A run writes under ``<registry>/runs/<run>/``: ``epoch-NNNN/{checkpoint.pt,metrics.json,train_state.pt}``
(the checkpoint folders, which ``--keep-checkpoints`` prunes on Ray Train), ``history/epoch-NNNN.json``
(every epoch's metrics, never pruned) and ``diverged.json`` where the loss stopped being finite.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

import fsspec
import torch
import torch.distributed as dist

from fcn import registry

TRAIN_STATE_FILE = "train_state.pt"
EPOCH_DIR = "epoch-{:04d}"
HISTORY_DIR = "history"
DIVERGED_FILE = "diverged.json"


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
