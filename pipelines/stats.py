"""The per-image statistics table: its Arrow schema, atomic Parquet part files, and resume bookkeeping.

``<output>/stats/`` holds Parquet files named ``part-<run id>-<uuid>.parquet``. Each is written whole
(local disks: temporary hidden name + rename; object stores: one PUT), so a reader or a resumed run
never sees a partial file. A run ends by compacting: when an image has more than one row (it was
redone after an error, changed at the source, or a retried write task stored it twice), only the
newest row is kept, so a finished output has exactly one row per image key.
"""

from __future__ import annotations

import io
import json
import uuid
from datetime import datetime
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fcn.registry import write_atomic
from pipelines.storage import with_retries

STATUS_OK = "ok"
STATUS_ERROR = "error"

FIELDS: list[tuple[str, pa.DataType, str]] = [
    ("image_uri", pa.string(), "full URI of the source image"),
    ("key", pa.string(), "path of the image relative to the input prefix (unique per output)"),
    ("source_size", pa.int64(), "size of the source file in bytes at listing time"),
    ("source_etag", pa.string(), "object-store ETag at listing time (null on filesystems without one)"),
    ("source_mtime", pa.timestamp("us", tz="UTC"), "modification time at listing time"),
    ("width", pa.int32(), "width of the displayed (EXIF-rotated) image = width of the mask"),
    ("height", pa.int32(), "height of the displayed image = height of the mask"),
    ("model_id", pa.string(), "URI of the checkpoint file used (registry champions are resolved)"),
    ("model_version", pa.string(), "registry version, else the checkpoint's etag/mtime fingerprint"),
    ("pixel_counts", pa.list_(pa.int64()), "pixels per class; index = class id; sums to width*height"),
    ("class_fractions", pa.list_(pa.float64()), "pixel_counts / (width*height)"),
    ("dominant_class", pa.int32(), "class id with the most pixels"),
    ("dominant_class_name", pa.string(), "name of dominant_class"),
    ("mean_confidence", pa.float64(), "mean over pixels of the winning class's softmax probability"),
    ("mask_uri", pa.string(), "indexed PNG mask with the checkpoint's palette"),
    ("overlay_uri", pa.string(), "colour overlay JPEG (only with --overlays)"),
    ("read_ms", pa.float64(), "time to fetch the source bytes"),
    ("decode_ms", pa.float64(), "time to decode and orient the image"),
    ("inference_ms", pa.float64(), "time in the network (whole image, tiled above the pixel budget)"),
    ("write_ms", pa.float64(), "time to encode and write the mask (and overlay)"),
    ("status", pa.string(), "'ok' or 'error'"),
    ("error", pa.string(), "reason, prefixed by the stage (read/decode/inference/encode/write), for error rows"),
    ("run_id", pa.string(), "the run that produced this row"),
    ("processed_at", pa.timestamp("us", tz="UTC"), "when the row was produced"),
]
COLUMNS = [name for name, _, _ in FIELDS]
HEAD_COLUMNS = ("mask_uri", "pixel_counts", "class_fractions", "dominant_class", "dominant_class_name", "mean_confidence")
"""The columns that each further head of a multi-task model repeats as ``<head>_<column>``."""


def head_column(head: str, column: str) -> str:
    """The name of a further head's ``column``: ``geometric_mask_uri``."""
    return f"{head}_{column}"


def stats_schema(
    class_names: list[str], palette: list[int], model: dict[str, Any], heads: dict[str, dict[str, list]] | None = None
) -> pa.Schema:
    """The stats schema, with ``HEAD_COLUMNS`` again for every head of ``heads`` after the first; class
    names, palette, every head ({task: {"class_names", "palette"}}) and the model description (JSON)
    are in its metadata."""
    heads = heads or {"semantic": {"class_names": class_names, "palette": palette}}
    documented = {name: (type_, doc) for name, type_, doc in FIELDS}
    further = [
        pa.field(head_column(head, column), documented[column][0], metadata={"description": f"{head} head: {documented[column][1]}"})
        for head in list(heads)[1:]
        for column in HEAD_COLUMNS
    ]  # fmt: skip
    return pa.schema(
        [pa.field(name, type_, metadata={"description": doc}) for name, type_, doc in FIELDS] + further,
        metadata={"class_names": json.dumps(class_names), "palette": json.dumps(palette), "heads": json.dumps(heads),
                  "model": json.dumps(model)},  # fmt: skip
    )


def write_part(stats_uri: str, rows: pa.Table, run_id: str, storage_options: dict[str, Any], retries: int = 0) -> str:
    """Write ``rows`` as one new Parquet file under ``stats_uri``, atomically; return its URI. A failed
    write is retried ``retries`` times under the same name, so a PUT that failed after the store kept it
    cannot leave the rows twice."""
    fs, root = fsspec.core.url_to_fs(stats_uri, **storage_options)
    path = f"{root.rstrip('/')}/part-{run_id}-{uuid.uuid4().hex[:12]}.parquet"
    fs.makedirs(root, exist_ok=True)
    data = _parquet_bytes(rows)
    with_retries(lambda: write_atomic(fs, path, data), retries)
    return fs.unstrip_protocol(path)


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


_STATE_COLUMNS = ["key", "source_size", "source_etag", "source_mtime", "model_id", "model_version", "status", "processed_at"]


def read_state(stats_uri: str, storage_options: dict[str, Any]) -> pa.Table:
    """The bookkeeping columns of every stats row already under ``stats_uri`` plus ``_file`` (its path);
    an empty table when there are none."""
    fs, root = fsspec.core.url_to_fs(stats_uri, **storage_options)
    fs.invalidate_cache()
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith((".", "_")))
    tables = []
    for path in files:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=_STATE_COLUMNS)
        tables.append(table.append_column("_file", pa.array([path] * table.num_rows, pa.string())))
    if not tables:
        fields = [f for f in stats_schema([], [], {}) if f.name in _STATE_COLUMNS]
        return pa.schema([*fields, pa.field("_file", pa.string())]).empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


def done_keys(state: pa.Table, images: list[dict[str, Any]], model_id: str, model_version: str) -> set[str]:
    """Keys of ``images`` whose newest row is ``ok`` for the same source (size and etag, else mtime)
    and the same model; those are skipped on a rerun."""
    newest: dict[str, dict[str, Any]] = {}
    for row in state.sort_by("processed_at").to_pylist():
        newest[row["key"]] = row
    done = set()
    for image in images:
        row = newest.get(image["key"])
        if (
            row is not None
            and row["status"] == STATUS_OK
            and row["model_id"] == model_id
            and row["model_version"] == model_version
            and row["source_size"] == image["source_size"]
            and _same_version(row, image)
        ):
            done.add(image["key"])
    return done


def _same_version(row: dict[str, Any], image: dict[str, Any]) -> bool:
    if image["source_etag"] is not None or row["source_etag"] is not None:
        return row["source_etag"] == image["source_etag"]
    return _micros(row["source_mtime"]) == _micros(image["source_mtime"])


def _micros(value: datetime | None) -> int | None:
    return None if value is None else round(value.timestamp() * 1_000_000)


def compact(stats_uri: str, storage_options: dict[str, Any]) -> pa.Table:
    """Keep only the newest row of each key: rewrite the files holding older duplicates (new file
    first, then delete the old one, so no row is ever missing). Return the state after compaction
    (see ``read_state``; ``_file`` is not updated for rewritten files)."""
    state = read_state(stats_uri, storage_options)
    if state.num_rows == len(set(state["key"].to_pylist())):
        return state
    order = pc.sort_indices(state, sort_keys=[("processed_at", "ascending")]).to_pylist()
    newest = {key: row for row, key in zip(order, state["key"].take(order).to_pylist())}
    keep = [False] * state.num_rows
    for row in newest.values():
        keep[row] = True
    flags_by_file: dict[str, list[bool]] = {}
    for path, flag in zip(state["_file"].to_pylist(), keep):
        flags_by_file.setdefault(path, []).append(flag)
    fs, _ = fsspec.core.url_to_fs(stats_uri, **storage_options)
    for path, flags in flags_by_file.items():
        if all(flags):
            continue
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        if any(flags):
            directory = path.rsplit("/", 1)[0]
            write_atomic(fs, f"{directory}/part-compacted-{uuid.uuid4().hex[:12]}.parquet", _parquet_bytes(table.filter(pa.array(flags))))
        fs.rm_file(path)
    return state.filter(pa.array(keep))
