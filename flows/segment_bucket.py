"""Prefect flow ``segment-bucket``: segment every image under a URI with an FCN on Ray.

Tasks: list the inputs, run the Ray segmentation job (``pipelines.segment.run_segmentation`` in the
flow's process, connected to the Ray cluster at ``ray_address`` / ``RAY_ADDRESS``, else a local one),
verify the outputs (``_SUCCESS`` present, exactly one Parquet row per input) and publish a markdown
artifact plus ``<output>/report.html``. I/O tasks retry on transient errors.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from flows.report import (
    ClassDistribution,
    RunReport,
    error_rows,
    html_report,
    markdown_summary,
    sample_gallery,
    schema_heads,
    write_text,
)
from pipelines.listing import list_images
from pipelines.segment import DEVICES, PRECISIONS, SegmentConfig, SegmentSummary, run_segmentation
from pipelines.storage import PERMANENT_IO_ERRORS

# The job's parameters: defaults and descriptions come from SegmentConfig, the single source of both.
DEFAULT = SegmentConfig.default
Uri = Annotated[str, Field(min_length=1, description="fsspec URI or local path")]
Device = Annotated[Literal[DEVICES], Field(description=SegmentConfig.metadata("device")["help"])]
Precision = Annotated[Literal[PRECISIONS], Field(description=SegmentConfig.metadata("precision")["help"])]
Actors = Annotated[
    Annotated[int, Field(ge=1)] | Annotated[str, Field(pattern=r"^\s*\d+\s*(-\s*\d+\s*)?$")] | None,
    Field(description=SegmentConfig.metadata("actors")["help"]),
]
BatchSize = Annotated[int, Field(ge=1, description=SegmentConfig.metadata("batch_size")["help"])]
Overlays = Annotated[bool, Field(description=SegmentConfig.metadata("overlays")["help"])]
Depth = Annotated[str | None, Field(description=SegmentConfig.metadata("depth")["help"])]
CameraIntrinsics = Annotated[str, Field(description=SegmentConfig.metadata("camera")["help"])]
GallerySize = Annotated[int, Field(ge=0, le=200, description="image/mask overlays in report.html")]
StorageOptions = Annotated[
    dict[str, Any] | None,
    Field(
        description="fsspec options for input, output and model, e.g. {'endpoint_url': ...}; "
        "keep credentials in the environment, not in parameters"
    ),
]

REPORT_FILE = "report.html"
ARTIFACT_KEY = "segment-bucket"
TRANSIENT_RETRIES = 3
RETRY_DELAYS = [2, 10, 30]


class SegmentBucketParams(BaseModel):
    """The validated parameters of ``segment-bucket`` (defaults live in the flow's signature)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Uri
    output: Uri
    model: Uri
    ray_address: str | None
    actors: Actors
    device: Device
    precision: Precision
    batch_size: BatchSize
    overlays: Overlays
    depth: Depth
    camera: CameraIntrinsics
    gallery_size: GallerySize
    storage_options: StorageOptions

    @property
    def fs_options(self) -> dict[str, Any]:
        """``storage_options`` as fsspec takes them (``{}`` when unset)."""
        return dict(self.storage_options or {})

    def segment_config(self) -> SegmentConfig:
        """The segmentation job's configuration; ``validate()`` names a bad value."""
        return SegmentConfig(
            input=self.input,
            output=self.output,
            model=self.model,
            ray_address=self.ray_address,
            actors=self.actors,
            device=self.device,
            precision=self.precision,
            batch_size=self.batch_size,
            overlays=self.overlays,
            depth=self.depth,
            camera=self.camera,
            storage_options=self.fs_options,
        )


class OutputCheckError(RuntimeError):
    """The segmentation outputs are incomplete or inconsistent with the inputs."""


def is_transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: I/O and network errors, but not missing files or permissions."""
    try:
        state.result()
    except PERMANENT_IO_ERRORS:
        return False
    except OSError:  # includes ConnectionError and TimeoutError
        return True
    except Exception:
        return False
    return False


def _io_task(name: str):
    return task(
        name=name,
        retries=TRANSIENT_RETRIES,
        retry_delay_seconds=RETRY_DELAYS,
        retry_condition_fn=is_transient,
        cache_policy=NO_CACHE,
    )


@_io_task("list-inputs")
def list_inputs(params: SegmentBucketParams) -> list[str]:
    """The image URIs the segmentation job will read (prefix, glob or manifest)."""
    listing = list_images(params.input, params.fs_options, exclude=params.output)
    get_run_logger().info("%d images under %s (%s)", listing.images.num_rows, params.input, listing.kind)
    return listing.images["image_uri"].to_pylist()


@task(name="segment", retries=1, retry_condition_fn=is_transient, cache_policy=NO_CACHE)
def segment(params: SegmentBucketParams) -> SegmentSummary:
    """Run the Ray segmentation job; a retry resumes (images already done are skipped)."""
    summary = run_segmentation(params.segment_config())
    get_run_logger().info(
        "segmented: %d ok, %d error, %d skipped; start-up %.1f s, steady state %.2f images/s, end to end %.2f images/s",
        summary.ok,
        summary.error,
        summary.skipped,
        summary.startup_s,
        summary.images_per_second,
        summary.end_to_end_images_per_second,
    )
    return summary


@_io_task("verify-outputs")
def verify_outputs(summary: SegmentSummary, inputs: list[str], storage_options: dict[str, Any]) -> pa.Table:
    """Check that ``_SUCCESS`` exists and the Parquet statistics have exactly one row per input;
    return the statistics."""
    fs, success = fsspec.core.url_to_fs(summary.success_uri, **storage_options)
    fs.invalidate_cache()
    if not fs.isfile(success):
        raise OutputCheckError(f"{summary.success_uri} is missing: the run did not finish")
    fs, stats_path = fsspec.core.url_to_fs(summary.stats_uri, **storage_options)
    stats = pq.read_table(stats_path, filesystem=fs)
    rows = stats["image_uri"].to_pylist()
    duplicated = sorted({uri for uri, n in Counter(rows).items() if n > 1})
    missing = sorted(set(inputs) - set(rows))
    if duplicated or missing or len(rows) != len(inputs):
        raise OutputCheckError(
            f"{summary.stats_uri} has {len(rows)} rows for {len(inputs)} inputs "
            f"(missing: {missing[:5]}, duplicated: {duplicated[:5]})"
        )
    get_run_logger().info("verified _SUCCESS and %d rows, one per input, in %s", len(rows), summary.stats_uri)
    return stats


@_io_task("publish")
def publish(params: SegmentBucketParams, summary: SegmentSummary, stats: pa.Table) -> str:
    """Write ``<output>/report.html`` and create the run's markdown and link artifacts; return the report URI."""
    heads = schema_heads(stats.schema)
    (class_names, palette), *_ = heads.values()
    report_uri = f"{params.output.rstrip('/')}/{REPORT_FILE}"
    report = RunReport(
        title=f"segment-bucket: {params.input}",
        model=summary.model,
        ok=summary.ok,
        error=summary.error,
        skipped=summary.skipped,
        images_per_second=summary.images_per_second,
        startup_s=summary.startup_s,
        distribution=ClassDistribution.from_stats(stats, class_names),
        palette=palette,
        further_heads={
            head: (ClassDistribution.from_stats(stats, names, head=head), head_palette)
            for head, (names, head_palette) in list(heads.items())[1:]
        },
        links={
            "masks": summary.masks_uri,
            "statistics (Parquet)": summary.stats_uri,
            "manifest": summary.manifest_uri,
            "HTML report": report_uri,
        },
        errors=error_rows(stats),
    )
    gallery = sample_gallery(stats, class_names, palette, params.gallery_size, params.fs_options)
    write_text(report_uri, html_report(report, gallery), params.fs_options)
    create_markdown_artifact(markdown_summary(report), key=ARTIFACT_KEY, description=report.title)
    create_link_artifact(report_uri, link_text="HTML report", key=f"{ARTIFACT_KEY}-report")
    get_run_logger().info("report: %s", report_uri)
    return report_uri


def shown_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as artifacts show them: storage options by their names only, since their values may
    hold credentials."""
    return {k: sorted(v) if k == "storage_options" and isinstance(v, dict) else v for k, v in params.items()}


def failure_artifact(flow_name: str, params: dict[str, Any], error: BaseException) -> None:
    """Record a failed run as a markdown artifact, so every run leaves one."""
    rows = "".join(f"| {k} | `{v}` |\n" for k, v in shown_parameters(params).items())
    create_markdown_artifact(
        f"# {flow_name}: failed\n\n**Error:** {type(error).__name__}: {error}\n\n"
        f"| parameter | value |\n|---|---|\n{rows}",
        key=flow_name,
        description=f"{flow_name} failed",
    )


@flow(name="segment-bucket")
def segment_bucket(
    input: Uri,
    output: Uri,
    model: Uri,
    ray_address: str | None = DEFAULT("ray_address"),
    actors: Actors = DEFAULT("actors"),
    device: Device = DEFAULT("device"),
    precision: Precision = DEFAULT("precision"),
    batch_size: BatchSize = DEFAULT("batch_size"),
    overlays: Overlays = DEFAULT("overlays"),
    depth: Depth = DEFAULT("depth"),
    camera: CameraIntrinsics = DEFAULT("camera"),
    gallery_size: GallerySize = 12,
    storage_options: StorageOptions = None,
) -> dict[str, Any]:
    """Segment every image under ``input`` with ``model`` (checkpoint or registry: its champion);
    masks, Parquet statistics, manifest.json, _SUCCESS and report.html land under ``output``."""
    arguments = dict(locals())
    try:
        params = SegmentBucketParams(**arguments)
        params.segment_config().validate()
        inputs = list_inputs(params)
        summary = segment(params)
        stats = verify_outputs(summary, inputs, params.fs_options)
        report_uri = publish(params, summary, stats)
    except Exception as error:
        failure_artifact(ARTIFACT_KEY, arguments, error)
        raise
    return {
        "run_id": summary.run_id,
        "ok": summary.ok,
        "error": summary.error,
        "skipped": summary.skipped,
        "images_per_second": summary.images_per_second,
        "startup_s": summary.startup_s,
        "end_to_end_images_per_second": summary.end_to_end_images_per_second,
        "model": summary.model,
        "output": params.output,
        "masks": summary.masks_uri,
        "stats": summary.stats_uri,
        "manifest": summary.manifest_uri,
        "report": report_uri,
    }
