"""The writing stage of the segmentation job: ``ResultWriter``, an actor pool on CPUs that encodes the
masks (and overlays), writes them, and writes each batch's statistics as one Parquet part file, atomically.

``<output>/stats/`` holds Parquet files named ``part-<run id>-<uuid>.parquet``. Each is written whole
(local disks: temporary hidden name + rename; object stores: one PUT), so a reader or a resumed run
never sees a partial file (``pipelines.segment.resume`` reads and compacts them). Masks, overlays and parts
go through ``pipelines.common.objectstore`` (obstore on S3, fsspec elsewhere); parts with ``atomic=True``,
i.e. ``fcn.registry.write_atomic`` off S3, the write the model library saves checkpoints and the registry
with.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fcn.heads import head_key, split_heads
from pipelines.common import objectstore
from pipelines.common.storage import PERMANENT_IO_ERRORS, backoff_s, with_retries
from pipelines.segment import schema as columns_schema
from pipelines.segment.keys import output_name, unsafe_key_reason
from pipelines.segment.masks import encode_mask, encode_overlay
from pipelines.segment.model import ModelInfo
from pipelines.segment.schema import binary_views, typed_arrays
from pipelines.segment.tiles import store_tiles

MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"
STATS_DIR = "stats"


class ResultWriter:
    """Ray actor for the output stage (an actor pool on CPUs): ``store_results`` with fixed options, its libraries
    imported once (see ``pipelines.segment.load.ImageLoader``)."""

    def __init__(self, **options: Any):
        self.options = options

    def __call__(self, batch: pa.Table) -> pa.Table:
        return store_results(batch, **self.options)


def store_results(
    batch: pa.Table,
    *,
    output: str,
    storage_options: dict[str, Any],
    run_id: str,
    model: ModelInfo,
    schema: pa.Schema,
    retries: int,
) -> pa.Table:
    """Encode the masks (and overlays, when ``pixels`` came along) of the segmented rows, write them,
    then write the batch's stats as one Parquet file (written whole). Writes are retried ``retries``
    times; a mask that still cannot be written makes its row an error row, a Parquet part that cannot
    be written fails the run (no ``_SUCCESS``; a rerun resumes). Returns ``image_uri``, ``status`` and
    ``error`` for the driver's progress. The windows of tiled images are stored as tile parts instead
    (``pipelines.segment.tiles.store_tiles``: their image's row comes after the pipeline)."""
    heads = model.heads
    if "tile_part" in batch.column_names and batch["tile_part"].null_count < batch.num_rows:
        is_tile = pc.is_valid(batch["tile_part"])
        whole = batch.filter(pc.invert(is_tile))
        done = [store_tiles(batch.filter(is_tile), heads=list(heads), storage_options=storage_options, retries=retries)]
        if whole.num_rows:
            options = {"storage_options": storage_options, "run_id": run_id, "model": model, "schema": schema}
            done.append(store_results(whole, output=output, retries=retries, **options))
        return pa.concat_tables(done)
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    root = root.rstrip("/")
    n = batch.num_rows
    keys = batch["key"].to_pylist()
    errors = batch["error"].to_pylist()
    heights, widths = batch["height"].to_pylist(), batch["width"].to_pylist()
    labels = {head: binary_views(batch[head_key(head, heads, "labels")]) for head in heads}
    pixels = binary_views(batch["pixels"]) if "pixels" in batch.column_names else [None] * n
    mask_uris: dict[str, list[str | None]] = {head: [None] * n for head in heads}
    overlay_uris: list[str | None] = [None] * n
    write_ms: list[float | None] = [None] * n
    files: dict[str, bytes] = {}
    owners: dict[str, int] = {}
    for i in range(n):
        if errors[i] is not None:
            continue
        start = time.perf_counter()
        try:
            for head in heads:
                label_map = _label_map(labels[head][i], heights[i], widths[i])
                mask_uri = fs.unstrip_protocol(output_path(root, mask_folder(head, heads), keys[i], ".png"))
                files[mask_uri], owners[mask_uri] = encode_mask(label_map, heads[head]["palette"]), i
                mask_uris[head][i] = mask_uri
            if pixels[i] is not None:
                rgb = np.frombuffer(pixels[i], np.uint8).reshape(heights[i], widths[i], 3)
                overlay_uri = fs.unstrip_protocol(output_path(root, OVERLAYS_DIR, keys[i], ".jpg"))
                label_map = _label_map(labels[split_heads(heads)[0]][i], heights[i], widths[i])
                files[overlay_uri], owners[overlay_uri] = encode_overlay(rgb, label_map, model.palette), i
                overlay_uris[i] = overlay_uri
        except Exception as error:
            errors[i] = f"encode: {type(error).__name__}: {error}"
            for uris in mask_uris.values():
                uris[i] = None
            overlay_uris[i] = None
            continue
        write_ms[i] = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    failures = put_files(files, storage_options, retries)
    share_ms = (time.perf_counter() - start) * 1000 / max(len(set(owners.values())), 1)
    for uri, reason in failures.items():
        i = owners[uri]
        errors[i], overlay_uris[i] = f"write: {reason}", None
        for uris in mask_uris.values():
            uris[i] = None
    ok = [error is None for error in errors]
    for i in range(n):
        if ok[i]:
            write_ms[i] += share_ms  # encoding (this actor) + this batch's share of writing
    now = datetime.now(UTC)
    columns: dict[str, list[Any]] = {
        "overlay_uri": overlay_uris,
        "write_ms": [ms if good else None for ms, good in zip(write_ms, ok)],
        "status": [columns_schema.STATUS_OK if good else columns_schema.STATUS_ERROR for good in ok],
        "error": errors,
        "run_id": [run_id] * n,
        "processed_at": [now] * n,
        "model_id": [model.uri] * n,
        "model_version": [model.version] * n,
    }
    for head in heads:
        columns[head_key(head, heads, "mask_uri")] = mask_uris[head]
        counts = batch[head_key(head, heads, "pixel_counts")].to_pylist()
        columns.update(
            class_statistics(counts, ok, heads[head]["class_names"], lambda c, head=head: head_key(head, heads, c))
        )
    arrays = typed_arrays(columns, columns_schema.STORE)
    table = pa.Table.from_arrays(
        [arrays[name] if name in arrays else batch[name] for name in schema.names], schema=schema
    )
    write_part(f"{output.rstrip('/')}/{STATS_DIR}", table, run_id, storage_options, retries)
    return table.select(["image_uri", "status", "error"])


def mask_folder(head: str, heads: Iterable[str]) -> str:
    """The folder of ``head``'s masks (``fcn.heads.head_key``): ``masks`` for the primary head, ``masks_<head>``
    for a further one."""
    return head_key(head, heads, MASKS_DIR, suffix=True)


def output_path(root: str, folder: str, key: str, suffix: str) -> str:
    """``<root>/<folder>/<name><suffix>``, ``name`` being the key with ``%``, ``?`` and ``#`` escaped
    (``pipelines.segment.keys.output_name``); ValueError for a key that would not stay inside that folder or
    name a file of its own (see ``pipelines.segment.keys.unsafe_key_reason``)."""
    reason = unsafe_key_reason(key)
    if reason:
        raise ValueError(reason)
    return f"{root}/{folder}/{output_name(key)}{suffix}"


def _label_map(buffer: memoryview, height: int, width: int) -> np.ndarray:
    return np.frombuffer(buffer, _label_dtype(buffer, height, width)).reshape(height, width)


def _label_dtype(buffer: memoryview, height: int, width: int) -> type[np.generic]:
    """uint8 labels (up to 256 classes) or int32 ones, told apart by their byte length."""
    return np.uint8 if len(buffer) == height * width else np.int32


def class_statistics(
    counts: list[list[int] | None], ok: list[bool], class_names: list[str], name: Callable[[str], str]
) -> dict[str, list[Any]]:
    """``class_fractions``, ``dominant_class`` and ``dominant_class_name`` (as ``name`` names them for
    the head) of one head's pixel counts, for the ok rows."""
    n = len(counts)
    fractions: list[list[float] | None] = [None] * n
    dominant: list[int | None] = [None] * n
    dominant_names: list[str | None] = [None] * n
    for i in range(n):
        if ok[i]:
            array = np.asarray(counts[i])
            fractions[i] = (array / max(int(array.sum()), 1)).tolist()
            dominant[i] = int(array.argmax())
            dominant_names[i] = class_names[dominant[i]] if dominant[i] < len(class_names) else None
    return {
        name("class_fractions"): fractions,
        name("dominant_class"): dominant,
        name("dominant_class_name"): dominant_names,
    }


def put_files(files: dict[str, bytes], storage_options: dict[str, Any], retries: int) -> dict[str, str]:
    """Write all ``files`` ({URI: content}) concurrently (``pipelines.common.objectstore.put_all``), then
    those that failed with a transient error again, up to ``retries`` times, with back-off; return
    {URI: reason} of the files that could not be written."""
    failures = objectstore.put_all(files, storage_options)
    for attempt in range(retries):
        transient = [uri for uri, error in failures.items() if not isinstance(error, PERMANENT_IO_ERRORS)]
        if not transient:
            break
        time.sleep(backoff_s(attempt))
        for uri in transient:
            del failures[uri]
        failures.update(objectstore.put_all({uri: files[uri] for uri in transient}, storage_options))
    return {uri: f"{type(error).__name__}: {error}" for uri, error in failures.items()}


def write_part(stats_uri: str, rows: pa.Table, run_id: str, storage_options: dict[str, Any], retries: int = 0) -> str:
    """Write ``rows`` as one new Parquet file under ``stats_uri``, atomically; return its URI. A failed
    write is retried ``retries`` times under the same name, so a PUT that failed after the store kept it
    cannot leave the rows twice; the last failure is raised as an OSError naming the file."""
    uri = f"{stats_uri.rstrip('/')}/part-{run_id}-{uuid.uuid4().hex[:12]}.parquet"
    data = parquet_bytes(rows)
    retried(lambda: objectstore.put_bytes(uri, data, storage_options, atomic=True), retries, f"write: stats part {uri}")
    return uri


def retried(action: Callable[[], None], retries: int, what: str) -> None:
    """``action()``, retried as ``with_retries`` does; its last failure is raised as an OSError whose
    message starts with ``what``."""
    try:
        with_retries(action, retries)
    except Exception as error:
        raise OSError(f"{what}: {type(error).__name__}: {error}") from error


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()
