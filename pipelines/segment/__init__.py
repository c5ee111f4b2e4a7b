"""Segment every image under a URI with an FCN on Ray: masks, Parquet statistics, manifest, _SUCCESS.

- ``config``: ``SegmentConfig``, the single source of the job's defaults, validation, CLI flags and
  the ``segment-bucket`` flow's parameters;
- ``schema``: every column (of the Parquet statistics and between stages), declared once;
- the stages, each an actor pool on Ray workers: ``load`` (``ImageLoader``, on CPUs: fetch and decode),
  ``infer`` (``Segmenter``, on GPUs or CPUs: the network), ``write`` (``ResultWriter``, on CPUs: masks and
  one Parquet part per batch);
- ``resume``: what earlier runs already did, what is left, and compaction of the statistics;
- ``driver``: ``run_segmentation``, which lists, resumes, runs the Ray Data pipeline and finishes the output;
- ``cli``: ``python -m pipelines.segment`` / ``fcn-segment``.

The names below are imported on first use, so that the stage modules (and ``config``, ``model``)
import without the driver and what it may import (Ray).
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES = {
    "main": "pipelines.segment.cli",
    **dict.fromkeys(["DEVICES", "PRECISIONS", "ConfigError", "SegmentConfig"], "pipelines.segment.config"),
    **dict.fromkeys(["SegmentSummary", "run_segmentation"], "pipelines.segment.driver"),
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_SOURCES[name]), name)
