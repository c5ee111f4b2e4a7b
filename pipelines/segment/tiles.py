"""One image, many actors: a tiled TIFF above ``--tile-pixels`` is segmented as windows, each a row of its own.

- Planning (driver, ``plan_tiles``): TIFF-named images are probed (header only); one to tile becomes a row per
  window of ``fcn.tiling.tile_windows`` (starts on the network's output-stride grid, the predictor's margin),
  with ``window``, ``core`` and ``tile_part`` columns. Windows whose part is already written (a run killed
  mid-image, a tile that failed before) are not redone.
- The rows flow through the same Ray Data pipeline as whole images, so every FCN actor can take a window: the
  loader reads the window (``load_windows``: ranged reads of the tiles it touches), the Segmenter runs it whole
  and keeps its core (``keep_core``), the writer stores the core's labels and partial statistics as one part
  (``store_tiles``) under ``<output>/_tiles/<name>/<fingerprint>/``, the fingerprint naming the source
  version, the model and the tiling.
- Assembly (driver, after the pipeline): ``pipelines.segment.assemble`` merges each image's parts exactly once
  into its stats row and its masks.

The stitched labels equal whole-image inference, as ``fcn.Predictor``'s own tiling does.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fcn.heads import head_key
from fcn.registry import write_atomic
from fcn.tiling import tile_windows
from pipelines.common.decode import DecodeError
from pipelines.common.storage import with_retries
from pipelines.segment import schema as columns_schema
from pipelines.segment.config import ConfigError, SegmentConfig, flag
from pipelines.segment.keys import output_name
from pipelines.segment.model import ModelInfo
from pipelines.segment.tiff import TiffLayout, WindowReader, probe_tiled

logger = logging.getLogger("pipelines.segment")

TILES_DIR = "_tiles"
STATUS_TILE = "tile"
"""The ``status`` the writer reports for a tile row (its image's row comes from ``assemble``)."""
WINDOWS_PER_CALL = 2
"""Most rows per FCN actor (and writer) call in a run with tiled images (``--batch-size`` if fewer): a window of
2048 px is 12 MB of pixels, and its confidence map 16 MB more until its core is kept."""
PART_SUFFIX = ".npz"
ERROR_SUFFIX = ".error"
PROBE_THREADS = 16
PART_READ_THREADS = 8
TILE_COLUMNS = ("window", "core", "tile_part")


@dataclass(frozen=True)
class TiledImage:
    """An image segmented as windows: its listing row, its size and tiles, and where its tile parts go."""

    source: dict[str, Any]
    layout: TiffLayout
    windows: list[tuple[int, ...]]
    parts: str  # URI of the folder of this image's parts (this source version, model and tiling)


def plan_tiles(
    todo: pa.Table, config: SegmentConfig, output: str, model: ModelInfo
) -> tuple[pa.Table, list[TiledImage]]:
    """The pipeline's work: the rows of ``todo`` segmented whole, then one row per window still to do of each
    tiled TIFF of more than ``--tile-pixels`` (or ``--max-image-pixels``, if fewer); and those images."""
    if set(model.modalities) != {"rgb"}:  # depth maps are PNGs, read whole: so are the images (load refuses huge ones)
        return _with_tile_columns(todo, [None] * todo.num_rows), []
    tile_size = config.tile_size // model.output_stride * model.output_stride
    if tile_size <= 2 * model.tile_margin:
        raise ConfigError(
            flag("tile_size"),
            f"must be at least {2 * model.tile_margin + model.output_stride} for {model.label} (twice its tile margin "
            f"of {model.tile_margin} px plus its stride), got {config.tile_size}",
        )
    threshold = min(config.tile_pixels, config.max_image_pixels)
    uris = todo["image_uri"].to_pylist()
    with ThreadPoolExecutor(PROBE_THREADS, thread_name_prefix="probe") as pool:
        layouts = list(pool.map(lambda uri: _probe(uri, config.storage_options), uris))
    whole = [i for i, layout in enumerate(layouts) if layout is None or layout.pixels <= threshold]
    tiled = [i for i, layout in enumerate(layouts) if layout is not None and layout.pixels > threshold]
    images, rows = [], []
    fs, _ = fsspec.core.url_to_fs(output, **config.storage_options)
    for i in tiled:
        source, layout = todo.slice(i, 1).to_pylist()[0], layouts[i]
        parts = f"{output}/{TILES_DIR}/{output_name(source['key'])}/{_fingerprint(source, model, tile_size)}"
        image = TiledImage(
            source, layout, tile_windows(layout.height, layout.width, tile_size, model.tile_margin), parts
        )
        images.append(image)
        done = written_parts(fs, fsspec.core.url_to_fs(parts, **config.storage_options)[1])
        for window in image.windows:
            if part_name(window) + PART_SUFFIX not in done:
                rows.append({**source, "window": list(window[:4]), "core": list(window[4:]), "tile_part": parts})
    whole_rows = todo.take(pa.array(whole, pa.int64()))
    work = _with_tile_columns(whole_rows, [None] * whole_rows.num_rows)
    if rows:
        tile_rows = pa.Table.from_pylist(rows, schema=work.schema)
        work = pa.concat_tables([work, tile_rows])
    for image in images:
        logger.info(
            "%s: %dx%d tiled TIFF, %d windows of %d px (%d to do)",
            image.source["image_uri"],
            image.layout.width,
            image.layout.height,
            len(image.windows),
            tile_size,
            sum(1 for row in rows if row["tile_part"] == image.parts),
        )
    return work, images


def window_rows(work: pa.Table) -> list[bool]:
    """Which rows of ``work`` (``plan_tiles``) are windows of tiled images."""
    if "tile_part" not in work.column_names:
        return [False] * work.num_rows
    return work["tile_part"].is_valid().to_pylist()


def rows_per_call(work: pa.Table, batch_size: int, actors: int) -> int:
    """Rows per FCN actor (and writer) call for ``work`` (``plan_tiles``): ``batch_size`` without windows; with
    windows at most ``WINDOWS_PER_CALL``, and few enough that each image of at least ``actors`` windows makes a call
    for every actor. Each window is a block of its own (``pipelines.segment.pipeline.plan_blocks``), so a call holds
    at most this many windows: Ray Data bundles blocks up to the batch size, never splitting one."""
    parts = work["tile_part"].drop_null() if "tile_part" in work.column_names else pa.array([], pa.string())
    if not len(parts):
        return batch_size
    windows = pc.value_counts(parts).field("counts").to_pylist()
    spread = min((count // actors for count in windows if count >= actors), default=WINDOWS_PER_CALL)
    return max(1, min(batch_size, WINDOWS_PER_CALL, spread))


def _probe(uri: str, storage_options: dict[str, Any]) -> TiffLayout | None:
    """``probe_tiled``, None on any failure (the loader then reports it for the image)."""
    try:
        return probe_tiled(uri, storage_options)
    except Exception:
        return None


def _with_tile_columns(table: pa.Table, values: list[Any]) -> pa.Table:
    for name in TILE_COLUMNS:
        table = table.append_column(name, pa.array(values, columns_schema.column_type(name, columns_schema.LISTING)))
    return table


def _fingerprint(source: dict[str, Any], model: ModelInfo, tile_size: int) -> str:
    """A short hash of what a tile part depends on: the source version, the model and the tiling."""
    what = [source["source_size"], source["source_etag"], str(source["source_mtime"]), model.uri, model.version]
    return hashlib.sha256(json.dumps([*what, tile_size, model.tile_margin]).encode()).hexdigest()[:16]


def part_name(window: tuple[int, ...] | list[int]) -> str:
    """The name of a window's part file (without suffix): its rows and columns."""
    y0, y1, x0, x1 = window[:4]
    return f"y{y0}-{y1}_x{x0}-{x1}"


def written_parts(fs: fsspec.AbstractFileSystem, path: str) -> set[str]:
    """The file names in the folder ``path`` of ``fs`` (none when it does not exist)."""
    fs.invalidate_cache()  # listings cached before the parts were written (by this process) are stale
    try:
        return {name.rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)}
    except FileNotFoundError:
        return set()


def describe_window(window: list[int] | tuple[int, ...]) -> str:
    """``rows y0:y1, columns x0:x1`` of a window, for error messages."""
    y0, y1, x0, x1 = window[:4]
    return f"window rows {y0}:{y1}, columns {x0}:{x1}"


def load_windows(
    uris: list[str], windows: list[list[int] | None], errors: list[str | None], *, storage_options: dict[str, Any]
) -> dict[int, tuple[np.ndarray, float]]:
    """Read the windows of the rows that have one and no error yet: {row: (``HxWx3`` RGB, read ms)}; a failure
    fills the row's entry of ``errors`` (``read:``/``decode:``; its image's row will name the window)."""
    loaded: dict[int, tuple[np.ndarray, float]] = {}
    readers: dict[str, WindowReader] = {}
    try:
        for i, window in enumerate(windows):
            if window is None or errors[i] is not None:
                continue
            start = time.perf_counter()
            try:
                if uris[i] not in readers:
                    readers[uris[i]] = WindowReader(uris[i], storage_options)
                loaded[i] = (readers[uris[i]].read(*window), (time.perf_counter() - start) * 1000)
            except DecodeError as error:
                errors[i] = f"decode: {error}"
            except Exception as error:
                errors[i] = f"read: {type(error).__name__}: {error}"
    finally:
        for reader in readers.values():
            reader.close()
    return loaded


def keep_core(parts: list[Any], window: list[int], core: list[int]) -> tuple[int, int]:
    """Crop each head's prediction of a window (``labels``, ``confidence``) to the window's core, in place, and
    set its ``pixel_counts`` and ``mean_confidence`` to the core's; returns the core's (height, width)."""
    y0, _, x0, _ = window
    cy0, cy1, cx0, cx1 = core
    rows, columns = slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0)
    for part in parts:
        classes = len(part.pixel_counts)
        part.labels = np.ascontiguousarray(part.labels[rows, columns])
        part.pixel_counts = np.bincount(part.labels.ravel(), minlength=classes).astype(np.int64)
        part.mean_confidence = float(part.confidence[rows, columns].mean(dtype=np.float64))
        part.confidence = None
    return cy1 - cy0, cx1 - cx0


def store_tiles(batch: pa.Table, *, heads: list[str], storage_options: dict[str, Any], retries: int) -> pa.Table:
    """Write each tile row's part (``<tile_part>/<window>.npz``: every head's core labels, pixel counts and
    confidence sum, the row's timings and FCN actor) or, for a failed tile, its reason (``<window>.error``), each
    whole, retried ``retries`` times; returns ``image_uri``, ``status`` (``STATUS_TILE``) and ``error`` (why the
    part could not be written: its image's row will name the window) per row."""
    label_columns = {head: head_key(head, heads, "labels") for head in heads}
    labels = {head: columns_schema.binary_views(batch[column]) for head, column in label_columns.items()}
    heavy = [c for c in batch.column_names if c in ("pixels", *label_columns.values())]
    errors = []
    for i, row in enumerate(batch.drop_columns(heavy).to_pylist()):
        base = f"{row['tile_part']}/{part_name(row['window'])}"
        fs, path = fsspec.core.url_to_fs(base, **storage_options)
        if row["error"] is not None:
            data, suffix = row["error"].encode(), ERROR_SUFFIX
        else:
            data, suffix = _part_bytes(row, {head: labels[head][i] for head in heads}, heads), PART_SUFFIX
        try:
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with_retries(lambda path=path + suffix, data=data: write_atomic(fs, path, data), retries)
            errors.append(None)
        except Exception as error:
            errors.append(f"write: tile part {base}: {type(error).__name__}: {error}")
    statuses = pa.array([STATUS_TILE] * batch.num_rows, pa.string())
    return pa.table({"image_uri": batch["image_uri"], "status": statuses, "error": pa.array(errors, pa.string())})


def _part_bytes(row: dict[str, Any], labels: dict[str, memoryview], heads: list[str]) -> bytes:
    """The ``.npz`` of a segmented tile row: ``labels/<head>``, ``pixel_counts/<head>``, ``confidence_sum/<head>``,
    ``ms`` (read, decode, inference) and ``fcn_actor``."""
    height, width = row["height"], row["width"]
    arrays: dict[str, Any] = {
        "ms": np.array([row.get(f"{stage}_ms") or 0.0 for stage in ("read", "decode", "inference")]),
        "fcn_actor": np.array(row.get("fcn_actor") or ""),
    }
    for head in heads:
        buffer = labels[head]
        dtype = np.uint8 if len(buffer) == height * width else np.int32
        arrays[f"labels/{head}"] = np.frombuffer(buffer, dtype).reshape(height, width)
        arrays[f"pixel_counts/{head}"] = np.asarray(row[head_key(head, heads, "pixel_counts")])
        mean = row[head_key(head, heads, "mean_confidence")]
        arrays[f"confidence_sum/{head}"] = np.float64(mean * height * width)
    buffer_out = io.BytesIO()
    np.savez_compressed(buffer_out, **arrays)
    return buffer_out.getvalue()
