"""Prefect flow ``segment-bucket``: segment every image under a URI with an FCN on Ray.

Tasks: list the inputs, run the Ray segmentation job (``pipelines.segment.run_segmentation`` in the
flow's process, connected to the Ray cluster at ``ray_address`` / ``RAY_ADDRESS``, else a local one),
verify the outputs (``_SUCCESS`` present, exactly one Parquet row per input) and publish a markdown
artifact plus ``<output>/report.html``. I/O tasks retry on transient errors.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import failure_artifact, io_task, is_transient
from flows.params import SegmentBucketParams, takes
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
from pipelines.segment import SegmentSummary, run_segmentation
from pipelines.segment.listing import list_images

REPORT_FILE = "report.html"
ARTIFACT_KEY = "segment-bucket"


class OutputCheckError(RuntimeError):
    """The segmentation outputs are incomplete or inconsistent with the inputs."""


@io_task("list-inputs")
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


@io_task("verify-outputs")
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


@io_task("publish")
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


@flow(name="segment-bucket")
@takes(SegmentBucketParams)
def segment_bucket(**parameters: Any) -> dict[str, Any]:
    """Segment every image under ``input`` with ``model`` (checkpoint or registry: its champion);
    masks, Parquet statistics, manifest.json, _SUCCESS and report.html land under ``output``."""
    try:
        params = SegmentBucketParams(**parameters)
        params.segment_config().validate()
        inputs = list_inputs(params)
        summary = segment(params)
        stats = verify_outputs(summary, inputs, params.fs_options)
        report_uri = publish(params, summary, stats)
    except Exception as error:
        failure_artifact(ARTIFACT_KEY, parameters, error)
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
