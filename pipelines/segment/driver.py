"""The segmentation job's driver: list, decide what is done, stream the rest through Ray Data, compact
the statistics, then write ``manifest.json`` and, last, ``_SUCCESS`` (each whole: ``fcn.registry.write_atomic``).
The images a run was asked to do (``LISTING_COLUMNS``) are written to ``listing.parquet``, for checks
that compare the statistics with the inputs without listing them again.

A rerun into the same output skips images whose newest row is ``ok`` for the same source and model.
Every listed image ends with exactly one stats row.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from fcn.registry import write_atomic
from pipelines.common.ray_utils import connect
from pipelines.common.storage import with_retries
from pipelines.segment import load, resume, write
from pipelines.segment.assemble import assemble
from pipelines.segment.config import ConfigError, SegmentConfig, flag
from pipelines.segment.listing import InputError, list_images
from pipelines.segment.model import ModelInfo, checkpoint_exists, describe_model
from pipelines.segment.pipeline import RayRun, segment_on_ray
from pipelines.segment.tiles import plan_tiles

logger = logging.getLogger("pipelines.segment")

MANIFEST_FILE = "manifest.json"
SUCCESS_FILE = "_SUCCESS"
LISTING_FILE = "listing.parquet"
LISTING_COLUMNS = ["key", "image_uri", "source_size"]


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
    listing_uri: str  # the ``listed`` images (``LISTING_COLUMNS``), one row each
    errors: list[dict[str, str]] = field(default_factory=list)  # the first few {image_uri, error}

    def outcome(self) -> str:
        """The run's counts and rates in a line, as the job and the ``segment-bucket`` flow log them."""
        return (
            f"{self.ok} ok, {self.error} error, {self.skipped} skipped; start-up {self.startup_s:.1f} s, "
            f"steady state {self.images_per_second:.2f} images/s, "
            f"end to end {self.end_to_end_images_per_second:.2f} images/s"
        )


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
        whether the last run finished (so its rows are compacted: one per key); writes ``LISTING_FILE``
        (on a thread, while Ray starts)."""
        import ray.data  # noqa: F401 - a second of imports, also done while Ray starts

        model = describe_model(config.model, so)  # imports torch: seconds
        _check_depth(config, model)
        finished = out_fs.exists(success_path)
        if finished:
            out_fs.rm_file(success_path)  # a stale marker must not vouch for this run's partial output
        state = resume.read_state(stats_uri, so)
        listing_bytes = write.parquet_bytes(listing.images.select(LISTING_COLUMNS))
        write.retried(
            lambda: write_atomic(out_fs, f"{out_root}/{LISTING_FILE}", listing_bytes),
            config.write_retries,
            f"listing: writing {output}/{LISTING_FILE}",
        )
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
    work, tiled = plan_tiles(todo, config, output, model)  # big tiled TIFFs: a row per window still to do
    ray_run = segment_on_ray(config, work, output, run_id, model) if work.num_rows else RayRun()
    assembled = assemble(
        tiled,
        ray_run,
        output=output,
        storage_options=so,
        run_id=run_id,
        model=model,
        retries=config.write_retries,
        overlays=config.overlays,
    )

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
        listing_uri=f"{output}/{LISTING_FILE}",
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
        "heads": {head: description["class_names"] for head, description in model.heads.items()},
        "masks": {head: f"{output}/{write.mask_folder(head, model.heads)}" for head in model.heads},
        "tiled_images": [asdict(image) for image in assembled],
        "stats_rows": pc.count_distinct(pa.chunked_array([*previous["key"].chunks, written], type=pa.string())).as_py(),
        "config": {k: v for k, v in asdict(config).items() if k != "storage_options"},
    }
    manifest_bytes = json.dumps(manifest, indent=2, default=str).encode()
    with_retries(lambda: write_atomic(out_fs, f"{out_root}/{MANIFEST_FILE}", manifest_bytes), config.write_retries)
    with_retries(
        lambda: write_atomic(out_fs, success_path, json.dumps({"run_id": run_id}).encode()),
        config.write_retries,
    )
    logger.info("run %s finished: %s", run_id, summary.outcome())
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


def _steady_rate(run: RayRun) -> float:
    """Images per second between the first and the last segmented batch (the images of the first
    batch are not counted: their time is start-up); 0 when too few batches were seen."""
    if run.first_segmented is None or run.last_segmented is None or run.last_segmented <= run.first_segmented:
        return 0.0
    return (run.segmented - run.first_count) / (run.last_segmented - run.first_segmented)
