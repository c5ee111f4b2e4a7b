"""The statistics' digest: one scan of a run's Arrow dataset (a table, or the Parquet files of a run) that sums
every head's aggregates batch by batch, keeps the first error rows, and turns only an evenly spread sample of
rows into Python objects (``digest_stats``), with memory bounded whatever the number of rows.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from fcn.classes import voc_palette
from fcn.heads import PRIMARY_HEAD, head_key

ERROR_ROWS = 20  # error rows shown in a report
Stats = pa.Table | pads.FileSystemDataset
"""The statistics: a table, or a dataset of Parquet files (``stats_dataset``)."""
FREED_PAGES_MS = 1
"""How long jemalloc keeps freed pages in ``memory_returned_promptly`` (0: none, but page faults and madvise
calls cost about 0.4 µs more CPU per row of the statistics, for about 30 fewer bytes per row at 10^6 rows)."""
BATCH_ROWS = 1 << 14
"""How ``digest_stats`` reads: one file at a time, in batches of at most 16Ki rows, each decoded while the one
before is digested (Arrow's dataset scanner decodes whole row groups, 64Ki rows in a finished run's files,
and reads further ahead of a slow consumer), no file's metadata kept once read."""


@contextlib.contextmanager
def memory_returned_promptly() -> Iterator[None]:
    """Within the block Arrow allocates from jemalloc, told to return freed pages to the system after
    ``FREED_PAGES_MS``, where pyarrow has jemalloc (else nothing changes): the process's resident memory then
    stays close to Arrow's own, where the default allocator (mimalloc) keeps freed pages, about as much again
    as Arrow's peak in one scan of the statistics."""
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:
        yield
        return
    pa.jemalloc_set_decay_ms(FREED_PAGES_MS)
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def stats_dataset(stats_uri: str, storage_options: dict[str, Any] | None = None) -> pads.FileSystemDataset:
    """The Parquet statistics under ``stats_uri`` as an Arrow dataset, read lazily (hidden and ``_`` files
    left out)."""
    fs, path = fsspec.core.url_to_fs(stats_uri, **(storage_options or {}))
    return pads.dataset(path, filesystem=fs, format="parquet")


@dataclass(frozen=True)
class ClassDistribution:
    """Pixels per class summed over the images segmented without error, and how many images each
    class dominates."""

    class_names: list[str]
    pixels: list[int]
    dominant_images: list[int]

    @property
    def total_pixels(self) -> int:
        return int(sum(self.pixels))


def schema_heads(schema: pa.Schema) -> dict[str, tuple[list[str], list[int]]]:
    """Every head's class names and palette from the statistics' schema metadata, the first head first."""
    metadata = schema.metadata or {}
    if b"heads" not in metadata:
        return {PRIMARY_HEAD: schema_classes(schema)}
    return {head: (about["class_names"], about["palette"]) for head, about in json.loads(metadata[b"heads"]).items()}


def schema_classes(schema: pa.Schema) -> tuple[list[str], list[int]]:
    """Class names and palette stored in the statistics' schema metadata (palette: VOC if absent)."""
    metadata = schema.metadata or {}
    if b"class_names" not in metadata:
        raise ValueError("the statistics' schema metadata has no class_names")
    names = json.loads(metadata[b"class_names"])
    palette = json.loads(metadata[b"palette"]) if b"palette" in metadata else voc_palette()
    return names, palette


@dataclass(frozen=True)
class StatsDigest:
    """The statistics in aggregate, from one scan (``digest_stats``): ``rows``; every head's class
    distribution and palette, the first head first; the first error rows (image_uri, reason); and a sample
    of ok rows spread evenly over the run (``SAMPLE_COLUMNS``, the first head's mask and class)."""

    rows: int
    heads: dict[str, tuple[ClassDistribution, list[int]]]
    errors: list[tuple[str, str]]
    sample: list[dict[str, Any]]


SAMPLE_COLUMNS = ["image_uri", "mask_uri", "width", "height", "dominant_class"]


def digest_stats(
    stats: Stats,
    *,
    sample_size: int = 0,
    error_limit: int = ERROR_ROWS,
    on_keys: Callable[[pa.ChunkedArray], None] | None = None,
) -> StatsDigest:
    """Read the statistics once, in tables of ``BATCH_ROWS`` rows (small part files gathered: memory bounded
    whatever the number of rows), and digest them: every head's ``pixel_counts`` summed and
    ``dominant_class`` counted over the ok rows, the first ``error_limit`` error rows,
    ``sample_size`` ok rows spread evenly over the rows (``EvenSample``). ``on_keys`` receives each table's
    ``key`` column, for checks made in the same pass."""
    heads = schema_heads(stats.schema)
    names = list(heads)
    per_head = {head: [head_key(head, names, c) for c in ("pixel_counts", "dominant_class")] for head in heads}
    first = [head_key(names[0], names, c) if c in ("mask_uri", "dominant_class") else c for c in SAMPLE_COLUMNS]
    columns = {"status", "error", *first, *(c for pair in per_head.values() for c in pair)}
    pixels = {head: np.zeros(len(heads[head][0]), dtype=np.int64) for head in heads}
    dominant = {head: np.zeros(len(heads[head][0]), dtype=np.int64) for head in heads}
    errors: list[tuple[str, str]] = []
    sample, rows = EvenSample(sample_size), 0
    scan = _read_ahead(_coalesced(_batches(stats, sorted(columns | ({"key"} if on_keys else set()))), BATCH_ROWS))
    for batch in scan:
        rows += batch.num_rows
        if on_keys:
            on_keys(batch["key"])
        ok = pc.fill_null(pc.equal(batch["status"], "ok"), False)
        for head, (counts_column, dominant_column) in per_head.items():
            n = len(pixels[head])
            counts = pc.drop_null(batch[counts_column].filter(ok)).cast(pa.list_(pa.int64(), n))  # one per class
            pixels[head] += pc.list_flatten(counts).to_numpy().reshape(-1, n).sum(axis=0)
            classes = pc.drop_null(batch[dominant_column].filter(ok)).to_numpy()
            dominant[head] += np.bincount(classes[classes < n], minlength=n)
        if len(errors) < error_limit:
            bad = batch.filter(pc.fill_null(pc.equal(batch["status"], "error"), False)).slice(
                0, error_limit - len(errors)
            )
            errors += zip(bad["image_uri"].to_pylist(), bad["error"].to_pylist(), strict=True)
        sample.add(batch.select(first).rename_columns(SAMPLE_COLUMNS), np.flatnonzero(ok.to_numpy()))
    return StatsDigest(
        rows=rows,
        heads={
            head: (ClassDistribution(list(classes), pixels[head].tolist(), dominant[head].tolist()), palette)
            for head, (classes, palette) in heads.items()
        },
        errors=errors,
        sample=sorted(sample.rows(), key=lambda row: row["image_uri"]),
    )


def _batches(stats: Stats, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The ``columns`` of ``stats`` in batches of at most ``BATCH_ROWS`` rows, file by file, each as the
    statistics' schema types it (a column that a file lacks is null there)."""
    schema = pa.schema([stats.schema.field(name) for name in columns])
    if isinstance(stats, pa.Table):
        yield from stats.select(columns).to_batches(max_chunksize=BATCH_ROWS)
        return
    for path in stats.files:
        with stats.filesystem.open_input_file(path) as source:
            parquet = pq.ParquetFile(source, pre_buffer=True)
            in_file = set(parquet.schema_arrow.names)
            present = [name for name in columns if name in in_file]
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=present):
                arrays = [
                    batch.column(name) if name in present else pa.nulls(batch.num_rows, schema.field(name).type)
                    for name in columns
                ]
                yield pa.RecordBatch.from_arrays(arrays, names=columns).cast(schema)


def _read_ahead(items: Iterator[Any]) -> Iterator[Any]:
    """``items``, the next one produced by a thread (Arrow decodes without the GIL) while this one is used."""
    end = object()
    with ThreadPoolExecutor(1) as thread:
        coming = thread.submit(next, items, end)
        while (item := coming.result()) is not end:
            coming = thread.submit(next, items, end)
            yield item


def _coalesced(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """``batches`` gathered into tables of at least ``rows`` rows (the last may have fewer), so that the
    work per table is not repeated for every small part file."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield pa.Table.from_batches(pending)
            pending, count = [], 0
    if pending:
        yield pa.Table.from_batches(pending)


class EvenSample:
    """``size`` rows spread evenly over a stream of any length, in one pass: rows are kept at every
    ``stride``-th eligible position, the stride doubling (every other kept row dropped) whenever more
    than ``2 * size`` would be kept."""

    def __init__(self, size: int) -> None:
        self.size, self.stride, self.seen = size, 1, 0
        self.kept: list[dict[str, Any]] = []

    def add(self, batch: pa.RecordBatch | pa.Table, eligible: np.ndarray) -> None:
        """Offer the rows ``eligible`` (indices, ascending) of ``batch``."""
        if self.size <= 0 or not len(eligible):
            return
        total = self.seen + len(eligible)
        while -(-total // self.stride) > 2 * self.size:
            self.kept, self.stride = self.kept[::2], 2 * self.stride
        first = -self.seen % self.stride  # the first position here that is a multiple of the stride
        self.kept += batch.take(pa.array(eligible[first :: self.stride])).to_pylist()
        self.seen = total

    def rows(self) -> list[dict[str, Any]]:
        """Up to ``size`` of the kept rows, evenly spaced."""
        if not self.kept:
            return []
        picks = np.unique(np.linspace(0, len(self.kept) - 1, num=min(self.size, len(self.kept))).round())
        return [self.kept[int(i)] for i in picks]
