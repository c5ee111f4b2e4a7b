"""One self-describing checkpoint file on any fsspec URI.

A checkpoint is a ``torch.save`` archive of plain data only (loaded back with ``weights_only=True``,
so it cannot run code)::

    {"format": "fcn-checkpoint", "version": 2,
     "arch": {"name": "fcn8s_vgg16", "kwargs": {...builder arguments...}},
     "state_dict": {...tensors...},
     "class_names": [...], "palette": [768 ints],          # the first head's
     "heads": {"semantic": {"class_names": [...], "palette": [...]}, ...},   # every head, in order
     "modalities": ["rgb"] | ["rgb", "depth"] | ["hha"] | ["rgb", "hha"],    # the input's channels
     "input_convention": "caffe" | "torchvision",
     "meta": {...training metadata: epoch, metrics, dataset, ...}}

``load_checkpoint`` rebuilds the network with ``fcn.get_model(arch["name"], **arch["kwargs"])``.
Version 1 files (one head, RGB, the state_dict under pytorch-fcn's flat names) still load.
"""

from __future__ import annotations

import io
import pickle
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
from torch import nn

from fcn.classes import VOC_CLASSES, numbered_class_names, voc_palette
from fcn.conventions import get_convention
from fcn.heads import PRIMARY_HEAD, split_heads
from fcn.models import get_model
from fcn.registry import resolve_checkpoint_uri, write_atomic
from fcn.weights import pytorch_fcn_names

FORMAT = "fcn-checkpoint"
VERSION = 2
_ZIP_MAGIC = b"PK\x03\x04"
_FIELDS = {"arch", "state_dict", "class_names", "palette", "input_convention", "meta"}


class CheckpointError(ValueError):
    """A file that is missing, truncated, not an fcn checkpoint, or inconsistent."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt network (eval mode) and its description."""

    model: nn.Module
    arch: dict[str, Any]
    class_names: list[str]
    palette: list[int]
    input_convention: str
    meta: dict[str, Any] = field(default_factory=dict)
    uri: str = ""
    heads: dict[str, dict[str, list]] = field(default_factory=dict)
    """Every head by name: {"class_names": [...], "palette": [...]}; the first is ``class_names``'s."""
    modalities: list[str] = field(default_factory=lambda: ["rgb"])


def save_checkpoint(
    model: nn.Module,
    uri: str,
    *,
    class_names: list[str] | tuple[str, ...] | None = None,
    palette: list[int] | None = None,
    input_convention: str = "torchvision",
    storage_options: dict[str, Any] | None = None,
    head_class_names: dict[str, list[str] | tuple[str, ...]] | None = None,
    **meta: Any,
) -> str:
    """Write ``model`` (built by ``fcn.get_model``) and its description to ``uri``; return ``uri``.

    ``class_names`` (the first head's) defaults to the VOC names for 21 classes (``class_0``...
    otherwise), ``palette`` to the VOC colour map; ``head_class_names`` names a multi-head net's
    further heads' classes (default ``class_0``...; their palette is VOC's). ``meta`` must be plain data
    (str, int, float, bool, None, lists, dicts, tensors). Local files are written to a temporary name
    and renamed; object stores receive one PUT.
    ``storage_options`` go to fsspec (e.g. ``{"endpoint_url": ...}`` for an S3-compatible store).
    """
    arch = getattr(model, "arch", None)
    if not isinstance(arch, dict) or "name" not in arch or "kwargs" not in arch:
        raise ValueError("model has no 'arch' description; build it with fcn.get_model")
    num_classes = model.num_classes
    if class_names is None:
        class_names = VOC_CLASSES if num_classes == len(VOC_CLASSES) else numbered_class_names(num_classes)
    class_names = [str(name) for name in class_names]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for a network with {num_classes} classes")
    palette = voc_palette() if palette is None else [int(v) for v in palette]
    if len(palette) % 3 or len(palette) > 768 or not all(0 <= v <= 255 for v in palette):
        raise ValueError("palette must be at most 256 RGB triples of ints in [0, 255]")
    head_classes = getattr(model, "head_classes", {PRIMARY_HEAD: num_classes})
    primary, further = split_heads(head_classes)
    heads = {primary: {"class_names": class_names, "palette": palette}}
    for head in further:
        names = [str(n) for n in (head_class_names or {}).get(head, numbered_class_names(head_classes[head]))]
        if len(names) != head_classes[head]:
            raise ValueError(f"{len(names)} class names given for head {head!r} with {head_classes[head]} classes")
        heads[head] = {"class_names": names, "palette": voc_palette()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": _plain(arch, "arch"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "class_names": class_names,
        "palette": palette,
        "heads": heads,
        "modalities": list(getattr(model, "modalities", ("rgb",))),
        "input_convention": get_convention(input_convention).name,
        "meta": _plain(meta, "meta"),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if posixpath.dirname(path):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    write_atomic(fs, path, buffer.getvalue())
    return uri


def load_checkpoint(
    uri: str,
    *,
    map_location: str | torch.device = "cpu",
    storage_options: dict[str, Any] | None = None,
) -> Checkpoint:
    """Load a checkpoint file, or a registry root's champion, and rebuild its network in eval mode.

    ``storage_options`` go to fsspec. Raises CheckpointError naming the problem for a missing,
    truncated, foreign or inconsistent file.
    """
    uri = resolve_checkpoint_uri(uri, storage_options=storage_options)
    payload = _read_payload(uri, map_location, storage_options or {})
    name, kwargs = payload["arch"]["name"], payload["arch"]["kwargs"]
    try:
        with torch.device("meta"):  # no random init: the weights are assigned from the file below
            model = get_model(name, **kwargs)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {uri}: network {name!r} cannot be built: {error}") from None
    state = payload["state_dict"]
    if payload.get("version") == 1:  # flat pytorch-fcn names, before trunks and heads were composed
        state = {pytorch_fcn_names(model).get(k, k): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {uri}: weights do not fit network {name!r}: {error}") from None
    unset = [key for key, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if unset:  # a tensor outside the state_dict (non-persistent buffer) cannot come from the file
        raise RuntimeError(f"network {name!r} has tensors that a checkpoint cannot restore: {unset}")
    class_names = list(payload["class_names"])
    if len(class_names) != model.num_classes:
        raise CheckpointError(
            f"checkpoint {uri}: {len(class_names)} class names but network {name!r} has {model.num_classes} classes"
        )
    try:
        convention = get_convention(payload["input_convention"]).name
    except ValueError as error:
        raise CheckpointError(f"checkpoint {uri}: {error}") from None
    return Checkpoint(
        model=model.eval(),
        arch=payload["arch"],
        class_names=class_names,
        palette=list(payload["palette"]),
        input_convention=convention,
        meta=payload["meta"],
        uri=uri,
        heads=payload.get("heads") or {PRIMARY_HEAD: {"class_names": class_names, "palette": list(payload["palette"])}},
        modalities=list(payload.get("modalities", ["rgb"])),
    )


def _read_payload(uri: str, map_location: str | torch.device, storage_options: dict[str, Any]) -> dict[str, Any]:
    """torch.load the file with weights_only=True, turning every failure into a CheckpointError."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    try:
        with fs.open(path, "rb") as f:
            if f.read(4) != _ZIP_MAGIC:
                raise CheckpointError(f"{uri} is not a checkpoint (not a torch.save archive)")
            f.seek(0)
            payload = torch.load(f, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {uri}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{uri} is a folder, neither a checkpoint file nor a registry with a champion") from None
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"{uri} refused: it holds objects other than tensors and plain data ({first_line})"
        ) from None
    except (RuntimeError, EOFError) as error:
        raise CheckpointError(f"{uri} is truncated or corrupt: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{uri} is a torch file but not an fcn checkpoint (no {FORMAT!r} marker)")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{uri} has checkpoint format version {payload['version']}; this code reads {VERSION}")
    missing = sorted(_FIELDS - payload.keys())
    if missing:
        raise CheckpointError(f"{uri} is an incomplete fcn checkpoint: missing {missing}")
    arch = payload["arch"]
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) or not isinstance(arch.get("kwargs"), dict):
        raise CheckpointError(f"{uri} has a malformed network description: {arch!r}")
    return payload


def _plain(value: Any, where: str) -> Any:
    """A copy of ``value`` with numpy scalars turned into Python ones; ValueError for anything that
    ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return None
    for plain_type in (bool, int, float, str):  # also turns subclasses (IntEnum, ...) into the plain type
        if isinstance(value, plain_type):
            return plain_type(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, (str, int)):
                raise ValueError(f"{where} has a key of type {type(key).__name__}; use str keys")
        return {key: _plain(v, f"{where}[{key!r}]") for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise ValueError(f"{where} holds a {type(value).__name__}; checkpoint metadata must be plain data")
