"""Segment every image under a URI with an FCN on Ray: masks, Parquet statistics, manifest, _SUCCESS.

- ``config``: ``SegmentConfig``, the single source of the job's defaults, validation, CLI flags and
  the ``segment-bucket`` flow's parameters;
- ``stages``: what runs on Ray workers (``load_images`` tasks, ``Segmenter`` actors, ``store_results`` tasks);
- ``driver``: ``run_segmentation``, which lists, resumes, runs the Ray Data pipeline and finishes the output;
- ``cli``: ``python -m pipelines.segment`` / ``fcn-segment``.
"""

from pipelines.segment.cli import main
from pipelines.segment.config import DEVICES, PRECISIONS, ConfigError, SegmentConfig
from pipelines.segment.driver import SegmentSummary, run_segmentation

__all__ = [
    "DEVICES", "PRECISIONS", "ConfigError", "SegmentConfig", "SegmentSummary", "main", "run_segmentation",
]
