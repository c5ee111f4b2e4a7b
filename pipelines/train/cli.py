"""``python -m pipelines.train`` / ``fcn-train``: the flags are ``TrainConfig``'s fields."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pipelines.common.options import ConfigError, add_arguments
from pipelines.common.ray_utils import LOG_FORMAT, exit_interrupted
from pipelines.train.config import TrainConfig
from pipelines.train.context import default_run_name
from pipelines.train.driver import TrainSummary, run_training
from pipelines.train.epoch import SCORES


def build_parser() -> argparse.ArgumentParser:
    """One flag per ``TrainConfig`` field, with its default, type, choices and help; plus ``--verbose``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.train",
        description="Train an FCN with Ray Train on a labelled dataset (VOC, images/ + masks/, NYUDv2 or SIFT Flow "
        "layout) and register its best epoch. The paper's four metrics are reported for every head; registration "
        "and promotion rank by the first (semantic) head's validation mean IU.",
    )
    add_arguments(parser, TrainConfig)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: exit 0 on success, 2 on bad arguments or data, 1 if training fails, 130 when interrupted
    (``exit_interrupted``: the process ends there)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.DEBUG if args.pop("verbose") else logging.INFO, format=LOG_FORMAT)
    config = TrainConfig(**args)
    config.run_name = config.run_name or default_run_name(config.model)  # named here, so a resume can be told
    try:
        summary = run_training(config)
    except ConfigError as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        exit_interrupted(
            f"interrupted: run the same command with --run-name {config.run_name} to resume after the last "
            "finished epoch"
        )
    except Exception as error:
        logging.getLogger("pipelines.train").debug("training failed", exc_info=True)
        print(f"training failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(_summary_report(summary), indent=2))
    return 0


def _summary_report(summary: TrainSummary) -> dict[str, Any]:
    metrics = summary.metrics
    return {
        "run_name": summary.run_name,
        "checkpoint": summary.checkpoint_uri,
        "epochs": summary.epochs,
        "best_epoch": metrics["epoch"],
        **{k: metrics[k] for k in SCORES},
        "heads": {head: {k: scores[k] for k in SCORES} for head, scores in metrics["heads"].items()},
        "version": summary.version,
        "promoted": summary.promoted,
        "skipped": summary.skipped,
    }
