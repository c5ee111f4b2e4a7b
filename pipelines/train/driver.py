"""The driver side: check the configuration against the data, run the workers on Ray Train, then
register the best epoch and promote it (``run_training``); score a checkpoint (``run_evaluation``).

Registration and promotion rank epochs and models by the first (semantic) head's validation mean IU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.fs
import ray
from fsspec.implementations.local import LocalFileSystem
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import fcn
from fcn import registry
from pipelines.common.options import ConfigError, flag
from pipelines.common.ray_utils import connect
from pipelines.train.config import GPUS_PER_WORKER_RULE, TrainConfig, whole_gpus
from pipelines.train.context import DIVERGED_FILE, EPOCH_DIR, HISTORY_DIR, raise_if_diverged, run_folder
from pipelines.train.datasets import SegmentationData, open_dataset
from pipelines.train.loop import eval_loop, train_loop
from pipelines.train.prepare import fit_to_data, make_loop_config

logger = logging.getLogger("pipelines.train")
RAY_TRAIN_CONSOLE = LoggingConfig(log_level="WARNING")
"""Ray Train's own console lines (worker-group start, every checkpoint and report as a dict): warnings only.
Its log files keep every level; the workers' progress lines are this project's."""
AUTOSCALING_COORDINATOR_WAIT_S = 120


@dataclass
class TrainSummary:
    """What a finished run produced; ``metrics`` are the best epoch's (see ``loop.scores_by_head``)."""

    run_name: str
    checkpoint_uri: str
    metrics: dict[str, Any]
    version: str | None
    promoted: bool
    epochs: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def run_training(config: TrainConfig) -> TrainSummary:
    """Train on Ray Train, register the best epoch and promote it if it beats the champion.

    Raises ConfigError naming the parameter for a bad configuration or data, before Ray starts.
    """
    config.validate()
    data = _open(config.data, config.classes, config.layout, flag("data"))
    loop_config = make_loop_config(config, data)
    run_name = loop_config["run_name"]
    run_uri = run_folder(config.registry, run_name)
    connect(config.ray_address)
    if loop_config["init"] is not None:  # shipped once through the object store
        loop_config["init"]["state_dict"] = ray.put(loop_config["init"]["state_dict"])
    storage_path, storage_filesystem = ray_storage(f"{config.registry.rstrip('/')}/runs")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=_scaling(config.workers, config.gpus_per_worker, config.cpus_per_worker),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            logging_config=RAY_TRAIN_CONSOLE,
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.keep_checkpoints,
                checkpoint_score_attribute=registry.SCORE_METRIC,
                checkpoint_score_order="max",
            ),
        ),
    )
    marker_fs, marker = fsspec.core.url_to_fs(f"{run_uri}/{DIVERGED_FILE}")
    if marker_fs.exists(marker):
        marker_fs.rm_file(marker)  # from an earlier attempt of this run name
    result = _fit_interruptibly(trainer)
    raise_if_diverged(run_uri, run_name)
    history = read_run_history(run_uri)
    if not history:
        raise RuntimeError(f"run {run_name!r} finished without a checkpoint under {run_uri}")
    best = best_epoch(history)
    checkpoint_uri = f"{run_uri}/{EPOCH_DIR.format(best['epoch'])}/{registry.CHECKPOINT_FILE}"
    version, promoted = None, False
    if math.isfinite(best[registry.SCORE_METRIC]):
        version = registry.register_model(config.registry, checkpoint_uri, best)
        if config.promote:
            decision = registry.promote_if_better(config.registry, version, margin=config.promote_margin)
            logger.info("run %s (%s): %s", run_name, version, decision.reason)
            promoted = decision.promote
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
    layout: str | None = None,
    split: str = "val",
    ray_address: str | None = None,
    storage: str | None = None,
) -> dict[str, Any]:
    """Score ``checkpoint`` (a file or a registry root) on a split of ``data`` with N Ray Train workers;
    returns every head's scores as metrics.json holds them (the first head's four metrics, per_class_iu,
    class_names and hist at the top level, further heads' under ``heads``) and the skipped samples.

    ``storage`` (any fsspec URI) holds Ray Train's run folder; the default, a local temporary
    folder, works on a single node; multi-node clusters need shared storage.
    """
    if split not in ("train", "val"):
        raise ConfigError("split", f"must be 'train' or 'val', got {split!r}")
    if not whole_gpus(gpus_per_worker):
        raise ConfigError("gpus_per_worker", f"{GPUS_PER_WORKER_RULE}, got {gpus_per_worker!r}")
    dataset = _open(data, classes, layout, "data")
    checkpoint_uri = registry.resolve_checkpoint_uri(checkpoint)
    heads = fit_to_data(
        fcn.load_checkpoint(checkpoint_uri).model, dataset, network_param="checkpoint", data_param="data"
    )
    connect(ray_address)
    with contextlib.ExitStack() as stack:
        if storage is None:
            storage = stack.enter_context(tempfile.TemporaryDirectory(prefix="fcn-eval-"))
        storage_path, storage_filesystem = ray_storage(storage)
        trainer = TorchTrainer(
            eval_loop,
            train_loop_config={
                "checkpoint": checkpoint_uri,
                "samples": list(getattr(dataset, split)),
                "heads": {head: list(names) for head, names in heads.items()},
            },
            scaling_config=_scaling(workers, gpus_per_worker, 1),
            run_config=RunConfig(
                name=f"eval-{uuid.uuid4().hex[:8]}",
                storage_path=storage_path,
                storage_filesystem=storage_filesystem,
                logging_config=RAY_TRAIN_CONSOLE,
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


def best_epoch(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch with the highest validation mean IU of the first head (NaN lowest), the latest among
    equals: the one Ray Train's ``CheckpointConfig(num_to_keep, checkpoint_score_attribute)`` keeps."""

    def rank(m: dict[str, Any]) -> tuple[float, int]:
        score = m[registry.SCORE_METRIC]
        return (-1.0 if math.isnan(score) else score, m["epoch"])

    return max(history, key=rank)


def read_run_history(run_uri: str) -> list[dict[str, Any]]:
    """The metrics of every finished epoch of a run, in epoch order, from ``history/`` (which
    ``--keep-checkpoints`` never prunes) and from the checkpoint folders (runs written before it)."""
    fs, root = fsspec.core.url_to_fs(run_uri)
    fs.invalidate_cache(root)
    files = fs.glob(f"{root}/epoch-*/{registry.METRICS_FILE}") + fs.glob(f"{root}/{HISTORY_DIR}/epoch-*.json")
    by_epoch = {m["epoch"]: m for m in (json.loads(fs.cat_file(p)) for p in sorted(files))}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _open(uri: str, classes: str | None, layout: str | None, param: str) -> SegmentationData:
    """``open_dataset``, its ValueError (no known layout, bad class names or label ids) a ConfigError."""
    try:
        return open_dataset(uri, classes=classes, layout=layout)
    except ValueError as error:
        raise ConfigError(param, str(error)) from None


def _scaling(workers: int, gpus_per_worker: float, cpus_per_worker: float) -> ScalingConfig:
    resources = {"CPU": cpus_per_worker} | ({"GPU": gpus_per_worker} if gpus_per_worker else {})
    return ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources)


def _start_autoscaling_coordinator() -> None:
    """Start the cluster's autoscaling coordinator if it is not running, and wait until it answers (at
    most ``AUTOSCALING_COORDINATOR_WAIT_S``).

    Ray Train's controller gives each of its resource requests to this detached actor (Ray Data's too)
    5 s, and on first use the actor's start-up falls within them: on a busy machine it takes longer, and
    the console gets a warning with a traceback ("Failed to send resource request") that asks nothing of
    the user. Started here, its start-up comes before the run's.
    """
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    coordinator = get_or_create_autoscaling_coordinator()
    ray.wait([coordinator.__ray_ready__.remote()], timeout=AUTOSCALING_COORDINATOR_WAIT_S)


def _fit_interruptibly(trainer: TorchTrainer) -> Any:
    """``trainer.fit()`` on a helper thread, so that Ctrl-C reaches this thread at once as
    KeyboardInterrupt (Ray Train's own handler would only abort the run and return); the driver then
    exits, Ray ends the run's actors, the finished epochs stay, and the same run name resumes. The
    thread is still inside Ray then: end the process with ``pipelines.common.ray_utils.exit_interrupted``.
    The cluster's autoscaling coordinator is started first (``_start_autoscaling_coordinator``)."""
    _start_autoscaling_coordinator()
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
