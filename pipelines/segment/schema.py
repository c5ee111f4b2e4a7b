"""Every column of the segmentation job, declared once: name, Arrow type, description, whether each head
of a multi-head model has its own, and which stages write it.

The stats table's Parquet schema (``stats_schema``), the columns a listing yields
(``SOURCE_SCHEMA``), the types of the columns the stages add, and the columns the Segmenter consumes
all follow from ``COLUMNS``. A name that is not declared here is an error naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from fcn.heads import PRIMARY_HEAD, head_key, split_heads

LISTING = "listing"
LOAD = "load"
SEGMENT = "segment"
STORE = "store"
STAGES = (LISTING, LOAD, SEGMENT, STORE)
"""The stages in the order a row passes them: the listing, ``load_images``, the ``Segmenter``, ``store_results``."""


@dataclass(frozen=True)
class Column:
    """One column: ``stages`` write it (the first adds it, the others replace it); a ``per_head`` column is
    repeated as ``<head>_<name>`` for each further head; a column not ``stored`` only travels from the stage
    that writes it to the next one, which consumes it."""

    name: str
    type: pa.DataType
    description: str
    stages: tuple[str, ...]
    per_head: bool = False
    stored: bool = True


COLUMNS: tuple[Column, ...] = (
    Column("image_uri", pa.string(), "full URI of the source image", (LISTING,)),
    Column("key", pa.string(), "path of the image relative to the input prefix (unique per output)", (LISTING,)),
    Column("source_size", pa.int64(), "size of the source file in bytes at listing time", (LISTING,)),
    Column(
        "source_etag", pa.string(), "object-store ETag at listing time (null on filesystems without one)", (LISTING,)
    ),
    Column("source_mtime", pa.timestamp("us", tz="UTC"), "modification time at listing time", (LISTING,)),
    Column("width", pa.int32(), "width of the displayed (EXIF-rotated) image = width of the mask", (LOAD, SEGMENT)),
    Column("height", pa.int32(), "height of the displayed image = height of the mask", (LOAD, SEGMENT)),
    Column("model_id", pa.string(), "URI of the checkpoint file used (registry champions are resolved)", (STORE,)),
    Column("model_version", pa.string(), "registry version, else the checkpoint's etag/mtime fingerprint", (STORE,)),
    Column(
        "pixel_counts",
        pa.list_(pa.int64()),
        "pixels per class; index = class id; sums to width*height",
        (SEGMENT,),
        per_head=True,
    ),
    Column("class_fractions", pa.list_(pa.float64()), "pixel_counts / (width*height)", (STORE,), per_head=True),
    Column("dominant_class", pa.int32(), "class id with the most pixels", (STORE,), per_head=True),
    Column("dominant_class_name", pa.string(), "name of dominant_class", (STORE,), per_head=True),
    Column(
        "mean_confidence",
        pa.float64(),
        "mean over pixels of the winning class's softmax probability",
        (SEGMENT,),
        per_head=True,
    ),
    Column("mask_uri", pa.string(), "indexed PNG mask with the checkpoint's palette", (STORE,), per_head=True),
    Column("overlay_uri", pa.string(), "colour overlay JPEG (only with --overlays)", (STORE,)),
    Column("read_ms", pa.float64(), "time to fetch the source bytes", (LOAD,)),
    Column("decode_ms", pa.float64(), "time to decode and orient the image", (LOAD, SEGMENT)),
    Column("inference_ms", pa.float64(), "time in the network (whole image, tiled above the pixel budget)", (SEGMENT,)),
    Column("write_ms", pa.float64(), "time to encode and write the mask (and overlay)", (STORE,)),
    Column("status", pa.string(), "'ok' or 'error'", (STORE,)),
    Column(
        "error",
        pa.string(),
        "reason, prefixed by the stage (read/decode/inference/encode/write), for error rows",
        (LOAD, SEGMENT, STORE),
    ),
    Column("run_id", pa.string(), "the run that produced this row", (STORE,)),
    Column("processed_at", pa.timestamp("us", tz="UTC"), "when the row was produced", (STORE,)),
    # between stages only
    Column(
        "pixels", pa.large_binary(), "raw HxWx3 RGB (to the overlays with --overlays)", (LOAD, SEGMENT), stored=False
    ),
    Column("jpeg", pa.large_binary(), "encoded JPEG, left for the FCN actor's device to decode", (LOAD,), stored=False),
    Column("orientation", pa.int8(), "EXIF orientation of jpeg", (LOAD,), stored=False),
    Column("depth", pa.large_binary(), "raw HxW float32 metres", (LOAD,), stored=False),
    Column("hha", pa.large_binary(), "raw HxWx3 HHA", (LOAD,), stored=False),
    Column(
        "labels",
        pa.large_binary(),
        "raw HxW label map (uint8, or int32 above 256 classes)",
        (SEGMENT,),
        per_head=True,
        stored=False,
    ),
    # the windows of a tiled image (pipelines.segment.tiles): null on the rows of whole images
    Column("window", pa.list_(pa.int32()), "input rows y0, y1 and columns x0, x1 of a tile", (LISTING,), stored=False),
    Column(
        "core",
        pa.list_(pa.int32()),
        "rows and columns of the image that a tile's labels cover",
        (LISTING,),
        stored=False,
    ),
    Column("tile_part", pa.string(), "folder of the tile parts of the tile's image", (LISTING,), stored=False),
    Column(
        "fcn_actor", pa.string(), "the FCN actor process (host:pid) that segmented the row", (SEGMENT,), stored=False
    ),
)
_BY_NAME = {column.name: column for column in COLUMNS}
STORED = tuple(column for column in COLUMNS if column.stored)
"""The stats table's columns for the first head, in Parquet order."""
SOURCE_SCHEMA = pa.schema([(column.name, column.type) for column in STORED if column.stages[0] == LISTING])
"""What a listing knows of each image (``image_uri``, ``key``, ``source_size``, ``source_etag``,
``source_mtime``): the input of a run, and of its resume decision."""


def parquet_fields(heads: list[str]) -> list[pa.Field]:
    """The stats table's fields for a model of ``heads``, each with its description in its metadata:
    ``STORED`` (the primary head's per-head columns among them), then each further head's per-head
    columns (``fcn.heads.head_key``: its mask URI first, then its statistics)."""
    per_head = sorted((c for c in STORED if c.per_head), key=lambda c: not c.name.endswith("_uri"))
    _, further = split_heads(heads)
    return [pa.field(c.name, c.type, metadata={"description": c.description}) for c in STORED] + [
        pa.field(head_key(head, heads, c.name), c.type, metadata={"description": f"{head} head: {c.description}"})
        for head in further
        for c in per_head
    ]


def column_type(name: str, stage: str) -> pa.DataType:
    """The Arrow type of column ``name`` (a declared column, or ``<head>_<column>`` of a per-head one) as
    ``stage`` writes it; ValueError naming the column when it is not declared or not written by ``stage``."""
    column = _BY_NAME.get(name) or max(
        (c for c in COLUMNS if c.per_head and name.endswith(f"_{c.name}")), key=lambda c: len(c.name), default=None
    )
    if column is None:
        raise ValueError(f"column {name!r} is not declared in pipelines/segment/schema.py (COLUMNS); declare it there")
    if stage not in column.stages:
        raise ValueError(f"column {name!r} is written by {', '.join(column.stages)}, not by the {stage} stage")
    return column.type


def replaced_by(stage: str) -> frozenset[str]:
    """The columns that ``stage`` drops from its input: those it writes anew, and those that only travel
    to it (not ``stored``) from the stage before."""
    before = STAGES[STAGES.index(stage) - 1]
    return frozenset(c.name for c in COLUMNS if stage in c.stages or (not c.stored and c.stages[-1] == before))


STATUS_OK = "ok"
STATUS_ERROR = "error"
STATS_COLUMNS = [column.name for column in STORED]
"""The names of ``STORED``: the stats table of a one-head model, in Parquet order."""


def stats_schema(
    class_names: list[str], palette: list[int], model: dict[str, Any], heads: dict[str, dict[str, list]] | None = None
) -> pa.Schema:
    """The stats schema (``parquet_fields``) for the model of ``heads`` (default: one head of ``class_names``);
    class names, palette, every head ({head: {"class_names", "palette"}}) and the model description (JSON)
    are in its metadata."""
    heads = heads or {PRIMARY_HEAD: {"class_names": class_names, "palette": palette}}
    return pa.schema(
        parquet_fields(list(heads)),
        metadata={
            "class_names": json.dumps(class_names),
            "palette": json.dumps(palette),
            "heads": json.dumps(heads),
            "model": json.dumps(model),
        },
    )


def typed_arrays(columns: dict[str, list[Any]], stage: str) -> dict[str, pa.Array]:
    """``columns`` (name: values) as Arrow arrays of their declared types (``COLUMNS``);
    ValueError naming a column that is not declared, or not declared as written by ``stage``."""
    arrays = {}
    for name, values in columns.items():
        kind = column_type(name, stage)
        arrays[name] = large_binary_array(values) if pa.types.is_large_binary(kind) else pa.array(values, kind)
    return arrays


def large_binary_array(values: list[Any]) -> pa.Array:
    """Bytes-like values (bytes, memoryviews of arrays; None for null) as a ``large_binary`` array, copied once.
    ``pa.array`` is not used for them: it never releases a memoryview's exporter (pyarrow 26), which kept every
    image a loader decoded, and every label map an FCN actor made, alive in that worker for good."""
    views = [None if value is None else np.frombuffer(value, np.uint8) for value in values]
    present = [view for view in views if view is not None]
    offsets = np.zeros(len(views) + 1, np.int64)
    np.cumsum([0 if view is None else len(view) for view in views], out=offsets[1:])
    data = np.concatenate(present) if present else np.empty(0, np.uint8)
    nulls = len(views) - len(present)
    validity = pa.array([view is not None for view in views]).buffers()[1] if nulls else None
    return pa.Array.from_buffers(
        pa.large_binary(), len(views), [validity, pa.py_buffer(offsets), pa.py_buffer(data)], null_count=nulls
    )


def with_columns(table: pa.Table, columns: dict[str, list[Any]], stage: str) -> pa.Table:
    """``table`` with ``columns`` (name: values) that ``stage`` writes appended in order (see ``typed_arrays``)."""
    for name, array in typed_arrays(columns, stage).items():
        table = table.append_column(name, array)
    return table


def binary_views(column: pa.ChunkedArray) -> list[memoryview | None]:
    """The values of a binary column as zero-copy memoryviews (None for nulls)."""
    views: list[memoryview | None] = []
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        bounds = np.frombuffer(offsets, np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        data_view = memoryview(data) if data is not None else memoryview(b"")
        for j, valid in enumerate(chunk.is_valid().to_pylist()):
            views.append(data_view[bounds[j] : bounds[j + 1]] if valid else None)
    return views
