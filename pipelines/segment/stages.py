"""The stages of the segmentation job that run on Ray workers, in pipeline order::

    listing blocks -> load_images    CPU tasks: fetch the bytes (retried), decode them to RGB
                   -> Segmenter      actors: the network (and nvJPEG decoding) on the device
                   -> store_results  CPU tasks: encode masks, write them and one Parquet part

Blocks are Arrow tables; pixels and label maps travel between stages as binary columns (raw
``HxWx3`` / ``HxW`` buffers, read back zero-copy). Every image stays one row from the listing to the
Parquet file: a failure at any stage fills the row's ``error`` (prefixed by the stage) and later
stages pass it through.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from pipelines.common.decode import decode_depth, decode_image, device_jpeg_orientation, orient
from pipelines.common.storage import PERMANENT_IO_ERRORS, backoff_s, with_retries
from pipelines.segment import schema as columns_schema
from pipelines.segment import stats as stats_table
from pipelines.segment.listing import output_name, unsafe_key_reason
from pipelines.segment.masks import encode_mask, encode_overlay
from pipelines.segment.model import ModelInfo

logger = logging.getLogger(__name__)

CPU_FORWARD_PIXELS = 1 << 17
"""Pixels stacked into one forward pass on a CPU: measured on FCN-8s, 128 px images run 1.7x faster
stacked 8 at a time than alone, while stacks of 16 256 px or 500 px images run 1.2-1.3x slower
than 2 or 1 (their activations leave the caches). GPUs take the predictor's default (4 Mpx)."""
DEPTH_MODALITIES = frozenset({"depth", "hha"})
"""Inputs made from the depth maps (``--depth``); RGB comes from the images."""
MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"
STATS_DIR = "stats"

SOURCE_SCHEMA = stats_table.SOURCE_SCHEMA  # the input of the pipeline: what the listing knows of each image


def read_sources(batch: pa.Table, *, storage_options: dict[str, Any], retries: int) -> pa.Table:
    """Fetch the bytes of every image in ``batch`` (concurrently, per filesystem) and retry transient
    errors up to ``retries`` times; adds ``data``, ``read_error`` and ``read_ms`` (never raises)."""
    start = time.perf_counter()
    uris = batch["image_uri"].to_pylist()
    data: list[bytes | None] = [None] * len(uris)
    errors: list[str | None] = [None] * len(uris)
    groups: dict[int, tuple[fsspec.AbstractFileSystem, list[tuple[int, str]]]] = {}
    for i, uri in enumerate(uris):
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        groups.setdefault(id(fs), (fs, []))[1].append((i, path))
    for fs, pending in groups.values():
        for attempt in range(retries + 1):
            try:
                results = fs.cat([path for _, path in pending], on_error="return")
            except Exception as error:  # the whole request failed (e.g. connection refused)
                results = {path: error for _, path in pending}
            retry = []
            for i, path in pending:
                result = results.get(path, FileNotFoundError(path))
                if isinstance(result, bytes):
                    data[i], errors[i] = result, None
                elif isinstance(result, PERMANENT_IO_ERRORS):
                    errors[i] = "read: file not found" if isinstance(result, FileNotFoundError) else f"read: {result}"
                else:
                    errors[i] = f"read: {type(result).__name__}: {result} (after {attempt + 1} attempts)"
                    retry.append((i, path))
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
) -> pa.Table:
    """Fetch and decode the images of ``batch``: adds ``pixels`` (raw ``HxWx3`` RGB, displayed
    orientation), ``height``, ``width``, ``read_ms``, ``decode_ms`` and ``error``. With ``device_jpegs``,
    JPEGs that nvJPEG decodes are left encoded in ``jpeg`` with their EXIF ``orientation`` for the
    FCN actor to decode on its GPU (the header is still checked here, bomb guard included). A model
    that reads depth gets each image's depth map from ``depth_prefix`` (see ``depth_uri``) as
    ``depth`` (raw float32 metres) and/or ``hha`` (raw ``HxWx3``, computed here with ``camera``)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the decoders apply --max-image-pixels themselves, naming the flag
    n = batch.num_rows
    errors: list[str | None] = [
        None if reason is None else f"key: {reason}" for reason in map(unsafe_key_reason, batch["key"].to_pylist())
    ]
    safe = [i for i in range(n) if errors[i] is None]  # keys that cannot name an output are not even read
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
        if errors[i] is not None:
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
    return _with_columns(batch, columns, columns_schema.LOAD)


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
    (rather than a task per block) imports its libraries once and is never reaped and restarted."""

    def __init__(self, **options: Any):
        self.options = options

    def __call__(self, batch: pa.Table) -> pa.Table:
        return load_images(batch, **self.options)


class ResultWriter:
    """Ray actor for the output stage: ``store_results`` with fixed options (see ``ImageLoader``)."""

    def __init__(self, **options: Any):
        self.options = options

    def __call__(self, batch: pa.Table) -> pa.Table:
        return store_results(batch, **self.options)


FATAL_DEVICE_MARKERS = (
    "CUDA error",
    "CUDA driver error",
    "device-side assert",
    "illegal memory access",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "cuDNN error",
    "NCCL error",
)
"""Texts of the RuntimeErrors (torch < 2.8) of failures that leave a CUDA context unusable."""
OUT_OF_MEMORY_TILE_SIZE = 1024
"""Input tile side of the last try of an image that ran out of device memory alone."""


def fatal_device_error(error: BaseException) -> bool:
    """Whether ``error`` leaves the device unusable in this process: a CUDA error other than running out
    of memory (an illegal address, a device-side assert, a failed cuBLAS/cuDNN/NCCL call). Every later
    kernel fails too, so the process must end (Ray restarts the actor), not turn images into error rows."""
    import torch

    if out_of_memory(error):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in FATAL_DEVICE_MARKERS)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory (worth retrying with smaller passes)."""
    import torch

    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error)
    )


class Segmenter:
    """Ray actor: loads the checkpoint once onto its device, then segments the loaded images of each
    batch (equal sizes share forward passes) and returns their label maps and statistics.

    A batch that runs out of device memory is retried image by image, an image that does alone is
    retried in smaller tiles, and only then does it become an error row. A fatal device error (see
    ``fatal_device_error``) is raised; with ``exit_on_fatal_error`` (set by the Ray job) it ends the
    process instead, so that Ray restarts the actor with a fresh CUDA context and retries the batch.
    """

    def __init__(
        self,
        *,
        model_uri: str,
        storage_options: dict[str, Any],
        device: str,
        precision: str,
        cpu_threads: int,
        max_image_pixels: int,
        keep_pixels: bool,
        tally: Any | None = None,
        exit_on_fatal_error: bool = False,
    ):
        import torch

        import fcn

        checkpoint = fcn.load_checkpoint(model_uri, storage_options=storage_options)
        self.cuda = device == "cuda"  # the driver resolves "auto" from the cluster's GPUs
        if not self.cuda:
            torch.set_num_threads(cpu_threads)
        self.exit_on_fatal_error = exit_on_fatal_error
        self.predictor = fcn.Predictor.from_checkpoint(
            checkpoint,
            device=device,
            bf16=fcn.resolve_precision(precision, device) == "bf16",
            channels_last=self.cuda,
            batch_pixels=None if self.cuda else CPU_FORWARD_PIXELS,
        )
        self.max_image_pixels = max_image_pixels
        self.keep_pixels = keep_pixels  # overlays need the RGB pixels downstream
        self.tally = tally  # a Tally actor (or None): the driver's progress counts images as they are segmented

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Segment every loaded image of ``batch``; adds ``labels``, ``pixel_counts``,
        ``mean_confidence`` and ``inference_ms``; a failure becomes the row's ``error``, except a fatal
        device error (raised, or the end of the process with ``exit_on_fatal_error``)."""
        try:
            return self._segment(batch)
        except Exception as error:
            if self.exit_on_fatal_error and fatal_device_error(error):
                logger.critical(
                    "fatal device error; ending this actor's process for Ray to restart it and retry the batch:\n%s",
                    "".join(traceback.format_exception(error)),
                )
                logging.shutdown()
                os._exit(1)  # the CUDA context cannot be reset in-process; a clean exit would not be restarted
            raise

    def _segment(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch["error"].to_pylist()
        heights, widths = batch["height"].to_pylist(), batch["width"].to_pylist()
        decode_ms = batch["decode_ms"].to_pylist()
        images: dict[int, Any] = {}
        for i, buffer in enumerate(_buffers(batch["pixels"])):
            if buffer is not None and errors[i] is None:  # (a depth map can fail after its image loaded)
                images[i] = np.frombuffer(buffer, np.uint8).reshape(heights[i], widths[i], 3)
        for modality in sorted(DEPTH_MODALITIES & set(batch.column_names)):  # inputs by modality
            shape, dtype = ((3,), np.uint8) if modality == "hha" else ((), np.float32)
            for i, buffer in enumerate(_buffers(batch[modality])):
                if i in images and buffer is not None:
                    inputs = images[i] if isinstance(images[i], dict) else {"rgb": images[i]}
                    inputs[modality] = np.frombuffer(buffer, dtype).reshape(heights[i], widths[i], *shape)
                    images[i] = inputs
        jpeg_rows = [i for i, valid in enumerate(batch["jpeg"].is_valid().to_pylist()) if valid]
        if jpeg_rows:
            start = time.perf_counter()
            decoded = self._decode_jpegs(batch, jpeg_rows)
            per_image_ms = (time.perf_counter() - start) * 1000 / len(jpeg_rows)
            for i, pixels in zip(jpeg_rows, decoded):
                if isinstance(pixels, Exception):
                    errors[i] = f"decode: {pixels}"
                    continue
                images[i], decode_ms[i] = pixels, per_image_ms
                heights[i], widths[i] = _height_width(pixels)
        heads = list(self.predictor.head_classes)
        produced = ("labels", "pixel_counts", "mean_confidence")
        outputs = {_column(head, heads, name): [None] * n for head in heads for name in produced}
        inference_ms: list[float | None] = [None] * n
        if images:
            start = time.perf_counter()
            predictions = self._predict(list(images.values()))
            per_image_ms = (time.perf_counter() - start) * 1000 / len(images)
            for i, prediction in zip(images, predictions):
                if isinstance(prediction, Exception):
                    errors[i] = f"inference: {type(prediction).__name__}: {prediction}"
                    continue
                for head in heads:
                    part = prediction.heads.get(head, prediction)
                    outputs[_column(head, heads, "labels")][i] = memoryview(np.ascontiguousarray(part.labels)).cast("B")
                    outputs[_column(head, heads, "pixel_counts")][i] = part.pixel_counts.tolist()
                    outputs[_column(head, heads, "mean_confidence")][i] = part.mean_confidence
                inference_ms[i] = per_image_ms
        if self.tally is not None:
            self.tally.add.remote(n)
        kept = [name for name in batch.column_names if name not in _REPLACED_BY_SEGMENTER]
        out = batch.select(kept)
        columns = {
            "error": errors,
            "height": heights,
            "width": widths,
            "decode_ms": decode_ms,
            "inference_ms": inference_ms,
            **outputs,
        }
        if self.keep_pixels:
            columns["pixels"] = [_rgb_bytes(images.get(i)) for i in range(n)]
        return _with_columns(out, columns, columns_schema.SEGMENT)

    def _decode_jpegs(self, batch: pa.Table, rows: list[int]) -> list[Any]:
        """Decode the JPEGs of ``rows`` on the predictor's device in one nvJPEG call (``3xHxW`` uint8
        tensors, EXIF orientation applied); if the batch fails, each image alone, and Pillow (to a numpy
        array) for those the device cannot decode; an exception in place of an undecodable image."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        device = self.predictor.device
        data = [batch["jpeg"][i].as_py() for i in rows]
        orientations = [batch["orientation"][i].as_py() for i in rows]
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        try:
            decoded: list[Any] = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as error:
            self._recover(error)
            decoded = []
            for tensor, encoded in zip(tensors, data):
                try:
                    decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
                except RuntimeError as error:
                    self._recover(error)
                    try:
                        decoded.append(decode_image(encoded, max_pixels=self.max_image_pixels))
                    except Exception as error:
                        decoded.append(error)
        return [
            orient(pixels, orientation) if isinstance(pixels, torch.Tensor) else pixels
            for pixels, orientation in zip(decoded, orientations)
        ]

    def _predict(self, images: list[Any]) -> list[Any]:
        """Predictions for ``images``; if the batch fails, each image alone, and an image that runs out
        of memory alone in smaller tiles (its exception in its place if that fails too)."""
        try:
            return self.predictor.predict_batch(images, statistics=True)
        except Exception as error:
            self._recover(error)
        results: list[Any] = []
        for image in images:
            try:
                results.append(self.predictor(image, statistics=True))
                continue
            except Exception as error:
                self._recover(error)
                if not out_of_memory(error):
                    results.append(error)
                    continue
            try:
                results.append(self.predictor.tiled(OUT_OF_MEMORY_TILE_SIZE)(image, statistics=True))
            except Exception as error:
                self._recover(error)
                results.append(error)
        return results

    def _recover(self, error: BaseException) -> None:
        """Re-raise a fatal device error; otherwise free the device memory the failed call left cached."""
        if fatal_device_error(error):
            raise error
        if self.cuda:
            import torch

            torch.cuda.empty_cache()  # e.g. after an out-of-memory error on a huge image


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
    ``error`` for the driver's progress."""
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    root = root.rstrip("/")
    n = batch.num_rows
    keys = batch["key"].to_pylist()
    errors = batch["error"].to_pylist()
    heights, widths = batch["height"].to_pylist(), batch["width"].to_pylist()
    heads = model.heads or {"semantic": {"class_names": model.class_names, "palette": model.palette}}
    tasks = list(heads)
    labels = {task: _buffers(batch[_column(task, tasks, "labels")]) for task in tasks}
    pixels = _buffers(batch["pixels"]) if "pixels" in batch.column_names else [None] * n
    mask_uris: dict[str, list[str | None]] = {task: [None] * n for task in tasks}
    overlay_uris: list[str | None] = [None] * n
    write_ms: list[float | None] = [None] * n
    files: dict[str, bytes] = {}
    owners: dict[str, int] = {}
    for i in range(n):
        if errors[i] is not None:
            continue
        start = time.perf_counter()
        try:
            for task in tasks:
                label_map = _label_map(labels[task][i], heights[i], widths[i])
                mask_path = output_path(root, mask_folder(task, tasks), keys[i], ".png")
                files[mask_path], owners[mask_path] = encode_mask(label_map, heads[task]["palette"]), i
                mask_uris[task][i] = fs.unstrip_protocol(mask_path)
            if pixels[i] is not None:
                rgb = np.frombuffer(pixels[i], np.uint8).reshape(heights[i], widths[i], 3)
                overlay_path = output_path(root, OVERLAYS_DIR, keys[i], ".jpg")
                label_map = _label_map(labels[tasks[0]][i], heights[i], widths[i])
                files[overlay_path], owners[overlay_path] = encode_overlay(rgb, label_map, model.palette), i
                overlay_uris[i] = fs.unstrip_protocol(overlay_path)
        except Exception as error:
            errors[i] = f"encode: {type(error).__name__}: {error}"
            for uris in mask_uris.values():
                uris[i] = None
            overlay_uris[i] = None
            continue
        write_ms[i] = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    failures = _put_files(fs, files, retries)
    share_ms = (time.perf_counter() - start) * 1000 / max(len(set(owners.values())), 1)
    for path, reason in failures.items():
        i = owners[path]
        errors[i], overlay_uris[i] = f"write: {reason}", None
        for uris in mask_uris.values():
            uris[i] = None
    ok = [error is None for error in errors]
    for i in range(n):
        if ok[i]:
            write_ms[i] += share_ms  # encoding (this task) + this batch's share of writing
    now = datetime.now(UTC)
    columns: dict[str, list[Any]] = {
        "overlay_uri": overlay_uris,
        "write_ms": [ms if good else None for ms, good in zip(write_ms, ok)],
        "status": [stats_table.STATUS_OK if good else stats_table.STATUS_ERROR for good in ok],
        "error": errors,
        "run_id": [run_id] * n,
        "processed_at": [now] * n,
        "model_id": [model.uri] * n,
        "model_version": [model.version] * n,
    }
    for task in tasks:
        columns[_column(task, tasks, "mask_uri")] = mask_uris[task]
        counts = batch[_column(task, tasks, "pixel_counts")].to_pylist()
        columns.update(
            _class_statistics(counts, ok, heads[task]["class_names"], lambda c, task=task: _column(task, tasks, c))
        )
    arrays = _arrays(columns, columns_schema.STORE)
    table = pa.Table.from_arrays(
        [arrays[name] if name in arrays else batch[name] for name in schema.names], schema=schema
    )
    stats_table.write_part(f"{output.rstrip('/')}/{STATS_DIR}", table, run_id, storage_options, retries)
    return table.select(["image_uri", "status", "error"])


def mask_folder(task: str, tasks: list[str]) -> str:
    """``masks`` for the first head, ``masks_<head>`` for each further one."""
    return MASKS_DIR if task == tasks[0] else f"{MASKS_DIR}_{task}"


def _label_map(buffer: memoryview, height: int, width: int) -> np.ndarray:
    return np.frombuffer(buffer, _label_dtype(buffer, height, width)).reshape(height, width)


def _class_statistics(
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


_REPLACED_BY_SEGMENTER = columns_schema.replaced_by(columns_schema.SEGMENT)
"""Columns of ``load_images`` that the Segmenter consumes or writes anew; it passes the others through."""


def output_path(root: str, folder: str, key: str, suffix: str) -> str:
    """``<root>/<folder>/<name><suffix>``, ``name`` being the key with ``%``, ``?`` and ``#`` escaped
    (``pipelines.segment.listing.output_name``); ValueError for a key that would not stay inside that folder or
    name a file of its own (see ``pipelines.segment.listing.unsafe_key_reason``)."""
    reason = unsafe_key_reason(key)
    if reason:
        raise ValueError(reason)
    return f"{root}/{folder}/{output_name(key)}{suffix}"


def _arrays(columns: dict[str, list[Any]], stage: str) -> dict[str, pa.Array]:
    """``columns`` (name: values) as Arrow arrays of their declared types (``pipelines.segment.schema``);
    ValueError naming a column that is not declared, or not declared as written by ``stage``."""
    return {name: pa.array(values, columns_schema.column_type(name, stage)) for name, values in columns.items()}


def _with_columns(table: pa.Table, columns: dict[str, list[Any]], stage: str) -> pa.Table:
    """``table`` with ``columns`` (name: values) that ``stage`` writes appended in order (see ``_arrays``)."""
    for name, array in _arrays(columns, stage).items():
        table = table.append_column(name, array)
    return table


def _buffers(column: pa.ChunkedArray) -> list[memoryview | None]:
    """The values of a binary column as zero-copy memoryviews (None for nulls)."""
    views: list[memoryview | None] = []
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        bounds = np.frombuffer(offsets, np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        data_view = memoryview(data) if data is not None else memoryview(b"")
        for j, valid in enumerate(chunk.is_valid().to_pylist()):
            views.append(data_view[bounds[j] : bounds[j + 1]] if valid else None)
    return views


def _label_dtype(buffer: memoryview, height: int, width: int) -> type[np.generic]:
    """uint8 labels (up to 256 classes) or int32 ones, told apart by their byte length."""
    return np.uint8 if len(buffer) == height * width else np.int32


def _height_width(pixels: Any) -> tuple[int, int]:
    """(height, width) of an ``HxWx3`` array or a ``3xHxW`` tensor."""
    height, width = pixels.shape[:2] if isinstance(pixels, np.ndarray) else pixels.shape[1:]
    return int(height), int(width)


def _column(task: str, tasks: list[str], column: str) -> str:
    """A head's ``column``: the first head's unprefixed, a further head's ``<head>_<column>``."""
    return columns_schema.head_column(None if task == tasks[0] else task, column)


def _rgb_bytes(pixels: Any) -> memoryview | None:
    """``HxWx3`` bytes of an image held as an array or a ``3xHxW`` tensor (on any device), or of the
    ``rgb`` input of a dict of inputs."""
    if isinstance(pixels, dict):
        pixels = pixels["rgb"]
    if pixels is None:
        return None
    if not isinstance(pixels, np.ndarray):
        pixels = pixels.permute(1, 2, 0).contiguous().cpu().numpy()
    return memoryview(np.ascontiguousarray(pixels)).cast("B")


def _put_files(fs: fsspec.AbstractFileSystem, files: dict[str, bytes], retries: int) -> dict[str, str]:
    """Write all ``files`` (concurrently where the filesystem can), then retry those that failed one by
    one; return {path: reason} of the files that could not be written."""
    for parent in {path.rsplit("/", 1)[0] for path in files}:
        fs.makedirs(parent, exist_ok=True)
    try:
        fs.pipe(files)
        return {}
    except Exception:
        failures = {}
        for path, data in files.items():
            try:
                with_retries(lambda path=path, data=data: fs.pipe_file(path, data), retries)
            except Exception as error:
                failures[path] = f"{type(error).__name__}: {error}"
        return failures
