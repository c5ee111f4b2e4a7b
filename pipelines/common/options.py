"""A job's options defined once, as the fields of its configuration dataclass: each field carries its
default, help text, choices and bounds, and the CLI flags and validation of bounds are made from them.

``pipelines.segment.SegmentConfig`` and ``pipelines.train.TrainConfig`` are built this way: their fields
are ``python -m pipelines.segment``'s and ``python -m pipelines.train``'s flags, and the
``segment-bucket`` and ``nightly-retrain`` flows take their parameters' defaults and descriptions from
them.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, field, fields
from typing import Any

import fsspec


class ConfigError(ValueError):
    """A bad parameter; ``param`` names it as the user typed it (the CLI flag, e.g. ``--workers``). A CLI
    shows it without a traceback and exits with code 2."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<=")}
"""The bounds a numeric option may declare (pydantic's names): its value, when not None, must be a finite
number that compares so with each bound."""


def option(default: Any, help: str | Callable[[], str], **extra: Any) -> Any:
    """A config field whose metadata carries its help text, CLI extras (``required``, ``choices``,
    ``metavar``) and bounds (``ge``, ``gt``, ``le``: checked by :meth:`Options.check_bounds`, and the flows'
    parameter schemas); a callable ``default`` is a factory (a fresh ``dict`` per config), a callable
    ``help`` or ``choices`` is read when asked for (:meth:`Options.metadata`)."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help, **extra})


def flag(name: str) -> str:
    """The CLI flag of config field ``name``: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


class Options:
    """Base of a configuration dataclass made with :func:`option`: each field's metadata and default."""

    @classmethod
    def metadata(cls, name: str) -> dict[str, Any]:
        """The CLI metadata (help, choices, required) of field ``name``; a callable value (choices read from a
        registry) is called, so that what is registered after import counts."""
        return {key: value() if callable(value) else value for key, value in _field(cls, name).metadata.items()}

    @classmethod
    def default(cls, name: str) -> Any:
        """The default value of field ``name`` (a fresh one for a factory default)."""
        spec = _field(cls, name)
        if spec.default_factory is not MISSING:
            return spec.default_factory()
        if spec.default is MISSING:
            raise KeyError(f"{cls.__name__}.{name} has no default")
        return spec.default

    @classmethod
    def bounds(cls, name: str) -> dict[str, float]:
        """The bounds (``ge``, ``gt``, ``le``) that field ``name`` declares."""
        return {key: value for key, value in _field(cls, name).metadata.items() if key in BOUNDS}

    def check_bounds(self) -> None:
        """Raise ConfigError naming the first field whose value is not a number within its bounds."""
        for spec in fields(self):
            value = getattr(self, spec.name)
            for key, bound in self.bounds(spec.name).items():
                compare, symbol = BOUNDS[key]
                number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                if value is not None and not (number and compare(value, bound)):
                    raise ConfigError(flag(spec.name), f"must be {symbol} {bound}, got {value!r}")


def add_arguments(parser: argparse.ArgumentParser, config: type[Options]) -> None:
    """One flag per field of ``config``, with its default, type, choices and help; ``bool`` fields that
    default to True get ``--no-<flag>``, ``dict`` fields take a JSON object."""
    hints = typing.get_type_hints(config)
    for spec in fields(config):
        meta = config.metadata(spec.name)
        kwargs: dict[str, Any] = {"help": meta["help"], "dest": spec.name}
        if meta.get("required"):
            kwargs["required"] = True
        else:
            kwargs["default"] = config.default(spec.name)
            if kwargs["default"] not in (None, False, {}):
                kwargs["help"] += " (default: %(default)s)"
        base = _without_none(hints[spec.name])
        if base is bool:
            kwargs["action"] = "store_true" if kwargs.get("default") is False else argparse.BooleanOptionalAction
        elif typing.get_origin(base) is dict:
            kwargs.update(type=_json_object, metavar=meta.get("metavar", "JSON"))
        else:
            kwargs["type"] = base
            kwargs.update({key: meta[key] for key in ("choices", "metavar") if key in meta})
        parser.add_argument(flag(spec.name), **kwargs)


SECRET_WORDS = ("secret", "token", "password", "passwd", "credential")
"""An option whose name holds one of these, or ends in "key" (``key``, ``account_key``), looks like a secret."""
SAFE_SECRETS_HELP = (
    "@FILE (a JSON file the driver reads: any fsspec URI), or the environment: s3fs reads AWS_ACCESS_KEY_ID, "
    "AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (or an instance role), and fsspec any option from "
    "FSSPEC_<PROTOCOL>_<OPTION> (e.g. FSSPEC_S3_SECRET) or its config files in FSSPEC_CONFIG_DIR"
)
"""The ways to pass secrets that neither process lists (ps) nor Ray's job table show."""


def _json_object(text: str) -> dict:
    """A JSON object given inline or as ``@FILE`` (read from that path or URI); inline options with
    secret-looking names print a warning naming the safe ways."""
    source = "the command line"
    if text.startswith("@"):
        source = text[1:]
        try:
            with fsspec.open(source, "rt") as file:
                text = file.read()
        except (OSError, ValueError) as error:
            raise argparse.ArgumentTypeError(f"cannot read {source}: {type(error).__name__}: {error}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON in {source} ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object (in {source})")
    secrets = secret_names(value)
    if secrets and source == "the command line":
        print(
            f"warning: {', '.join(secrets)} given on the command line, where process lists (ps) and Ray's job "
            f"table show it to others; pass it as {SAFE_SECRETS_HELP}",
            file=sys.stderr,
        )
    return value


def secret_names(options: Any) -> list[str]:
    """The names of the options in ``options`` (nested dicts included) that look like secrets."""
    if not isinstance(options, dict):
        return []
    found = []
    for name, value in options.items():
        lowered = str(name).lower()
        if any(word in lowered for word in SECRET_WORDS) or lowered.endswith("key"):
            found.append(str(name))
        found += secret_names(value)
    return found


def _field(config: type, name: str) -> Any:
    try:
        return next(spec for spec in fields(config) if spec.name == name)
    except StopIteration:
        raise KeyError(f"{config.__name__} has no field {name!r}") from None


def _without_none(hint: Any) -> Any:
    """``int`` for ``int | None``; other hints as they are."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint
