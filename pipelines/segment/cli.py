"""``python -m pipelines.segment`` / ``fcn-segment``: the flags are ``SegmentConfig``'s fields."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, fields

from pipelines.segment.config import ConfigError, SegmentConfig, flag
from pipelines.segment.driver import run_segmentation


def build_parser() -> argparse.ArgumentParser:
    """One flag per ``SegmentConfig`` field, with its default, type, choices and help."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.segment",
        description="Segment every image under a URI with an FCN on Ray; write indexed-PNG masks, "
        "Parquet statistics (one row per image), manifest.json and _SUCCESS under --output. "
        "Rerunning into the same output resumes: images already done are skipped.",
    )
    hints = typing.get_type_hints(SegmentConfig)
    for spec in fields(SegmentConfig):
        meta = SegmentConfig.metadata(spec.name)
        kwargs = {"help": meta["help"], "dest": spec.name}
        if meta.get("required"):
            kwargs["required"] = True
        else:
            kwargs["default"] = SegmentConfig.default(spec.name)
            if kwargs["default"] not in (None, False, {}):
                kwargs["help"] += " (default: %(default)s)"
        base = _without_none(hints[spec.name])
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if kwargs.get("default") is not False else "store_true"
        elif typing.get_origin(base) is dict:
            kwargs.update(type=_json_object, metavar=meta.get("metavar", "JSON"))
        else:
            kwargs["type"] = base
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
        parser.add_argument(flag(spec.name), **kwargs)
    return parser


def _without_none(hint: typing.Any) -> typing.Any:
    """``int`` for ``int | None``; other hints as they are."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit code 0 on a finished run, 2 for a bad parameter, 130 when interrupted."""
    parser = build_parser()
    config = SegmentConfig(**vars(parser.parse_args(argv)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run_segmentation(config)
    except ConfigError as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (finished images are kept)", file=sys.stderr)
        return 130
    print(json.dumps(asdict(summary), indent=2))
    return 0
