"""One image, many actors: a tiled TIFF above ``--tile-pixels`` is segmented as windows, each a row of its own.

- Planning (driver, ``plan_tiles``): TIFF-named images are probed (header only); one to tile becomes a row per
  window of ``fcn.predictor.tile_windows`` (starts on the network's output-stride grid, the predictor's margin),
  with ``window``, ``core`` and ``tile_part`` columns. Windows whose part is already written (a run killed
  mid-image, a tile that failed before) are not redone.
- The rows flow through the same Ray Data pipeline as whole images, so every FCN actor can take a window: the
  loader reads the window (``load_windows``: ranged reads of the tiles it touches), the Segmenter runs it whole
  and keeps its core (``keep_core``), the writer stores the core's labels and partial statistics as one part
  (``store_tiles``) under ``<output>/_tiles/<name>/<fingerprint>/``, the fingerprint naming the source
  version, the model and the tiling.
- Assembly (driver, after the pipeline, ``assemble``): each image's parts are merged exactly once into its stats
  row (pixel counts summed, mean confidence weighted by pixels) and its masks, tiled TIFFs written band by band
  (``pipelines.segment.tiff.write_mask``) and put in place whole; then the parts are removed. A failed or
  missing tile makes the row an error naming the window, and its parts stay for the next run.

The stitched labels equal whole-image inference, as ``fcn.Predictor``'s own tiling does.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from fcn.heads import head_key
from fcn.registry import write_atomic
from fcn.tiling import tile_windows
from pipelines.common.decode import DecodeError
from pipelines.common.storage import with_retries
from pipelines.segment import schema as columns_schema
from pipelines.segment.config import ConfigError, SegmentConfig, flag
from pipelines.segment.keys import output_name
from pipelines.segment.model import ModelInfo
from pipelines.segment.tiff import TiffLayout, WindowReader, probe_tiled, put_file_atomic, write_mask

logger = logging.getLogger("pipelines.segment")

TILES_DIR = "_tiles"
STATUS_TILE = "tile"
WINDOWS_PER_CALL = 2
"""Most rows per FCN actor (and writer) call in a run with tiled images (``--batch-size`` if fewer): a window of
2048 px is 12 MB of pixels, and its confidence map 16 MB more until its core is kept."""
"""The ``status`` the writer reports for a tile row (its image's row comes from ``assemble``)."""
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
    if set(model.modalities) != {"rgb"}:
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
        done = _written_parts(fs, fsspec.core.url_to_fs(parts, **config.storage_options)[1])
        for window in image.windows:
            if _part_name(window) + PART_SUFFIX not in done:
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


def _part_name(window: tuple[int, ...] | list[int]) -> str:
    y0, y1, x0, x1 = window[:4]
    return f"y{y0}-{y1}_x{x0}-{x1}"


def _written_parts(fs: fsspec.AbstractFileSystem, path: str) -> set[str]:
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
        base = f"{row['tile_part']}/{_part_name(row['window'])}"
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


@dataclass
class Assembled:
    """What ``assemble`` did for one image: its stats row's status, error, and the FCN actors that did its tiles."""

    image_uri: str
    key: str
    error: str | None
    tiles: int
    fcn_actors: int


def assemble(
    images: list[TiledImage],
    run: Any,
    *,
    output: str,
    storage_options: dict[str, Any],
    run_id: str,
    model: ModelInfo,
    retries: int,
) -> list[Assembled]:
    """Merge each tiled image's parts into its stats row and masks (see the module docstring), one image at a time,
    each row in a stats part file of its own written once the masks are in place; counts them into ``run``
    (``pipelines.segment.pipeline.RayRun``)."""
    schema = columns_schema.stats_schema(
        model.class_names, model.palette, {"uri": model.uri, "version": model.version, "arch": model.arch}, model.heads
    )
    assembled = []
    for image in images:
        done = _assemble_one(image, output, storage_options, run_id, model, schema, retries)
        run.add_image(done.image_uri, done.error)
        logger.info(
            "%s: %d tiles by %d FCN actor(s): %s", done.image_uri, done.tiles, done.fcn_actors, done.error or "ok"
        )
        assembled.append(done)
    return assembled


def _assemble_one(
    image: TiledImage,
    output: str,
    storage_options: dict[str, Any],
    run_id: str,
    model: ModelInfo,
    schema: pa.Schema,
    retries: int,
) -> Assembled:
    from pipelines.segment.write import STATS_DIR, class_statistics, mask_folder, output_path, write_part

    start = time.perf_counter()
    fs, parts_path = fsspec.core.url_to_fs(image.parts, **storage_options)
    written = _written_parts(fs, parts_path)
    heads = list(model.heads)
    palettes = {head: model.heads[head]["palette"] for head in heads}
    source = image.source
    error = None
    for window in image.windows:
        name = _part_name(window)
        if name + PART_SUFFIX in written:
            continue
        if name + ERROR_SUFFIX in written:
            reason = fs.cat_file(f"{parts_path}/{name}{ERROR_SUFFIX}").decode()
        else:
            reason = "its part was not written"
        error = f"tile: {describe_window(window)}: {reason}"
        break
    totals: dict[str, Any] = {}
    actors: set[str] = set()
    masks: dict[str, str | None] = dict.fromkeys(heads)
    if error is None:
        try:
            out_fs, root = fsspec.core.url_to_fs(output, **storage_options)
            with WindowReader(source["image_uri"], storage_options) as reader:
                geotags = reader.geotags
            for head in heads:
                mask_path = output_path(root, mask_folder(head, heads), source["key"], ".tif")
                with tempfile.TemporaryDirectory(prefix="fcn-mask-") as folder:
                    local = os.path.join(folder, "mask.tif")
                    strips = _strips(fs, parts_path, image, head, totals, actors)
                    write_mask(
                        local,
                        image.layout.height,
                        image.layout.width,
                        strips,
                        palette=palettes[head],
                        extratags=geotags,
                    )
                    with_retries(
                        lambda local=local, mask_path=mask_path: put_file_atomic(out_fs, local, mask_path), retries
                    )
                masks[head] = out_fs.unstrip_protocol(mask_path)
        except Exception as failure:
            error = f"assemble: {type(failure).__name__}: {failure}"
            masks = dict.fromkeys(heads)
    ok = error is None
    pixels = image.layout.pixels
    columns: dict[str, list[Any]] = {name: [source.get(name)] for name in columns_schema.SOURCE_SCHEMA.names}
    ms = totals.get("ms", np.zeros(3))
    columns.update(
        {
            "width": [image.layout.width],
            "height": [image.layout.height],
            "model_id": [model.uri],
            "model_version": [model.version],
            "read_ms": [float(ms[0]) if ok else None],
            "decode_ms": [float(ms[1]) if ok else None],
            "inference_ms": [float(ms[2]) if ok else None],
            "write_ms": [(time.perf_counter() - start) * 1000 if ok else None],
            "status": [columns_schema.STATUS_OK if ok else columns_schema.STATUS_ERROR],
            "error": [error],
            "run_id": [run_id],
            "processed_at": [datetime.now(UTC)],
        }
    )
    for head in heads:
        column = functools.partial(head_key, head, heads)
        counts = totals.get(f"pixel_counts/{head}") if ok else None
        columns[column("mask_uri")] = [masks[head]]
        columns[column("pixel_counts")] = [None if counts is None else counts.tolist()]
        columns[column("mean_confidence")] = [float(totals[f"confidence_sum/{head}"]) / pixels if ok else None]
        class_names = model.heads[head]["class_names"]
        columns.update(class_statistics(columns[column("pixel_counts")], [ok], class_names, column))
    table = pa.Table.from_arrays(
        [pa.array(columns.get(name, [None]), field.type) for name, field in zip(schema.names, schema)], schema=schema
    )
    write_part(f"{output.rstrip('/')}/{STATS_DIR}", table, run_id, storage_options, retries)
    if ok:
        fs.rm(parts_path.rsplit("/", 1)[0], recursive=True)  # every version's parts of this image
    return Assembled(source["image_uri"], source["key"], error, len(image.windows), len(actors))


def _strips(
    fs: fsspec.AbstractFileSystem,
    parts_path: str,
    image: TiledImage,
    head: str,
    totals: dict[str, Any],
    actors: set[str],
) -> Iterator[np.ndarray]:
    """The image's labels of ``head`` as full-width strips, one per row of windows (their cores side by side);
    on the way, sums every head's statistics into ``totals`` (on the first head's pass) and notes the actors."""
    rows: dict[tuple[int, int], list[tuple[int, ...]]] = {}
    for window in image.windows:
        rows.setdefault((window[4], window[5]), []).append(window)

    def load(window: tuple[int, ...]) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(fs.cat_file(f"{parts_path}/{_part_name(window)}{PART_SUFFIX}"))) as part:
            return {name: part[name] for name in part.files}

    first_pass = not totals
    with ThreadPoolExecutor(PART_READ_THREADS, thread_name_prefix="parts") as pool:
        for windows in rows.values():
            parts = list(pool.map(load, sorted(windows, key=lambda w: w[6])))
            if first_pass:
                for part in parts:
                    for name, value in part.items():
                        if name.startswith(("pixel_counts/", "confidence_sum/")) or name == "ms":
                            totals[name] = totals[name] + value if name in totals else value
                    actors.add(str(part["fcn_actor"]))
            yield np.concatenate([part[f"labels/{head}"] for part in parts], axis=1)
