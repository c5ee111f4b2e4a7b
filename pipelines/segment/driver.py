"""The segmentation job's driver: list, decide what is done, stream the rest through Ray Data, compact
the statistics, then write ``manifest.json`` and, last, ``_SUCCESS``.

A rerun into the same output skips images whose newest row is ``ok`` for the same source and model.
Every listed image ends with exactly one stats row.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from fcn.registry import write_atomic
from pipelines.common.ray_utils import connect
from pipelines.common.storage import with_retries
from pipelines.segment import infer, load, resume, write
from pipelines.segment.config import ConfigError, SegmentConfig, flag
from pipelines.segment.listing import InputError, list_images
from pipelines.segment.model import ModelInfo, checkpoint_exists, describe_model
from pipelines.segment.progress import LIVE_REFRESH_S, Progress, Tally
from pipelines.segment.schema import STATUS_OK, stats_schema

logger = logging.getLogger("pipelines.segment")

MANIFEST_FILE = "manifest.json"
SUCCESS_FILE = "_SUCCESS"
ERROR_SAMPLES = 20
BLOCKS_PER_ACTOR = 4  # at least this many input blocks per FCN actor (while blocks hold >= batch_size rows)


@dataclass
class SegmentSummary:
    """What a run did; also written (with the config) to ``<output>/manifest.json``."""

    run_id: str
    input: str
    output: str
    model: str  # "<architecture> <version>"
    model_id: str  # the checkpoint file used (a registry's champion resolved at the start)
    model_version: str
    listed: int
    ok: int
    error: int
    skipped: int
    duration_s: float  # the whole run: listing, Ray start-up, pipeline, compaction, manifest
    startup_s: float  # from the start of the run to the first segmented batch (Ray, actors, model loading)
    images_per_second: float  # steady state: images segmented from the first segmented batch to the last
    end_to_end_images_per_second: float  # images processed (ok + error) per second of the whole run
    stats_uri: str
    masks_uri: str
    manifest_uri: str
    success_uri: str
    errors: list[dict[str, str]] = field(default_factory=list)  # the first few {image_uri, error}


@dataclass
class _RayRun:
    """What the Ray part of a run reports back to ``run_segmentation``."""

    ok: int = 0
    error: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    first_segmented: float | None = None  # time.monotonic() of the first and last segmented batch
    last_segmented: float | None = None
    first_count: int = 0  # images in the first segmented batch(es) seen
    segmented: int = 0


def run_segmentation(config: SegmentConfig) -> SegmentSummary:
    """Run one segmentation job (see the module docstring). Raises ConfigError for bad parameters."""
    config.validate()
    clock = time.monotonic()
    started = datetime.now(UTC)
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    so = config.storage_options
    out_fs, out_root = fsspec.core.url_to_fs(config.output, **so)
    out_root = out_root.rstrip("/")
    output = out_fs.unstrip_protocol(out_root)
    stats_uri, masks_uri = f"{output}/{write.STATS_DIR}", f"{output}/{write.MASKS_DIR}"
    success_path = f"{out_root}/{SUCCESS_FILE}"
    if not checkpoint_exists(config.model, so):
        describe_model(config.model, so)  # raises the ConfigError that names --model
    try:
        listing = list_images(config.input, so, exclude=output)
    except InputError as error:
        raise ConfigError(flag("input"), str(error)) from None
    except (OSError, ValueError) as error:
        raise ConfigError(flag("input"), f"cannot list {config.input}: {type(error).__name__}: {error}") from None
    _check_writable(out_fs, out_root, run_id, config.write_retries)

    def plan() -> tuple[ModelInfo, pa.Table, pa.Table, bool]:
        """The model's description, the stats rows already there, the images still to segment, and
        whether the last run finished (so its rows are compacted: one per key) (on a thread, while Ray
        starts)."""
        import ray.data  # noqa: F401 - a second of imports, also done while Ray starts

        model = describe_model(config.model, so)  # imports torch: seconds
        _check_depth(config, model)
        finished = out_fs.exists(success_path)
        if finished:
            out_fs.rm_file(success_path)  # a stale marker must not vouch for this run's partial output
        state = resume.read_state(stats_uri, so)
        return (
            model,
            state,
            resume.todo_images(listing.images, state, model.uri, model.version, unique_keys=finished),
            finished,
        )

    with ThreadPoolExecutor(1, thread_name_prefix="plan") as pool:
        planned = pool.submit(plan)
        connect(config.ray_address)  # here: Ray ties its processes' lives to the thread that starts them
        model, previous, todo, finished = planned.result()
    listed, done = listing.images.num_rows, listing.images.num_rows - todo.num_rows
    logger.info(
        "run %s: %d images at %s (%s), %d already done, %d to segment with %s",
        run_id,
        listed,
        listing.prefix or config.input,
        listing.kind,
        done,
        todo.num_rows,
        model.label,
    )
    ray_run = _segment_on_ray(config, todo, output, run_id, model) if todo.num_rows else _RayRun()

    written = resume.compact(stats_uri, so, run_id, previous, unique_keys=finished, retries=config.write_retries)
    missing = pc.invert(pc.is_in(todo["key"], value_set=written))
    if pc.any(missing).as_py():
        examples = todo["key"].filter(missing).slice(0, 3).to_pylist()
        raise RuntimeError(f"{pc.sum(missing).as_py()} images have no stats row after the run (e.g. {examples})")
    duration = time.monotonic() - clock
    summary = SegmentSummary(
        run_id=run_id,
        input=config.input,
        output=output,
        model=model.label,
        model_id=model.uri,
        model_version=model.version,
        listed=listed,
        ok=ray_run.ok,
        error=ray_run.error,
        skipped=done,
        duration_s=round(duration, 3),
        startup_s=round(ray_run.first_segmented - clock, 3) if ray_run.first_segmented else 0.0,
        images_per_second=round(_steady_rate(ray_run), 3),
        end_to_end_images_per_second=round((ray_run.ok + ray_run.error) / duration, 3) if todo.num_rows else 0.0,
        stats_uri=stats_uri,
        masks_uri=masks_uri,
        manifest_uri=f"{output}/{MANIFEST_FILE}",
        success_uri=f"{output}/{SUCCESS_FILE}",
        errors=ray_run.errors,
    )
    manifest = {
        **asdict(summary),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "inputs": {
            "uri": config.input,
            "prefix": listing.prefix,
            "kind": listing.kind,
            "ignored_files": listing.ignored,
        },
        "model_arch": model.arch,
        "class_names": model.class_names,
        "heads": {task: head["class_names"] for task, head in model.heads.items()},
        "masks": {task: f"{output}/{write.mask_folder(task, list(model.heads))}" for task in model.heads},
        "stats_rows": pc.count_distinct(pa.chunked_array([*previous["key"].chunks, written], type=pa.string())).as_py(),
        "config": {k: v for k, v in asdict(config).items() if k != "storage_options"},
    }
    manifest_bytes = json.dumps(manifest, indent=2, default=str).encode()
    with_retries(lambda: write_atomic(out_fs, f"{out_root}/{MANIFEST_FILE}", manifest_bytes), config.write_retries)
    with_retries(
        lambda: write_atomic(out_fs, success_path, json.dumps({"run_id": run_id}).encode()),
        config.write_retries,
    )
    logger.info(
        "run %s finished: %d ok, %d error, %d skipped; start-up %.1f s, steady state %.2f images/s, "
        "end to end %.2f images/s",
        run_id,
        summary.ok,
        summary.error,
        summary.skipped,
        summary.startup_s,
        summary.images_per_second,
        summary.end_to_end_images_per_second,
    )
    return summary


def _check_depth(config: SegmentConfig, model: ModelInfo) -> None:
    """An RGB-D or HHA model needs ``--depth``; an RGB model has no use for it."""
    reads_depth = bool(set(model.modalities) & load.DEPTH_MODALITIES)
    if reads_depth and config.depth is None:
        raise ConfigError(
            flag("depth"), f"{model.label} reads {list(model.modalities)}: give the prefix of the depth maps"
        )
    if config.depth is not None and not reads_depth:
        raise ConfigError(flag("depth"), f"{model.label} reads only RGB; drop --depth or use an RGB-D/HHA model")


def _check_writable(fs: fsspec.AbstractFileSystem, root: str, run_id: str, retries: int) -> None:
    """Write and remove a hidden probe file under the output, so that an output that cannot be written
    (permission denied, a bucket that does not exist) fails before any image is processed. Folders are
    created on local disks only: on object stores a missing bucket is an error, not created."""
    probe = f"{root}/.write-check-{run_id}"
    try:
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(root, exist_ok=True)
        with_retries(lambda: fs.pipe_file(probe, b""), retries)
        fs.rm_file(probe)
    except Exception as error:
        raise ConfigError(
            flag("output"), f"cannot write to {fs.unstrip_protocol(root)}: {type(error).__name__}: {error}"
        ) from None


def _steady_rate(run: _RayRun) -> float:
    """Images per second between the first and the last segmented batch (the images of the first
    batch are not counted: their time is start-up); 0 when too few batches were seen."""
    if run.first_segmented is None or run.last_segmented is None or run.last_segmented <= run.first_segmented:
        return 0.0
    return (run.segmented - run.first_count) / (run.last_segmented - run.first_segmented)


def plan_blocks(sources: pa.Table, *, rows: int, megabytes: float, min_blocks: int) -> list[pa.Table]:
    """Cut the listing into input blocks (one load task each) of at most ``rows`` images and
    ``megabytes`` of source bytes, and into at least ``min_blocks`` blocks when there are enough rows."""
    total = sources.num_rows
    rows = max(1, min(rows, math.ceil(total / max(min_blocks, 1))))
    limit = megabytes * 1e6
    sizes = [size or 0 for size in sources["source_size"].to_pylist()]
    blocks, start, used = [], 0, 0.0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= rows or used + size > limit):
            blocks.append(sources.slice(start, i - start))
            start, used = i, 0.0
        used += size
    if start < total:
        blocks.append(sources.slice(start, total - start))
    return blocks


def _segment_on_ray(config: SegmentConfig, todo: pa.Table, output: str, run_id: str, model: ModelInfo) -> _RayRun:
    """Stream ``todo`` through the Ray Data pipeline: ``load``, ``infer`` and ``write`` actor pools."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    gpus_possible = _autoscaler_limit("GPU")
    use_gpus = config.device == "cuda" or (config.device == "auto" and (gpus > 0 or bool(gpus_possible)))
    if use_gpus and not gpus:
        if gpus_possible == 0:
            raise ConfigError(flag("device"), "cuda requested but the Ray cluster has no GPUs, nor node types with any")
        _wait_for_gpu(config.gpu_wait_s)
        resources = ray.cluster_resources()
    fewest, most = config.actor_range() or _default_actors(use_gpus, resources, gpus_possible, config.cpus_per_actor)
    # CPU stages (actor pools: workers that stay, with their imports done once): on GPU clusters one
    # CPU per worker, scaled up to the CPUs the GPU actors leave (to any number while the GPU pool may
    # grow: new GPU nodes bring CPUs); on CPU clusters the FCN actors hold the CPUs (their torch
    # threads) and one light worker per stage and FCN actor runs beside them.
    spare_cpus = max(1, int(resources.get("CPU", 1)) - fewest)
    cpu_stage = (
        {"num_cpus": 1, "compute": actor_pool(1, spare_cpus if most == fewest else None)}
        if use_gpus
        else {"num_cpus": 0, "compute": actor_pool(fewest, most)}
    )
    schema = stats_schema(
        model.class_names, model.palette, {"uri": model.uri, "version": model.version, "arch": model.arch}, model.heads
    )
    reads_depth = bool(set(model.modalities) & load.DEPTH_MODALITIES)
    blocks = plan_blocks(
        todo, rows=config.block_rows, megabytes=config.block_megabytes, min_blocks=BLOCKS_PER_ACTOR * (most or fewest)
    )
    logger.info(
        "Ray: %s %s actor(s), batch size %d, %d input blocks, cluster %s",
        fewest if most == fewest else f"{fewest} to {most or 'any number of'}",
        "GPU" if use_gpus else "CPU",
        config.batch_size,
        len(blocks),
        resources,
    )

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # our own bar counts images, skips included
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # Ray Data warns that it is off
    # The count lives on the driver's node: a lost worker node must not take it (an actor without
    # restarts) and with it the progress bar and the run's start-up and steady-state figures.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    tally = ray.remote(Tally).options(num_cpus=0, scheduling_strategy=here).remote()
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        load.ImageLoader,
        batch_format="pyarrow",
        batch_size=None,  # a whole input block per call
        fn_constructor_kwargs={
            "storage_options": config.storage_options,
            "retries": config.read_retries,
            "max_image_pixels": config.max_image_pixels,
            "device_jpegs": use_gpus and config.gpu_decode and not reads_depth,  # depth is matched to decoded images
            "depth_prefix": config.depth,
            "camera": config.camera,
            "modalities": model.modalities,
        },
        udf_modifying_row_count=False,
        **cpu_stage,
    )
    # Ray Data's actor pools restart a dead actor and redo its batches without limit (max_restarts and
    # max_task_retries -1): a lost node and a fatal device error (the actor ends itself) are both survived.
    ds = ds.map_batches(
        infer.Segmenter,
        batch_format="pyarrow",
        batch_size=config.batch_size,
        compute=actor_pool(fewest, most),
        num_cpus=1 if use_gpus else config.cpus_per_actor,
        num_gpus=1 if use_gpus else None,
        fn_constructor_kwargs={
            "model_uri": model.uri,
            "storage_options": config.storage_options,
            "tally": tally,
            "device": "cuda" if use_gpus else "cpu",
            "precision": config.precision,
            "cpu_threads": max(1, int(config.cpus_per_actor)),
            "max_image_pixels": config.max_image_pixels,
            "keep_pixels": config.overlays,
            "exit_on_fatal_error": True,
        },
        udf_modifying_row_count=False,
    )
    ds = ds.map_batches(
        write.ResultWriter,
        batch_format="pyarrow",
        batch_size=config.rows_per_file,
        fn_constructor_kwargs={
            "output": output,
            "storage_options": config.storage_options,
            "run_id": run_id,
            "model": model,
            "schema": schema,
            "retries": config.write_retries,
        },
        udf_modifying_row_count=False,
        **cpu_stage,
    )
    run = _RayRun()
    progress = Progress(todo.num_rows, live=config.progress)
    stop = threading.Event()
    follower = threading.Thread(target=_follow_tally, args=(tally, progress, run, stop), name="progress", daemon=True)
    follower.start()
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            status = batch["status"].to_pylist()
            n_ok = status.count(STATUS_OK)
            if len(run.errors) < ERROR_SAMPLES:
                for uri, stat, reason in zip(batch["image_uri"].to_pylist(), status, batch["error"].to_pylist()):
                    if stat != STATUS_OK and len(run.errors) < ERROR_SAMPLES:
                        run.errors.append({"image_uri": uri, "error": reason})
            progress.update(n_ok, len(status) - n_ok)
    finally:
        stop.set()
        follower.join()
        ray.kill(tally)
    progress.close()
    run.ok, run.error = progress.ok, progress.error
    return run


def actor_pool(fewest: int, most: int | None) -> Any:
    """Ray Data's pool of ``fewest`` actors, or of ``fewest`` to ``most`` (None: no limit) that grows while
    work queues; each pending actor is a resource demand that Ray's autoscaler meets by adding nodes."""
    import ray.data

    if most == fewest:
        return ray.data.ActorPoolStrategy(size=fewest)
    return ray.data.ActorPoolStrategy(min_size=fewest, max_size=most)


def _default_actors(
    use_gpus: bool, resources: dict[str, float], gpus_possible: int | None, cpus_per_actor: float
) -> tuple[int, int | None]:
    """The default pool: on GPUs from the GPUs present to the most the autoscaler's node types hold
    (None: no limit); on CPUs one per ``cpus_per_actor`` CPUs."""
    if not use_gpus:
        fixed = max(1, int(resources.get("CPU", 1) // cpus_per_actor))
        return fixed, fixed
    present = max(1, int(resources.get("GPU", 0)))
    if gpus_possible is None:
        return present, present
    return present, None if gpus_possible >= sys.maxsize else max(present, gpus_possible)


def _autoscaler_limit(resource: str) -> int | None:
    """The most of ``resource`` the cluster's autoscaler can provide (its node types' maximum counts; sys.maxsize
    without a limit), or None when the cluster reports no autoscaler configuration."""
    try:
        from ray._private.state import state  # what Ray Train and Ray Data read for the same purpose

        limits = state.get_max_resources_from_cluster_config()
    except Exception:
        return None
    return None if limits is None else int(limits.get(resource, 0))


def _wait_for_gpu(timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for a GPU in the cluster: a pending one-GPU task is a resource demand
    that Ray's autoscaler meets by adding a GPU node. ConfigError naming --device if none comes."""
    import ray

    logger.info("no GPU in the Ray cluster yet: waiting up to %g s (%s) for one to join", timeout_s, flag("gpu_wait_s"))
    probe = ray.remote(_on_a_gpu).options(num_gpus=1, num_cpus=0).remote()
    ready, _ = ray.wait([probe], timeout=timeout_s)
    if not ready:
        ray.cancel(probe)
        raise ConfigError(
            flag("device"),
            f"no GPU joined the Ray cluster within {timeout_s:g} s ({flag('gpu_wait_s')}): give the cluster GPU nodes "
            "(or an autoscaler with GPU node types), wait longer, or use --device cpu",
        )


def _on_a_gpu() -> None:
    """The task ``_wait_for_gpu`` waits for."""


def _follow_tally(tally: Any, progress: Progress, run: _RayRun, stop: threading.Event) -> None:
    """Until ``stop`` is set (and once more then), copy the FCN actors' count of segmented images into
    ``progress`` and note when it first and last grew (the steady-state window)."""
    import ray

    while True:
        stopping = stop.wait(LIVE_REFRESH_S)
        try:
            count = ray.get(tally.get.remote(), timeout=10)
        except ray.exceptions.RayError:  # progress is informational: the next poll tries again
            count = run.segmented
        if count > run.segmented:
            now = time.monotonic()
            if run.first_segmented is None:
                run.first_segmented, run.first_count = now, count
            run.last_segmented, run.segmented = now, count
            progress.set_segmented(count)
        if stopping:
            return
