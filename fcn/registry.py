"""Model registry on any fsspec URI: versioned models and an atomically updated champion pointer.

Layout::

    <registry>/runs/<run_name>/epoch-<NNNN>/checkpoint.pt, metrics.json
    <registry>/models/<version>/checkpoint.pt, metrics.json
    <registry>/champion.json   {"version", "checkpoint", "metrics", "promoted_at"}
"""

from __future__ import annotations

import json

import fsspec

CHAMPION_FILE = "champion.json"


def resolve_checkpoint_uri(uri: str) -> str:
    """Return the champion's checkpoint URI if ``uri`` is a registry root, else ``uri`` unchanged."""
    fs, path = fsspec.core.url_to_fs(uri)
    pointer = path.rstrip("/") + "/" + CHAMPION_FILE
    if not fs.isfile(pointer):
        return uri
    with fs.open(pointer, "r") as f:
        champion = json.load(f)
    return champion["checkpoint"]
