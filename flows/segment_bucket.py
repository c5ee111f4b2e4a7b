"""Prefect flow ``segment-bucket``: segment every image under a URI with an FCN on Ray.

Tasks: run the Ray segmentation job (``pipelines.segment.run_segmentation`` in the flow's process,
connected to the Ray cluster at ``ray_address`` / ``RAY_ADDRESS``, else a local one; it lists the inputs
and writes that listing to ``<output>/listing.parquet``), verify the outputs (``_SUCCESS`` present,
exactly one Parquet row per listed image) and publish a markdown artifact plus ``<output>/report.html``.
I/O tasks retry on transient errors. The flow holds no per-image Python objects: verification and the
report are Arrow aggregates over the Parquet files plus a small sample, and task results stay small.
"""

from __future__ import annotations

from typing import Any

import fsspec
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import failure_artifact, io_task, is_transient
from flows.digest import StatsDigest, digest_stats, memory_returned_promptly, stats_dataset
from flows.gallery import gallery
from flows.keys import KeyCount, OutputCounts
from flows.params import SegmentBucketParams, takes
from flows.report import RunReport, html_report, markdown_summary, write_text
from pipelines.segment import SegmentSummary, run_segmentation

REPORT_FILE = "report.html"
ARTIFACT_KEY = "segment-bucket"


class OutputCheckError(RuntimeError):
    """The segmentation outputs are incomplete or inconsistent with the inputs."""


@task(name="segment", retries=1, retry_condition_fn=is_transient, cache_policy=NO_CACHE)
def segment(params: SegmentBucketParams) -> SegmentSummary:
    """Run the Ray segmentation job; a retry resumes (images already done are skipped)."""
    summary = run_segmentation(params.segment_config())
    get_run_logger().info("segmented: %s", summary.outcome())
    return summary


def check_outputs(
    summary: SegmentSummary, storage_options: dict[str, Any], gallery_size: int = 0
) -> tuple[OutputCounts, StatsDigest]:
    """Read the run's statistics once: their keys counted against the job's listing (``KeyCount``) and
    the report's digest (``digest_stats``, a sample of ``gallery_size`` rows). OutputCheckError unless
    ``_SUCCESS`` exists and the statistics have exactly one row per listed image (``summary.listed``)."""
    fs, success = fsspec.core.url_to_fs(summary.success_uri, **storage_options)
    fs.invalidate_cache()
    if not fs.isfile(success):
        raise OutputCheckError(f"{summary.success_uri} is missing: the run did not finish")
    fs, listing_path = fsspec.core.url_to_fs(summary.listing_uri, **storage_options)
    with memory_returned_promptly():
        key_count = KeyCount(pq.ParquetFile(listing_path, filesystem=fs).read(columns=["key"])["key"])
        stats = stats_dataset(summary.stats_uri, storage_options)
        digest = digest_stats(stats, sample_size=gallery_size, on_keys=key_count.add)
        counts = key_count.counts()
        del key_count
    if not counts.one_row_per_input or counts.listed != summary.listed:
        raise OutputCheckError(
            f"{summary.stats_uri} has {counts.rows} rows ({counts.keys} distinct keys) for {summary.listed} "
            f"listed images ({counts.listed} in {summary.listing_uri}): {counts.missing} missing (e.g. "
            f"{counts.missing_sample}), {counts.duplicated} duplicated, {counts.unlisted} not listed"
        )
    return counts, digest


@io_task("verify-outputs")
def verify_outputs(summary: SegmentSummary, storage_options: dict[str, Any], gallery_size: int) -> StatsDigest:
    """``check_outputs``, logged; returns the report's digest (aggregates and a sample of rows)."""
    counts, digest = check_outputs(summary, storage_options, gallery_size)
    get_run_logger().info("verified _SUCCESS and %d rows, one per input, in %s", counts.rows, summary.stats_uri)
    return digest


def write_report(
    summary: SegmentSummary, digest: StatsDigest, title: str, report_uri: str, storage_options: dict[str, Any]
) -> RunReport:
    """Build the run's report from the summary and the statistics' digest, write it as HTML (with the
    gallery of the digest's sample) to ``report_uri`` and return it."""
    (primary, (distribution, palette)), *further = digest.heads.items()
    report = RunReport(
        title=title,
        model=summary.model,
        ok=summary.ok,
        error=summary.error,
        skipped=summary.skipped,
        images_per_second=summary.images_per_second,
        startup_s=summary.startup_s,
        distribution=distribution,
        palette=palette,
        further_heads=dict(further),
        links={
            "masks": summary.masks_uri,
            "statistics (Parquet)": summary.stats_uri,
            "manifest": summary.manifest_uri,
            "HTML report": report_uri,
        },
        errors=digest.errors,
    )
    items = gallery(digest.sample, distribution.class_names, palette, storage_options)
    write_text(report_uri, html_report(report, items), storage_options)
    return report


@io_task("publish")
def publish(params: SegmentBucketParams, summary: SegmentSummary, digest: StatsDigest) -> str:
    """Write ``<output>/report.html`` and create the run's markdown and link artifacts; return the report URI."""
    report_uri = f"{params.output.rstrip('/')}/{REPORT_FILE}"
    report = write_report(summary, digest, f"segment-bucket: {params.input}", report_uri, params.fs_options)
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
        summary = segment(params)
        digest = verify_outputs(summary, params.fs_options, params.gallery_size)
        report_uri = publish(params, summary, digest)
    except Exception as error:
        failure_artifact(ARTIFACT_KEY, parameters, error)
        raise
    return {
        "run_id": summary.run_id,
        "ok": summary.ok,
        "error": summary.error,
        "skipped": summary.skipped,
        "listed": summary.listed,
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
