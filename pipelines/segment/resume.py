"""Resume bookkeeping of the per-image statistics table (``<output>/stats/``, see
``pipelines.segment.write``): what is already done, what is left to segment, and compaction.

A run ends by compacting: when an image has more than one row (it was redone after an error, changed at
the source, or a retried write stored it twice), only the newest row is kept, so a finished output has
exactly one row per image key, and gathers the run's small part files into files of about 64Ki rows.
Rewritten parts are written as the writing stage writes them (``fcn.registry.write_atomic``).
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fcn.registry import write_atomic
from pipelines.segment.schema import STATUS_OK, stats_schema
from pipelines.segment.write import parquet_bytes, retried

_STATE_COLUMNS = [
    "key",
    "source_size",
    "source_etag",
    "source_mtime",
    "model_id",
    "model_version",
    "status",
    "processed_at",
]

_REPEATED = ["model_id", "model_version", "status"]  # few distinct values: read dictionary-encoded
MERGED_PART_ROWS = 1 << 16
"""Rows per stats file after a run's parts are merged: opening a Parquet file costs about as much as
reading 2,500 of its rows' bookkeeping (``python -m bench.flow_scale``)."""


def read_state(stats_uri: str, storage_options: dict[str, Any]) -> pa.Table:
    """The bookkeeping columns of every stats row already under ``stats_uri`` plus ``_file`` (its path,
    dictionary-encoded); an empty table when there are none."""
    fs, root = fsspec.core.url_to_fs(stats_uri, **storage_options)
    fs.invalidate_cache()
    tables = [_read_bookkeeping(fs, path) for path in _part_files(fs, root)]
    if not tables:
        return _state_schema().empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


def _state_schema() -> pa.Schema:
    fields = [f for f in stats_schema([], [], {}) if f.name in _STATE_COLUMNS]
    return pa.schema([*fields, pa.field("_file", pa.dictionary(pa.int32(), pa.string()))])


def _part_files(fs: fsspec.AbstractFileSystem, root: str, prefix: str = "") -> list[str]:
    """The stats part files under ``root`` (hidden and temporary files excluded), optionally only
    those whose name starts with ``prefix``."""
    if not fs.exists(root):
        return []
    names = (p for p in fs.find(root) if p.endswith(".parquet"))
    return sorted(
        p for p in names if not p.rsplit("/", 1)[-1].startswith((".", "_")) and p.rsplit("/", 1)[-1].startswith(prefix)
    )


def _read_bookkeeping(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] = _STATE_COLUMNS) -> pa.Table:
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=columns, read_dictionary=[c for c in _REPEATED if c in columns])
    files = pa.DictionaryArray.from_arrays(pa.array(np.zeros(table.num_rows, np.int32)), pa.array([path], pa.string()))
    return table.append_column("_file", files)


def newest_rows(state: pa.Table, unique_keys: bool = False) -> pa.Table:
    """The newest row (by ``processed_at``) of each key; ``state`` itself when its keys are unique:
    ``unique_keys`` (known: a finished run compacted them), else checked (a hash count, no sort)."""
    if unique_keys or state.num_rows == pc.count_distinct(state["key"]).as_py():
        return state
    ordered, newest = _by_key_oldest_first(state)
    return ordered.filter(pa.array(newest))


def _by_key_oldest_first(rows: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """``rows`` sorted by key, then ``processed_at``; and which rows are the newest of their key."""
    ordered = rows.sort_by([("key", "ascending"), ("processed_at", "ascending")])
    keys = ordered["key"]
    same_as_next = pc.equal(keys.slice(0, len(keys) - 1), keys.slice(1)).to_numpy(zero_copy_only=False)
    return ordered, ~np.append(same_as_next, False)


def todo_images(
    listing: pa.Table, state: pa.Table, model_id: str, model_version: str, *, unique_keys: bool = False
) -> pa.Table:
    """The images of ``listing`` (``SOURCE_SCHEMA``) to segment: all but those whose newest row in
    ``state`` is ``ok`` for the same source (size, and etag where either side has one, else mtime)
    and the same model. Decided with Arrow (a hash lookup of each listed key), not per row in Python.
    ``unique_keys``: ``state`` is known to hold one row per key (see ``newest_rows``)."""
    newest = newest_rows(state, unique_keys)
    ok = pc.and_(
        _is(newest["status"], STATUS_OK),
        pc.and_(_is(newest["model_id"], model_id), _is(newest["model_version"], model_version)),
    )
    where = pc.index_in(listing["key"], value_set=newest["key"].combine_chunks())  # a hash lookup per listed key
    etag, etag_done = listing["source_etag"], newest["source_etag"].take(where)
    same_version = pc.if_else(
        pc.or_(pc.is_valid(etag), pc.is_valid(etag_done)),
        pc.fill_null(pc.equal(etag, etag_done), False),
        pc.fill_null(pc.equal(listing["source_mtime"], newest["source_mtime"].take(where)), False),
    )
    same_size = pc.fill_null(pc.equal(listing["source_size"], newest["source_size"].take(where)), False)
    unchanged = pc.and_(pc.and_(same_size, same_version), pc.fill_null(ok.take(where), False))
    return listing.filter(pc.invert(unchanged))


def _is(column: pa.ChunkedArray, value: str) -> pa.ChunkedArray:
    """``column == value`` for a (dictionary-encoded) string column, without decoding it."""
    return pc.is_in(column, value_set=pa.array([value], pa.string()))


def compact(
    stats_uri: str,
    storage_options: dict[str, Any],
    run_id: str,
    previous: pa.Table,
    *,
    unique_keys: bool = False,
    retries: int = 0,
) -> pa.Array:
    """Keep only the newest row of each key, touching only the part files that hold a superseded row:
    the earlier rows of the keys this run wrote, and older duplicates (left by an interrupted run or a
    retried write). ``previous`` is the state read before the run (``read_state``; ``unique_keys``: known
    to hold one row per key, as after a finished run). A rewritten file is written anew before the old
    one is deleted, so no row is ever missing. Each write and delete is retried ``retries`` times: a
    write under the same name, a delete of a file already gone counts as done. Returns the keys this
    run wrote."""
    fs, root = fsspec.core.url_to_fs(stats_uri, **storage_options)
    fs.invalidate_cache()
    parts = [_read_bookkeeping(fs, path, ["key", "processed_at"]) for path in _part_files(fs, root, f"part-{run_id}-")]
    run_rows = pa.concat_tables(parts) if parts else previous.select(["key", "processed_at", "_file"]).slice(0, 0)
    run_keys = pc.unique(run_rows["key"])
    superseded = pa.concat_tables(
        [
            _locations(previous.filter(pc.is_in(previous["key"], value_set=run_keys))),
            _older_duplicates(previous.slice(0, 0) if unique_keys else previous),
            _older_duplicates(run_rows),
        ]
    )
    for path in pc.unique(superseded["_file"]).to_pylist():
        stale = superseded.filter(pc.equal(superseded["_file"], path))["key"]
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        kept = table.filter(pc.invert(pc.is_in(table["key"], value_set=stale)))
        if kept.num_rows:
            rewritten = f"{path.rsplit('/', 1)[0]}/part-compacted-{uuid.uuid4().hex[:12]}.parquet"  # kept on retries
            data = parquet_bytes(kept)
            what = f"compaction: writing {fs.unstrip_protocol(rewritten)}"
            retried(lambda: write_atomic(fs, rewritten, data), retries, what)
        retried(lambda: _remove(fs, path), retries, f"compaction: deleting {fs.unstrip_protocol(path)}")
    merge_run_parts(fs, root, run_id, retries=retries)
    return run_keys


def merge_run_parts(
    fs: fsspec.AbstractFileSystem, root: str, run_id: str, *, rows: int = MERGED_PART_ROWS, retries: int = 0
) -> None:
    """Gather run ``run_id``'s part files (``--rows-per-file`` rows each, written as images finish) into
    files of about ``rows`` rows, holding one group in memory at a time: a reader of the table (a resume,
    the flow's check) then opens a few large files instead of many small ones. A merged file is written
    before its parts are deleted, so no row is ever missing; a run stopped in between leaves duplicates
    that the next compaction removes."""
    group: list[tuple[str, pa.Table]] = []
    for path in [*_part_files(fs, root, f"part-{run_id}-"), None]:
        if path is not None:
            with fs.open(path, "rb") as f:
                group.append((path, pq.read_table(f)))
        if group and (path is None or sum(table.num_rows for _, table in group) >= rows):
            if len(group) > 1:
                merged = f"{root}/part-{run_id}-merged-{uuid.uuid4().hex[:12]}.parquet"
                data = parquet_bytes(pa.concat_tables(table for _, table in group))
                retried(
                    lambda: write_atomic(fs, merged, data),
                    retries,
                    f"compaction: writing {fs.unstrip_protocol(merged)}",
                )
                for part, _ in group:
                    retried(lambda: _remove(fs, part), retries, f"compaction: deleting {fs.unstrip_protocol(part)}")
            group = []


def _remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete ``path``; one already gone (an earlier attempt deleted it, its answer lost) is fine."""
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def _locations(rows: pa.Table) -> pa.Table:
    """``key`` and ``_file`` (as plain strings) of ``rows``."""
    return pa.table({"key": rows["key"], "_file": rows["_file"].cast(pa.string())})


def _older_duplicates(rows: pa.Table) -> pa.Table:
    """The rows of ``rows`` (``key``, ``processed_at``, ``_file``) that a newer row of the same key
    supersedes, as ``_locations``; none when keys are unique (checked without sorting)."""
    if rows.num_rows == pc.count_distinct(rows["key"]).as_py():
        return _locations(rows.slice(0, 0))
    ordered, newest = _by_key_oldest_first(rows)
    return _locations(ordered.filter(pa.array(~newest)))
