"""Resolve a segmentation input (prefix, glob, manifest or inventory file on any fsspec filesystem)
to an Arrow table of images (``pipelines.segment.schema.SOURCE_SCHEMA``), built in record batches.

Each image gets a *key*: its path relative to the input prefix. Keys name the outputs
(``masks/<key>.png``, with ``%?#`` escaped: ``pipelines.segment.keys.output_name``) and identify an image across runs,
together with its size and etag/mtime.
A prefix is listed page by page (``list_pages``: S3 LIST pages, else a directory at a time) into
record batches, never as one listing of every key.
Big buckets are listed from an inventory (a Parquet or CSV file of object keys, such as an S3
Inventory report) rather than by LIST calls: it is read in batches and filtered with Arrow.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from fsspec.utils import glob_translate
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipelines.segment.keys import HIDDEN_SEGMENT, is_hidden_key, relative_key
from pipelines.segment.schema import SOURCE_SCHEMA

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
GLOB_CHARS = "*?["
INVENTORY_FORMATS = {".parquet": "parquet", ".csv": "csv"}
"""Input files read as inventories, by extension (``.csv.gz`` too)."""
INVENTORY_COLUMNS = ("bucket", "key", "size", "last_modified_date", "e_tag")
"""The columns an inventory may have (S3 Inventory's names); only ``key`` is required."""
BATCH_ROWS = 1 << 16
_STAT_THREADS = 32


class InputError(ValueError):
    """The input URI does not name any readable images."""


@dataclass(frozen=True)
class Listing:
    """The images of one input: ``prefix`` (URI all keys are relative to), ``kind`` and the images.

    ``images`` has the columns of ``SOURCE_SCHEMA``: ``image_uri``, ``key``, ``source_size``,
    ``source_etag`` and ``source_mtime`` (null where unknown; size is null for a missing manifest entry).
    """

    prefix: str
    kind: str  # "prefix" | "glob" | "manifest" | "file" | "inventory"
    images: pa.Table
    ignored: int  # files under a prefix (or in an inventory) that are not images by extension


def list_images(
    uri: str, storage_options: dict[str, Any], *, exclude: str | None = None, page_rows: int = BATCH_ROWS
) -> Listing:
    """List the images named by ``uri``; ``exclude`` is a URI prefix to leave out (e.g. the output).

    - a glob (``*``, ``?``, ``[``): every match, keys relative to the directory before the first wildcard;
    - a directory/prefix: every file below it with an image extension;
    - a file with an image extension: that one image;
    - a ``.parquet``, ``.csv`` or ``.csv.gz`` file: an inventory (see ``INVENTORY_COLUMNS``); keys are
      the objects' keys, in the ``bucket`` column's S3 bucket or else below the inventory's folder;
    - any other file: a manifest, one URI (or path relative to the manifest) per line, ``#`` comments.
    Prefixes and globs are listed page by page (``list_pages``) into record batches of at most
    ``page_rows`` rows, sorted by URI at the end. Raises InputError naming the problem if nothing is found.
    """
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    path = path.rstrip("/")
    fs.invalidate_cache()  # listings may be cached from an earlier run in this process
    if any(c in path for c in GLOB_CHARS):
        prefix, kind, matches = _glob_root(path), "glob", re.compile(glob_translate(path)).match
        pages = ([info for info in page if matches(info["name"])] for page in list_pages(fs, prefix, page_rows))
    elif fs.isdir(path):
        prefix, kind, pages = path, "prefix", list_pages(fs, path, page_rows)
    elif fs.isfile(path):
        if _inventory_format(path):
            return _list_inventory(fs, path, exclude)
        if not _is_image(path):
            return _list_manifest(fs, path, storage_options)
        prefix, kind, pages = posixpath.dirname(path), "file", iter([[{**fs.info(path), "name": path}]])
    else:
        raise InputError(f"{uri} does not exist (not a file, folder/prefix or glob with matches)")
    excluded = fs._strip_protocol(exclude).rstrip("/") if exclude else None
    images, ignored = _Batches(page_rows), 0
    for page in pages:
        for info in page:
            p = info["name"]
            if excluded and (p == excluded or p.startswith(excluded + "/")):
                continue
            record = _record(fs, p, info, prefix)
            if is_hidden_key(record["key"]):
                continue
            if kind == "prefix" and not _is_image(p):
                ignored += 1
                continue
            images.add(record)
    table = _sorted(images.table(), "image_uri")
    if not table.num_rows:
        raise InputError(f"no images found at {uri} (image extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})")
    return Listing(prefix=fs.unstrip_protocol(prefix), kind=kind, images=table, ignored=ignored)


def list_pages(fs: fsspec.AbstractFileSystem, path: str, page_rows: int = BATCH_ROWS) -> Iterator[list[dict[str, Any]]]:
    """The files below ``path``, page by page as fsspec info dicts (``name``, ``size``, etag/mtime as the
    filesystem spells them), never one listing of the whole prefix: on S3 one ``ListObjectsV2`` page of at
    most ``page_rows`` keys at a time (every key as stored, ``..`` and empty segments included), on other
    filesystems one directory at a time (fsspec ``walk``; each directory's cached listing dropped once used)."""
    if _is_s3(fs):
        yield from _s3_pages(fs, path, page_rows)
        return
    for folder, _, files in fs.walk(path, detail=True):
        yield [info for info in files.values() if info.get("type") != "directory"]
        fs.invalidate_cache(folder)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "s3" in protocols


def _s3_pages(fs: Any, path: str, page_rows: int) -> Iterator[list[dict[str, Any]]]:
    """``list_pages`` for s3fs: ``ListObjectsV2`` through ``call_s3`` (its credentials, endpoint and
    retries), following the continuation token."""
    bucket, key, _ = fs.split_path(path)
    request = {"Bucket": bucket, "Prefix": f"{key.lstrip('/')}/" if key else "", "MaxKeys": page_rows, **fs.req_kw}
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        yield [
            {**entry, "name": f"{bucket}/{entry['Key']}", "size": entry["Size"]} for entry in page.get("Contents", [])
        ]
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _sorted(table: pa.Table, column: str) -> pa.Table:
    """``table`` sorted by ``column`` (a copy only when it is not sorted yet: S3 lists in key order)."""
    values = table[column]
    if len(values) < 2 or pc.all(pc.less_equal(values.slice(0, len(values) - 1), values.slice(1))).as_py():
        return table
    return table.sort_by(column)


class _Batches:
    """Image records gathered into Arrow record batches of ``rows`` rows (no list of dicts that grows
    with the bucket)."""

    def __init__(self, rows: int = BATCH_ROWS) -> None:
        self.rows = rows
        self.batches: list[pa.RecordBatch] = []
        self.pending: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        self.pending.append(record)
        if len(self.pending) == self.rows:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.batches.append(pa.RecordBatch.from_pylist(self.pending, schema=SOURCE_SCHEMA))
            self.pending = []

    def table(self) -> pa.Table:
        self._flush()
        return pa.Table.from_batches(self.batches, schema=SOURCE_SCHEMA)


def _inventory_format(path: str) -> str | None:
    name = path.lower().removesuffix(".gz")
    return INVENTORY_FORMATS.get(posixpath.splitext(name)[1])


def _list_inventory(fs: fsspec.AbstractFileSystem, path: str, exclude: str | None) -> Listing:
    """The image objects of an inventory file, read in batches (``INVENTORY_COLUMNS``)."""
    uri = fs.unstrip_protocol(path)
    try:
        dataset = pads.dataset(path, filesystem=PyFileSystem(FSSpecHandler(fs)), format=_inventory_format(path))
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"inventory {uri} is not readable: {error}") from None
    columns = [name for name in INVENTORY_COLUMNS if name in dataset.schema.names]
    if "key" not in columns:
        raise InputError(f"inventory {uri} has no 'key' column (it has {dataset.schema.names})")
    extensions = "|".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
    base = fs.unstrip_protocol(posixpath.dirname(path))
    excluded = exclude.rstrip("/") + "/" if exclude else None
    batches, ignored, buckets = [], 0, set()
    for batch in dataset.to_batches(columns=columns, batch_size=BATCH_ROWS):
        keys = batch["key"].cast(pa.string())
        images = pc.match_substring_regex(pc.utf8_lower(keys), rf"\.({extensions})$")
        ignored += len(keys) - pc.sum(images).as_py() if len(keys) else 0
        batch = batch.filter(pc.and_(images, pc.invert(pc.match_substring_regex(keys, HIDDEN_SEGMENT))))
        keys = batch["key"].cast(pa.string())
        if "bucket" in columns:
            buckets.update(pc.unique(batch["bucket"]).to_pylist())
            uris = pc.binary_join_element_wise("s3://", batch["bucket"].cast(pa.string()), "/", keys, "")
        else:
            uris = pc.binary_join_element_wise(base, "/", keys, "")
        if excluded:
            outside = pc.invert(pc.starts_with(uris, excluded))
            uris, batch, keys = uris.filter(outside), batch.filter(outside), keys.filter(outside)
        batches.append(
            pa.RecordBatch.from_arrays(
                [
                    uris,
                    keys,
                    batch["size"].cast(pa.int64()) if "size" in columns else pa.nulls(len(keys), pa.int64()),
                    pc.utf8_trim(batch["e_tag"].cast(pa.string()), '"')
                    if "e_tag" in columns
                    else pa.nulls(len(keys), pa.string()),
                    batch["last_modified_date"].cast(pa.timestamp("us", tz="UTC"))
                    if "last_modified_date" in columns
                    else pa.nulls(len(keys), pa.timestamp("us", tz="UTC")),
                ],
                schema=SOURCE_SCHEMA,
            )
        )
    if len(buckets) > 1:
        raise InputError(f"inventory {uri} lists {len(buckets)} buckets; segment one bucket per run")
    table = pa.Table.from_batches(batches, schema=SOURCE_SCHEMA)
    if not table.num_rows:
        raise InputError(f"inventory {uri} lists no images (image extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})")
    prefix = f"s3://{buckets.pop()}" if buckets else base
    return Listing(prefix=prefix, kind="inventory", images=table, ignored=ignored)


def _list_manifest(fs: fsspec.AbstractFileSystem, path: str, storage_options: dict[str, Any]) -> Listing:
    """A text file of image URIs; relative entries are relative to the manifest's folder."""
    text = fs.cat_file(path)
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(
            f"{fs.unstrip_protocol(path)} is neither an image nor a UTF-8 manifest of image URIs"
        ) from None
    base = posixpath.dirname(path)
    entries: dict[str, tuple[fsspec.AbstractFileSystem, str]] = {}
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if "://" in entry:
            entry_fs, entry_path = fsspec.core.url_to_fs(entry, **storage_options)
        else:
            entry_fs, entry_path = fs, posixpath.normpath(posixpath.join(base, entry))
        entries.setdefault(entry_fs.unstrip_protocol(entry_path), (entry_fs, entry_path))
    if not entries:
        raise InputError(f"manifest {fs.unstrip_protocol(path)} lists no images")
    paths = [p for _, p in entries.values()]
    prefix = (
        posixpath.commonpath([posixpath.dirname(p) for p in paths])
        if len({f.protocol for f, _ in entries.values()}) == 1
        else ""
    )

    def stat(item: tuple[fsspec.AbstractFileSystem, str]) -> dict[str, Any]:
        entry_fs, entry_path = item
        try:
            info = entry_fs.info(entry_path)
        except FileNotFoundError:
            info = {"size": None}
        return _record(entry_fs, entry_path, info, prefix)

    with ThreadPoolExecutor(_STAT_THREADS) as pool:
        records = sorted(pool.map(stat, entries.values()), key=lambda r: r["key"])
    images = pa.Table.from_pylist(records, schema=SOURCE_SCHEMA)
    return Listing(prefix=fs.unstrip_protocol(prefix) if prefix else "", kind="manifest", images=images, ignored=0)


def _record(fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any], prefix: str) -> dict[str, Any]:
    key = relative_key(path, prefix.rstrip("/")) if prefix else fs.unstrip_protocol(path).replace("://", "/", 1)
    etag = info.get("ETag") or info.get("etag")
    return {
        "image_uri": fs.unstrip_protocol(path),
        "key": key,
        "source_size": info.get("size"),
        "source_etag": str(etag).strip('"') if etag else None,
        "source_mtime": _mtime(info),
    }


def _mtime(info: dict[str, Any]) -> datetime | None:
    """The modification time from an fsspec info dict (local, S3, GCS, Azure, memory spellings)."""
    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(name)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, str):
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def _glob_root(pattern: str) -> str:
    first = min(pattern.index(c) for c in GLOB_CHARS if c in pattern)
    return posixpath.dirname(pattern[:first])


def _is_image(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS
