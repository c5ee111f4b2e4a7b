"""``python -m pipelines.segment`` / ``fcn-segment``: the flags are ``SegmentConfig``'s fields."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict

from pipelines.common.options import ConfigError, add_arguments
from pipelines.common.ray_utils import LOG_FORMAT, exit_interrupted
from pipelines.segment.config import SegmentConfig
from pipelines.segment.driver import run_segmentation


def build_parser() -> argparse.ArgumentParser:
    """One flag per ``SegmentConfig`` field, with its default, type, choices and help."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.segment",
        description="Segment every image under a URI with an FCN on Ray; write indexed-PNG masks, "
        "Parquet statistics (one row per image), manifest.json and _SUCCESS under --output. "
        "Rerunning into the same output resumes: images already done are skipped.",
    )
    add_arguments(parser, SegmentConfig)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit code 0 on a finished run, 2 for a bad parameter, 130 when interrupted
    (``exit_interrupted``: the process ends there)."""
    parser = build_parser()
    config = SegmentConfig(**vars(parser.parse_args(argv)))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        summary = run_segmentation(config)
    except ConfigError as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        exit_interrupted("interrupted: rerun the same command to resume (finished images are kept)")
    print(json.dumps(asdict(summary), indent=2))
    return 0
