"""The checkpoint a segmentation run uses: resolved and described once, on the driver."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import fsspec

from pipelines.segment.config import ConfigError, flag

_REGISTRY_VERSION = re.compile(r"/models/(v\d+)/[^/]+$")


@dataclass(frozen=True)
class ModelInfo:
    """A resolved checkpoint: its file URI, version, architecture, class names and palette (the first
    head's), every head's ({head: {"class_names", "palette"}}), the input modalities it reads, and its tiling:
    output stride and tile margin (``fcn.tiling.tile_margin``)."""

    uri: str
    version: str
    arch: dict[str, Any]
    class_names: list[str]
    palette: list[int]
    heads: dict[str, dict[str, list]] = field(default_factory=dict)
    modalities: tuple[str, ...] = ("rgb",)
    output_stride: int = 32
    tile_margin: int = 0

    @property
    def label(self) -> str:
        return f"{self.arch['name']} {self.version}"


def checkpoint_exists(uri: str, storage_options: dict[str, Any]) -> bool:
    """Whether ``uri`` (a checkpoint, or a registry root: its champion) names an existing file; a quick
    check without torch, so that a mistyped ``--model`` fails before any cluster starts."""
    from fcn.registry import resolve_checkpoint_uri

    try:
        fs, path = fsspec.core.url_to_fs(
            resolve_checkpoint_uri(uri, storage_options=storage_options), **storage_options
        )
        return fs.exists(path)
    except (OSError, ValueError):
        return False


def describe_model(uri: str, storage_options: dict[str, Any]) -> ModelInfo:
    """Resolve ``uri`` (a checkpoint, or a registry root: its champion) and read its description.
    The version is the registry's (``v0003``), else the file's etag, else its size and mtime."""
    import fcn
    from fcn.tiling import tile_margin

    try:
        checkpoint = fcn.load_checkpoint(uri, storage_options=storage_options)  # resolves a registry's champion
    except (ValueError, OSError) as error:
        raise ConfigError(flag("model"), str(error)) from None
    fs, path = fsspec.core.url_to_fs(checkpoint.uri, **storage_options)
    match = _REGISTRY_VERSION.search(path)
    if match:
        version = match.group(1)
    else:
        info = fs.info(path)
        etag = info.get("ETag") or info.get("etag")
        version = f"etag:{str(etag).strip(chr(34))}" if etag else f"size:{info['size']}-mtime:{info.get('mtime')}"
    return ModelInfo(
        uri=fs.unstrip_protocol(path),
        version=version,
        arch=checkpoint.arch,
        class_names=list(checkpoint.class_names),
        palette=list(checkpoint.palette),
        heads=checkpoint.heads,
        modalities=tuple(checkpoint.modalities),
        output_stride=int(checkpoint.model.output_stride),
        tile_margin=tile_margin(int(checkpoint.model.receptive_field), int(checkpoint.model.output_stride)),
    )
