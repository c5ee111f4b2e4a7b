"""Assembly of tiled images (driver, after the pipeline): each image's tile parts (written by
``pipelines.segment.tiles.store_tiles``) are merged exactly once into its stats row (pixel counts summed,
mean confidence weighted by pixels) and its masks, tiled TIFFs written band by band
(``pipelines.segment.mask_tiff.write_mask``) and put in place whole, the first head's after a preview of the source
(and with ``--overlays`` its overlay) at the scale of the mask's overview (``pipelines.segment.preview``); then the
parts are removed. A failed or missing tile makes the row an error naming the window, and its parts stay for the
next run.
"""

from __future__ import annotations

import functools
import io
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

from fcn.heads import head_key, split_heads
from pipelines.common.storage import with_retries
from pipelines.segment import schema as columns_schema
from pipelines.segment.mask_tiff import put_file_atomic, write_mask
from pipelines.segment.model import ModelInfo
from pipelines.segment.preview import encode_previews, preview_uri
from pipelines.segment.tiff import WindowReader
from pipelines.segment.tiles import (
    ERROR_SUFFIX,
    PART_READ_THREADS,
    PART_SUFFIX,
    TiledImage,
    describe_window,
    part_name,
    written_parts,
)

logger = logging.getLogger("pipelines.segment")


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
    overlays: bool,
) -> list[Assembled]:
    """Merge each tiled image's parts into its stats row and masks (see the module docstring), one image at a time,
    each row in a stats part file of its own written once the masks are in place; counts them into ``run``
    (``pipelines.segment.pipeline.RayRun``). Beside the first head's mask, a preview of the source at the scale of
    the mask's overview, and with ``overlays`` its overlay (``pipelines.segment.preview``)."""
    schema = columns_schema.stats_schema(
        model.class_names, model.palette, {"uri": model.uri, "version": model.version, "arch": model.arch}, model.heads
    )
    assembled = []
    for image in images:
        done = _assemble_one(image, output, storage_options, run_id, model, schema, retries, overlays)
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
    overlays: bool,
) -> Assembled:
    from pipelines.segment.write import OVERLAYS_DIR, STATS_DIR, class_statistics, mask_folder, output_path, write_part

    start = time.perf_counter()
    fs, parts_path = fsspec.core.url_to_fs(image.parts, **storage_options)
    written = written_parts(fs, parts_path)
    heads = list(model.heads)
    palettes = {head: model.heads[head]["palette"] for head in heads}
    source = image.source
    error = None
    for window in image.windows:
        name = part_name(window)
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
    overlay = None
    if error is None:
        try:
            out_fs, root = fsspec.core.url_to_fs(output, **storage_options)
            with WindowReader(source["image_uri"], storage_options) as reader:
                geotags = reader.geotags
            overlay = (
                out_fs.unstrip_protocol(output_path(root, OVERLAYS_DIR, source["key"], ".jpg")) if overlays else None
            )
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
                    if head == split_heads(heads)[0]:  # before the mask is in place: a mask has its preview
                        mask_uri = out_fs.unstrip_protocol(mask_path)
                        _put_previews(
                            source["image_uri"], local, mask_uri, overlay, model.palette, storage_options, retries
                        )
                    with_retries(
                        lambda local=local, mask_path=mask_path: put_file_atomic(out_fs, local, mask_path), retries
                    )
                masks[head] = out_fs.unstrip_protocol(mask_path)
        except Exception as failure:
            error = f"assemble: {type(failure).__name__}: {failure}"
            masks, overlay = dict.fromkeys(heads), None
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
            "overlay_uri": [overlay],
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


def _put_previews(
    image_uri: str,
    local_mask: str,
    mask_uri: str,
    overlay_uri: str | None,
    palette: list[int],
    storage_options: dict[str, Any],
    retries: int,
) -> None:
    """Write the source preview beside ``mask_uri`` (``preview_uri``) and, given ``overlay_uri``, the overlay there,
    both from the image's local mask (``encode_previews``); OSError naming the files that could not be written."""
    from pipelines.segment.write import put_files

    preview, overlay = encode_previews(
        image_uri, local_mask, palette, overlay=overlay_uri is not None, storage_options=storage_options
    )
    files = {preview_uri(mask_uri): preview} | ({overlay_uri: overlay} if overlay_uri else {})
    failures = put_files(files, storage_options, retries)
    if failures:
        raise OSError("; ".join(f"{uri}: {reason}" for uri, reason in failures.items()))


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
        with np.load(io.BytesIO(fs.cat_file(f"{parts_path}/{part_name(window)}{PART_SUFFIX}"))) as part:
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
