"""Model registry on any fsspec URI: versioned models and an atomically updated champion pointer.

Layout::

    <registry>/runs/<run_name>/epoch-<NNNN>/checkpoint.pt, metrics.json
    <registry>/models/<version>/checkpoint.pt, metrics.json
    <registry>/champion.json   {"version", "checkpoint", "metrics", "promoted_at"}

A version's ``metrics.json`` is written after its ``checkpoint.pt``, so a version is complete once it
has metrics. ``champion.json`` is replaced atomically: on a local disk through a temporary file and
``os.replace``, on object stores by a single PUT, so a reader sees the old or the new champion, never
a partial file. Concurrent registrations get distinct versions (each claims its version by creating
the checkpoint exclusively); promotion assumes one writer at a time (e.g. one nightly job).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

CHAMPION_FILE = "champion.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
SCORE_METRIC = "mean_iu"


def resolve_checkpoint_uri(uri: str, *, storage_options: dict[str, Any] | None = None) -> str:
    """Return the champion's checkpoint URI if ``uri`` is a registry root, else ``uri`` unchanged."""
    champion = get_champion(uri, storage_options=storage_options)
    return uri if champion is None else champion["checkpoint"]


def get_champion(registry: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The parsed ``champion.json`` of ``registry`` with ``checkpoint`` as a full URI, or None if there
    is no champion. The file stores the checkpoint relative to the registry root, so a registry can be
    copied elsewhere (e.g. from a local disk to S3) and still resolve. ``storage_options`` go to fsspec."""
    fs, root = fsspec.core.url_to_fs(registry, **(storage_options or {}))
    root = root.rstrip("/")
    try:  # a direct read, not a (possibly cached) listing
        champion = json.loads(fs.cat_file(f"{root}/{CHAMPION_FILE}"))
    except (FileNotFoundError, NotADirectoryError):  # no champion, or ``registry`` is a file
        return None
    return {**champion, "checkpoint": fs.unstrip_protocol(f"{root}/{champion['checkpoint']}")}


def list_versions(registry: str) -> list[str]:
    """Complete versions (those with metrics) in ascending order."""
    fs, root = fsspec.core.url_to_fs(registry)
    fs.invalidate_cache(f"{root.rstrip('/')}/models")
    found = fs.glob(f"{root.rstrip('/')}/models/v*/{METRICS_FILE}")
    return sorted(p.rsplit("/", 2)[-2] for p in found)


def read_version(registry: str, version: str) -> dict[str, Any]:
    """The metrics of ``version`` plus its ``checkpoint`` URI; ValueError if there is no such version."""
    fs, root = fsspec.core.url_to_fs(registry)
    folder = f"{root.rstrip('/')}/models/{version}"
    try:
        metrics = json.loads(fs.cat_file(f"{folder}/{METRICS_FILE}"))
    except FileNotFoundError:
        raise ValueError(f"registry {registry!r} has no model version {version!r}") from None
    return {"version": version, "checkpoint": fs.unstrip_protocol(f"{folder}/{CHECKPOINT_FILE}"), "metrics": metrics}


def register_model(registry: str, checkpoint_uri: str, metrics: dict[str, Any]) -> str:
    """Copy a checkpoint file into the next version ``models/vNNNN/`` with its metrics; return the version.

    The version is claimed by creating its checkpoint exclusively (``O_EXCL`` locally, a conditional
    PUT on S3), so concurrent registrations get distinct versions instead of overwriting each other.
    """
    if SCORE_METRIC not in metrics:
        raise ValueError(f"metrics must contain {SCORE_METRIC!r} to register a model")
    fs, root = fsspec.core.url_to_fs(registry)
    root = root.rstrip("/")
    with fsspec.open(checkpoint_uri, "rb") as src:
        data = src.read()
    existing = [v for v in (p.rsplit("/", 1)[-1] for p in _listdir(fs, f"{root}/models")) if v[1:].isdigit()]
    number = max((int(v[1:]) for v in existing), default=0) + 1
    while True:
        version = f"v{number:04d}"
        folder = f"{root}/models/{version}"
        fs.makedirs(folder, exist_ok=True)
        try:
            _create_exclusive(fs, f"{folder}/{CHECKPOINT_FILE}", data)
            break
        except FileExistsError:  # another writer claimed this version since the listing
            number += 1
    fs.pipe_file(f"{folder}/{METRICS_FILE}", json.dumps(metrics, indent=2, sort_keys=True).encode())
    return version


def promote(registry: str, version: str) -> dict[str, Any]:
    """Make ``version`` the champion (atomically); return the new ``champion.json`` content."""
    entry = read_version(registry, version)
    stored = {
        **entry,
        "checkpoint": f"models/{version}/{CHECKPOINT_FILE}",
        "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    fs, root = fsspec.core.url_to_fs(registry)
    write_atomic(fs, f"{root.rstrip('/')}/{CHAMPION_FILE}", json.dumps(stored, indent=2).encode())
    return {**stored, "checkpoint": entry["checkpoint"]}


@dataclass(frozen=True)
class PromotionDecision:
    """Whether a candidate becomes champion, and why."""

    promote: bool
    reason: str


def decide_promotion(
    candidate: float, champion: float | None, margin: float = 0.0, *, champion_name: str = "champion"
) -> PromotionDecision:
    """The promotion rule: a candidate wins if there is no champion (``champion`` None), or if its validation
    mean IU beats the champion's by more than ``margin`` (a tie does not win); an undefined (NaN) score, the
    candidate's or the champion's, never wins. ``champion_name`` names the champion in the reason."""
    _check_margin(margin)
    if not math.isfinite(candidate):
        return PromotionDecision(False, "the candidate's validation mean IU is undefined")
    if champion is None:
        return PromotionDecision(True, "no champion yet")
    better = candidate > champion + margin
    return PromotionDecision(
        better,
        f"candidate mean IU {candidate:.4f} {'>' if better else '<='} {champion_name} {champion:.4f} + margin {margin}",
    )


def promote_if_better(registry: str, version: str, *, margin: float = 0.0) -> PromotionDecision:
    """Promote ``version`` if :func:`decide_promotion` says so against the champion's stored score; return
    the decision."""
    _check_margin(margin)
    candidate = read_version(registry, version)["metrics"][SCORE_METRIC]
    champion = get_champion(registry)
    decision = decide_promotion(
        candidate,
        None if champion is None else champion["metrics"][SCORE_METRIC],
        margin,
        champion_name=f"champion {champion and champion['version']}",
    )
    if decision.promote:
        promote(registry, version)
    return decision


def _check_margin(margin: float) -> None:
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")


def _listdir(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    fs.invalidate_cache(path)
    try:
        return [p.rstrip("/") for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


def _create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``path`` only if it does not exist yet; FileExistsError otherwise."""
    if isinstance(fs, LocalFileSystem):
        with open(path, "xb") as f:  # O_CREAT | O_EXCL
            f.write(data)
    else:  # S3: a PUT with If-None-Match; other stores: fsspec's check-then-write
        fs.pipe_file(path, data, mode="create")


def replace_atomically(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[str], None]) -> None:
    """Have ``write(target)`` put the new content of ``path`` where readers see either the old or the new
    content, never a part. On a local disk ``target`` is a hidden temporary name in the same folder, synced
    and then renamed onto ``path``: a writer killed before the rename leaves a file that folder readers
    (pyarrow, DuckDB globs, the stats state) skip, one that fails has it removed. Elsewhere ``target`` is
    ``path`` itself: an object store's object appears only once its PUT (or multipart upload) completes."""
    if not isinstance(fs, LocalFileSystem):
        write(path)
        return
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``, bytes in memory, on the fsspec filesystem ``fs`` (``replace_atomically``).
    ``pipelines.common.objectstore.put_bytes(atomic=True)`` is the same by URI, with obstore's PUTs on S3."""
    replace_atomically(fs, path, lambda target: fs.pipe_file(target, data))
