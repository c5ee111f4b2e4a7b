"""The loading stage of the segmentation job: an actor pool on CPUs (``ImageLoader``) that fetches each
image's bytes (retried), checks and decodes them to RGB (or leaves JPEGs for the device to decode), and
reads the depth maps of RGB-D/HHA models.

Blocks are Arrow tables; pixels travel to the next stage as raw ``HxWx3`` binary columns. A failure
fills the row's ``error`` (prefixed by the stage) and later stages pass it through.
"""

from __future__ import annotations

import posixpath
import time
from typing import Any

import pyarrow as pa

from pipelines.common import objectstore
from pipelines.common.decode import decode_depth, decode_image, device_jpeg_orientation
from pipelines.common.storage import PERMANENT_IO_ERRORS, backoff_s
from pipelines.segment import schema as columns_schema
from pipelines.segment.crashes import isolate_crashes
from pipelines.segment.keys import unsafe_key_reason
from pipelines.segment.schema import with_columns
from pipelines.segment.tiff import probe_tiled
from pipelines.segment.tiles import load_windows

DEPTH_MODALITIES = frozenset({"depth", "hha"})
"""Inputs made from the depth maps (``--depth``); RGB comes from the images."""


def read_sources(batch: pa.Table, *, storage_options: dict[str, Any], retries: int) -> pa.Table:
    """Fetch the bytes of every image in ``batch`` (concurrently, ``pipelines.common.objectstore.get_all``)
    and retry transient errors up to ``retries`` times; adds ``data``, ``read_error`` and ``read_ms`` (never
    raises)."""
    start = time.perf_counter()
    uris = batch["image_uri"].to_pylist()
    data: list[bytes | None] = [None] * len(uris)
    errors: list[str | None] = [None] * len(uris)
    pending = list(range(len(uris)))
    for attempt in range(retries + 1):
        results = objectstore.get_all([uris[i] for i in pending], storage_options)
        retry = []
        for i, result in zip(pending, results):
            if isinstance(result, bytes):
                data[i], errors[i] = result, None
            elif isinstance(result, PERMANENT_IO_ERRORS):
                errors[i] = "read: file not found" if isinstance(result, FileNotFoundError) else f"read: {result}"
            else:
                errors[i] = f"read: {type(result).__name__}: {result} (after {attempt + 1} attempts)"
                retry.append(i)
        if not retry or attempt == retries:
            break
        pending = retry
        time.sleep(backoff_s(attempt))
    read_ms = (time.perf_counter() - start) * 1000 / max(len(uris), 1)
    return (
        batch.append_column("data", pa.array(data, pa.large_binary()))
        .append_column("read_error", pa.array(errors, pa.string()))
        .append_column("read_ms", pa.array([read_ms] * len(uris), pa.float64()))
    )


def load_images(
    batch: pa.Table,
    *,
    storage_options: dict[str, Any],
    retries: int,
    max_image_pixels: int,
    device_jpegs: bool,
    depth_prefix: str | None = None,
    camera: str = "",
    modalities: tuple[str, ...] = ("rgb",),
    error: str | None = None,
) -> pa.Table:
    """Fetch and decode the images of ``batch``: adds ``pixels`` (raw ``HxWx3`` RGB, displayed
    orientation), ``height``, ``width``, ``read_ms``, ``decode_ms`` and ``error`` (with ``error`` given,
    every row's, and nothing is read). With ``device_jpegs``, JPEGs that nvJPEG decodes are left encoded
    in ``jpeg`` with their EXIF ``orientation`` for the FCN actor to decode on its GPU (the header is
    still checked here, bomb guard included). A model that reads depth gets each image's depth map from
    ``depth_prefix`` (see ``depth_uri``) as ``depth`` (raw float32 metres) and/or ``hha`` (raw ``HxWx3``,
    computed here with ``camera``)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the decoders apply --max-image-pixels themselves, naming the flag
    n = batch.num_rows
    errors: list[str | None] = [
        error or (None if reason is None else f"key: {reason}")
        for reason in map(unsafe_key_reason, batch["key"].to_pylist())
    ]
    windows = batch["window"].to_pylist() if "window" in batch.column_names else [None] * n
    # keys that cannot name an output are not even read; the windows of tiled images are read by window
    safe = [i for i in range(n) if errors[i] is None and windows[i] is None]
    uris = batch["image_uri"].to_pylist()
    if set(modalities) & DEPTH_MODALITIES:  # images read whole with their depth maps: too large ones are not fetched
        for i in safe:
            errors[i] = _beyond_whole_limit(uris[i], storage_options, max_image_pixels)
        safe = [i for i in safe if errors[i] is None]
    fetched = read_sources(batch.take(pa.array(safe, pa.int64())), storage_options=storage_options, retries=retries)
    data: list[bytes | None] = [None] * n
    read_ms: list[float | None] = [None] * n
    for i, content, error, ms in zip(
        safe, fetched["data"].to_pylist(), fetched["read_error"].to_pylist(), fetched["read_ms"].to_pylist()
    ):
        data[i], errors[i], read_ms[i] = content, error, ms
    pixels: list[memoryview | None] = [None] * n
    jpegs: list[bytes | None] = [None] * n
    orientations: list[int | None] = [None] * n
    heights: list[int | None] = [None] * n
    widths: list[int | None] = [None] * n
    decode_ms: list[float | None] = [None] * n
    for i, content in enumerate(data):
        if errors[i] is not None or windows[i] is not None:
            continue
        start = time.perf_counter()
        try:
            orientation = device_jpeg_orientation(content, max_pixels=max_image_pixels) if device_jpegs else None
            if orientation is not None:
                jpegs[i], orientations[i] = content, orientation
                continue
            rgb = decode_image(content, max_pixels=max_image_pixels)
        except Exception as error:
            errors[i] = f"decode: {error}"
            continue
        pixels[i] = memoryview(rgb).cast("B")
        heights[i], widths[i] = rgb.shape[:2]
        decode_ms[i] = (time.perf_counter() - start) * 1000
    for i, (rgb, ms) in load_windows(uris, windows, errors, storage_options=storage_options).items():
        pixels[i], read_ms[i] = memoryview(rgb).cast("B"), ms
        heights[i], widths[i] = rgb.shape[:2]
    columns = {
        "read_ms": read_ms,
        "error": errors,
        "pixels": pixels,
        "jpeg": jpegs,
        "orientation": orientations,
        "height": heights,
        "width": widths,
        "decode_ms": decode_ms,
    }
    if set(modalities) & DEPTH_MODALITIES:
        if depth_prefix is None:
            raise ValueError(f"the model reads {list(modalities)}: a depth prefix is required")
        columns.update(
            _load_depth(
                batch,
                errors,
                heights,
                widths,
                decode_ms,
                depth_prefix=depth_prefix,
                camera=camera,
                modalities=modalities,
                storage_options=storage_options,
                retries=retries,
                max_image_pixels=max_image_pixels,
            )
        )
    return with_columns(batch, columns, columns_schema.LOAD)


def _beyond_whole_limit(uri: str, storage_options: dict[str, Any], max_image_pixels: int) -> str | None:
    """Why a model that reads depth maps refuses the tiled TIFF at ``uri`` (header only), or None: one of more than
    ``max_image_pixels`` is read by window for RGB models only, as its depth map (a PNG) cannot be."""
    try:
        layout = probe_tiled(uri, storage_options)
    except Exception:  # the read reports it
        return None
    if layout is None or layout.pixels <= max_image_pixels:
        return None
    return (
        f"decode: {layout.width}x{layout.height} = {layout.pixels:,} pixels, more than the limit of "
        f"{max_image_pixels:,} (--max-image-pixels) of images read whole: a model that reads depth maps (RGB-D/HHA) "
        "reads each image whole with its depth map, a PNG that cannot be read by window; tiled TIFFs are segmented "
        "window by window for RGB models only"
    )


def depth_uri(prefix: str, key: str) -> str:
    """Where the depth map of image ``key`` is: ``<prefix>/<key without its extension>.png``."""
    return f"{prefix.rstrip('/')}/{posixpath.splitext(key)[0]}.png"


def _load_depth(
    batch: pa.Table,
    errors: list[str | None],
    heights: list[int | None],
    widths: list[int | None],
    decode_ms: list[float | None],
    *,
    depth_prefix: str,
    camera: str,
    modalities: tuple[str, ...],
    storage_options: dict[str, Any],
    retries: int,
    max_image_pixels: int,
) -> dict[str, list[Any]]:
    """Read and decode the depth map of every image loaded so far (updating ``errors`` and
    ``decode_ms`` in place); the ``depth`` and/or ``hha`` columns the model reads."""
    from fcn.depth import Camera, hha

    intrinsics = Camera.parse(camera)
    n = batch.num_rows
    loaded = [i for i in range(n) if errors[i] is None]
    keys = batch["key"].to_pylist()
    uris = pa.table({"image_uri": pa.array([depth_uri(depth_prefix, keys[i]) for i in loaded], pa.string())})
    fetched = read_sources(uris, storage_options=storage_options, retries=retries)
    columns: dict[str, list[Any]] = {m: [None] * n for m in modalities if m in DEPTH_MODALITIES}
    for i, uri, content, error in zip(
        loaded, uris["image_uri"].to_pylist(), fetched["data"].to_pylist(), fetched["read_error"].to_pylist()
    ):
        if error is not None:
            errors[i] = f"depth {error} ({uri})"
            continue
        start = time.perf_counter()
        try:
            depth = decode_depth(content, max_pixels=max_image_pixels)
        except Exception as failure:
            errors[i] = f"depth: {failure} ({uri})"
            continue
        if depth.shape != (heights[i], widths[i]):
            errors[i] = f"depth: {uri} is {depth.shape[1]}x{depth.shape[0]}, the image {widths[i]}x{heights[i]}"
            continue
        if "depth" in columns:
            columns["depth"][i] = memoryview(depth).cast("B")
        if "hha" in columns:
            columns["hha"][i] = memoryview(hha(depth, intrinsics)).cast("B")
        decode_ms[i] = (decode_ms[i] or 0.0) + (time.perf_counter() - start) * 1000
    return columns


class ImageLoader:
    """Ray actor for the decoding stage: ``load_images`` with fixed options. A long-lived worker
    (rather than a task per block) imports its libraries once and is never reaped and restarted. With a
    ``tally``, a row that keeps ending the process becomes an error row (``crashes.isolate_crashes``)."""

    def __init__(self, tally: Any | None = None, **options: Any):
        self.tally = tally
        self.options = options

    def __call__(self, batch: pa.Table) -> pa.Table:
        return isolate_crashes(self.load, batch, self.tally, self._give_up, columns_schema.LOAD)

    def load(self, batch: pa.Table) -> pa.Table:
        """``load_images`` of ``batch`` with this loader's options."""
        return load_images(batch, **self.options)

    def _give_up(self, row: pa.Table, deaths: int) -> pa.Table:
        message = (
            f"decode: the loader's process ended {deaths} times with this row in its call (a crash in a decoder "
            "or the out-of-memory killer); not tried again"
        )
        return load_images(row, **self.options, error=message)
