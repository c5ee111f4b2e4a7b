"""The segmentation job's Ray Data pipeline: the listing cut into input blocks, then three actor pools,
``ImageLoader`` on CPUs (``pipelines.segment.load``), ``Segmenter`` on GPUs or CPUs
(``pipelines.segment.infer``) and ``ResultWriter`` on CPUs (``pipelines.segment.write``), sized from the
cluster and its autoscaler (``pipelines.segment.actors``), with the progress the FCN actors report.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.segment import infer, load, write
from pipelines.segment.actors import (
    ALLOCATOR_ENV,
    actor_pool,
    autoscaler_limit,
    default_actors,
    light_workers,
    pools_fit,
    wait_for_gpu,
)
from pipelines.segment.config import ConfigError, SegmentConfig, flag
from pipelines.segment.model import ModelInfo
from pipelines.segment.progress import LIVE_REFRESH_S, Progress, Tally
from pipelines.segment.schema import STATUS_OK, stats_schema
from pipelines.segment.tiles import STATUS_TILE, rows_per_call, window_rows

logger = logging.getLogger("pipelines.segment")

ERROR_SAMPLES = 20  # {image_uri, error} pairs kept for the summary
BLOCKS_PER_ACTOR = 4  # at least this many input blocks per FCN actor (while blocks hold >= batch_size rows)
READ_AHEAD_WINDOWS = 8
"""Windows of tiled images per FCN actor that Ray's object store may hold (``limit_read_ahead``): by default Ray Data
lets a run fill half the object store, which the loaders did with windows read far ahead of the FCN actors. Ray Data
reserves each stage a share of this budget: at 4 per actor the FCN actors' share held one call's 2 windows, and one
actor idled while the other ran (a 1 GP run); at 8 the windows read but not yet taken stay at 2 per actor."""
ACTOR_START_TIMEOUT_S = 600
"""In a run with tiled images, the longest wait for the first actors of each pool to start (``start_actors_first``)."""


@dataclass
class RayRun:
    """What the Ray part of a run reports back to ``run_segmentation``."""

    ok: int = 0
    error: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    first_segmented: float | None = None  # time.monotonic() of the first and last segmented batch
    last_segmented: float | None = None
    first_count: int = 0  # images in the first segmented batch(es) seen
    segmented: int = 0
    segmented_windows: int = 0  # windows of tiled images segmented

    def add_image(self, image_uri: str, error: str | None) -> None:
        """Count an image finished after the pipeline (a tiled image, assembled from its tiles)."""
        self.ok += error is None
        self.error += error is not None
        if error is not None and len(self.errors) < ERROR_SAMPLES:
            self.errors.append({"image_uri": image_uri, "error": error})


def plan_blocks(sources: pa.Table, *, rows: int, megabytes: float, min_blocks: int) -> list[pa.Table]:
    """Cut the listing into input blocks (one ``ImageLoader`` call each) of at most ``rows`` images and
    ``megabytes`` of source bytes, and into at least ``min_blocks`` blocks when there are enough rows; each window
    of a tiled image is a block of its own, for the windows of one image to reach several FCN actors."""
    total = sources.num_rows
    windows = window_rows(sources)
    rows = max(1, min(rows, math.ceil((total - sum(windows)) / max(min_blocks, 1))))
    limit = megabytes * 1e6
    sizes = [size or 0 for size in sources["source_size"].to_pylist()]
    blocks, start, used = [], 0, 0.0
    for i, size in enumerate(sizes):
        if i > start and (windows[i] or windows[i - 1] or i - start >= rows or used + size > limit):
            blocks.append(sources.slice(start, i - start))
            start, used = i, 0.0
        used += size
    if start < total:
        blocks.append(sources.slice(start, total - start))
    return blocks


def limit_read_ahead(ds: Any, actors: int, tile_size: int) -> Any:
    """``ds`` with Ray Data's object-store budget (its backpressure) set to ``READ_AHEAD_WINDOWS`` RGB windows of
    ``tile_size`` per FCN actor, for this dataset only (its own context: a copy made by ``from_blocks``). Whole images
    in the same run then load one block at a time per stage."""
    limits = ds.context.execution_options.resource_limits
    budget = READ_AHEAD_WINDOWS * actors * tile_size**2 * 3
    ds.context.execution_options.resource_limits = limits.copy(object_store_memory=budget)
    return ds


def start_actors_first(ds: Any, fit: bool) -> Any:
    """``ds`` whose actor pools start their first actors (the FCN actors: checkpoint loaded) before any block flows,
    for up to ``ACTOR_START_TIMEOUT_S``, when they ``fit`` the cluster (``actors.pools_fit``). Otherwise the first
    FCN actor up takes the first windows, as many calls as Ray Data queues on an actor, and an image of a few windows
    uses one actor."""
    if fit:  # a pool larger than the cluster starts with the actors that fit, the others wait for nodes
        ds.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    return ds


def segment_on_ray(config: SegmentConfig, todo: pa.Table, output: str, run_id: str, model: ModelInfo) -> RayRun:
    """Stream ``todo`` through the Ray Data pipeline: ``load``, ``infer`` and ``write`` actor pools."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    gpus_possible = autoscaler_limit("GPU")
    use_gpus = config.device == "cuda" or (config.device == "auto" and (gpus > 0 or bool(gpus_possible)))
    if use_gpus and not gpus:
        if gpus_possible == 0:
            raise ConfigError(flag("device"), "cuda requested but the Ray cluster has no GPUs, nor node types with any")
        wait_for_gpu(config.gpu_wait_s)
        resources = ray.cluster_resources()
    fewest, most = config.actor_range() or default_actors(use_gpus, resources, gpus_possible, config.cpus_per_actor)
    # CPU stages (actor pools: workers that stay, with their imports done once): on GPU clusters one
    # CPU per worker, scaled up to the CPUs the GPU actors leave (to any number while the GPU pool may
    # grow: new GPU nodes bring CPUs); on CPU clusters the FCN actors hold the CPUs (their torch
    # threads) and light workers holding none run beside them (``actors.light_workers``).
    spare_cpus = max(1, int(resources.get("CPU", 1)) - fewest)
    cpu_stage = {
        "runtime_env": {"env_vars": ALLOCATOR_ENV},
        **(
            {"num_cpus": 1, "compute": actor_pool(1, spare_cpus if most == fewest else None)}
            if use_gpus  # on CPUs ``most`` is a number: default_actors' fixed pool or --actors MIN-MAX
            else {"num_cpus": 0, "compute": actor_pool(light_workers(fewest), light_workers(most))}
        ),
    }
    schema = stats_schema(
        model.class_names, model.palette, {"uri": model.uri, "version": model.version, "arch": model.arch}, model.heads
    )
    reads_depth = bool(set(model.modalities) & load.DEPTH_MODALITIES)
    blocks = plan_blocks(
        todo, rows=config.block_rows, megabytes=config.block_megabytes, min_blocks=BLOCKS_PER_ACTOR * (most or fewest)
    )
    windows = sum(window_rows(todo))
    call_rows = rows_per_call(todo, config.batch_size, fewest)
    logger.info(
        "Ray: %s %s actor(s), batch size %d, %d input blocks, cluster %s",
        fewest if most == fewest else f"{fewest} to {most or 'any number of'}",
        "GPU" if use_gpus else "CPU",
        call_rows,
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
    # from_blocks takes each block's metadata from the block here; from_arrow runs a remote task per block at once,
    # and the driver stayed 53 KB larger per block (one per window: 0.1 GB at 4 GP); from_blocks 9 KB
    ds = ray.data.from_blocks(blocks)
    ds = ds.map_batches(
        load.ImageLoader,
        batch_format="pyarrow",
        batch_size=None,  # a whole input block per call
        fn_constructor_kwargs={
            "tally": tally,
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
    # max_task_retries -1): a lost node and a fatal device error (the actor ends itself) are both survived;
    # a row that ends the process each time becomes an error row (crashes.isolate_crashes, with the tally)
    ds = ds.map_batches(
        infer.Segmenter,
        batch_format="pyarrow",
        batch_size=call_rows,  # windows are megapixels each: a few per call bound the actors' memory
        compute=actor_pool(fewest, most),
        num_cpus=1 if use_gpus else config.cpus_per_actor,
        num_gpus=1 if use_gpus else None,
        runtime_env={"env_vars": ALLOCATOR_ENV},
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
        # a window's labels are megabytes: the writer takes them as the FCN actors give them, not rows_per_file
        batch_size=call_rows if windows else config.rows_per_file,
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
    if windows:
        ds = limit_read_ahead(ds, most or fewest, config.tile_size)
        ds = start_actors_first(ds, pools_fit(use_gpus, fewest, config.cpus_per_actor, resources))
    run = RayRun()
    # the rows of tiled images come after the pipeline (assemble.assemble): their windows are counted instead
    progress = Progress(todo.num_rows - windows, windows=windows, live=config.progress)
    stop = threading.Event()
    follower = threading.Thread(target=_follow_tally, args=(tally, progress, run, stop), name="progress", daemon=True)
    follower.start()
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            tile_rows = pc.equal(batch["status"], STATUS_TILE)
            windows_written = pc.sum(tile_rows).as_py() or 0
            batch = batch.filter(pc.invert(tile_rows))
            status = batch["status"].to_pylist()
            n_ok = status.count(STATUS_OK)
            if len(run.errors) < ERROR_SAMPLES:
                for uri, stat, reason in zip(batch["image_uri"].to_pylist(), status, batch["error"].to_pylist()):
                    if stat != STATUS_OK and len(run.errors) < ERROR_SAMPLES:
                        run.errors.append({"image_uri": uri, "error": reason})
            progress.update(n_ok, len(status) - n_ok, windows=windows_written)
    finally:
        stop.set()
        follower.join()
        ray.kill(tally)
    progress.close()
    run.ok, run.error = progress.ok, progress.error
    return run


def _follow_tally(tally: Any, progress: Progress, run: RayRun, stop: threading.Event) -> None:
    """Until ``stop`` is set (and once more then), copy the FCN actors' counts of segmented images and windows into
    ``progress``; note when they first grew (start-up) and when the images' count last grew (the steady state)."""
    import ray

    while True:
        stopping = stop.wait(LIVE_REFRESH_S)
        try:
            images, windows = ray.get(tally.get.remote(), timeout=10)
        except ray.exceptions.RayError:  # progress is informational: the next poll tries again
            images, windows = run.segmented, run.segmented_windows
        if images > run.segmented or windows > run.segmented_windows:
            now = time.monotonic()
            if run.first_segmented is None:
                run.first_segmented, run.first_count = now, images
            if images > run.segmented:
                run.last_segmented, run.segmented = now, images
            run.segmented_windows = windows
            progress.set_segmented(images, windows)
        if stopping:
            return
