"""The inference stage of the segmentation job: ``Segmenter``, an actor pool on the GPUs (or CPUs) that
loads the network once per actor, decodes JPEGs on the device (nvJPEG), and turns each loaded image into
label maps and per-class statistics. Out-of-memory failures are retried smaller; a fatal device error
ends the actor's process for Ray to restart it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from typing import Any

import numpy as np
import pyarrow as pa

from fcn.heads import head_key
from pipelines.common.decode import decode_image, orient
from pipelines.segment import schema as columns_schema
from pipelines.segment.crashes import isolate_crashes
from pipelines.segment.load import DEPTH_MODALITIES
from pipelines.segment.schema import binary_views, with_columns
from pipelines.segment.tiles import keep_core

logger = logging.getLogger(__name__)

CPU_FORWARD_PIXELS = 1 << 17
"""Pixels stacked into one forward pass on a CPU: measured on FCN-8s, 128 px images run 1.7x faster
stacked 8 at a time than alone, while stacks of 16 256 px or 500 px images run 1.2-1.3x slower
than 2 or 1 (their activations leave the caches). GPUs take the predictor's default (4 Mpx)."""

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
    With a ``tally``, a row that keeps ending the process becomes an error row (``crashes.isolate_crashes``).
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
            # NHWC on CPUs too: oneDNN's blocked NCHW layouts pad narrow layers' channels (a 2048 px window of
            # FCN-8s at width 1/16 peaked 460-590 MB above the actor's idle size in NCHW, 250 MB in NHWC)
            channels_last=True,
            batch_pixels=None if self.cuda else CPU_FORWARD_PIXELS,
        )
        self.max_image_pixels = max_image_pixels
        self.keep_pixels = keep_pixels  # overlays of whole images need their RGB pixels downstream
        self.tally = tally  # a Tally actor (or None): the driver's progress, and the rows that end processes
        self.process = f"{socket.gethostname()}:{os.getpid()}"  # names this actor in the bookkeeping of tiled images

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Segment every loaded image of ``batch``; adds ``labels``, ``pixel_counts``,
        ``mean_confidence`` and ``inference_ms``; a failure becomes the row's ``error``, except a fatal
        device error (raised, or the end of the process with ``exit_on_fatal_error``)."""
        try:
            return isolate_crashes(self._segment, batch, self.tally, self._give_up, columns_schema.SEGMENT)
        except Exception as error:
            if self.exit_on_fatal_error and fatal_device_error(error):
                logger.critical(
                    "fatal device error; ending this actor's process for Ray to restart it and retry the batch:\n%s",
                    "".join(traceback.format_exception(error)),
                )
                logging.shutdown()
                os._exit(1)  # the CUDA context cannot be reset in-process; a clean exit would not be restarted
            raise

    def _give_up(self, row: pa.Table, deaths: int) -> pa.Table:
        message = (
            f"inference: the FCN actor's process ended {deaths} times with this row in its call (a fatal device "
            "error, a crash or the out-of-memory killer); not tried again"
        )
        return self._segment(row.set_column(row.schema.get_field_index("error"), "error", pa.array([message])))

    def _segment(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch["error"].to_pylist()
        heights, widths = batch["height"].to_pylist(), batch["width"].to_pylist()
        decode_ms = batch["decode_ms"].to_pylist()
        images: dict[int, Any] = {}
        for i, buffer in enumerate(binary_views(batch["pixels"])):
            if buffer is not None and errors[i] is None:  # (a depth map can fail after its image loaded)
                images[i] = np.frombuffer(buffer, np.uint8).reshape(heights[i], widths[i], 3)
        for modality in sorted(DEPTH_MODALITIES & set(batch.column_names)):  # inputs by modality
            shape, dtype = ((3,), np.uint8) if modality == "hha" else ((), np.float32)
            for i, buffer in enumerate(binary_views(batch[modality])):
                if i in images and buffer is not None:
                    inputs = images[i] if isinstance(images[i], dict) else {"rgb": images[i]}
                    inputs[modality] = np.frombuffer(buffer, dtype).reshape(heights[i], widths[i], *shape)
                    images[i] = inputs
        jpeg_rows = [i for i, valid in enumerate(batch["jpeg"].is_valid().to_pylist()) if valid and errors[i] is None]
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
        outputs = {head_key(head, heads, name): [None] * n for head in heads for name in produced}
        inference_ms: list[float | None] = [None] * n
        windows = batch["window"].to_pylist() if "window" in batch.column_names else [None] * n
        cores = batch["core"].to_pylist() if "core" in batch.column_names else [None] * n
        if images:
            start = time.perf_counter()
            predictions = self._predict(list(images.values()), confidence=any(cores[i] for i in images))
            per_image_ms = (time.perf_counter() - start) * 1000 / len(images)
            for i, prediction in zip(images, predictions):
                if isinstance(prediction, Exception):
                    errors[i] = f"inference: {type(prediction).__name__}: {prediction}"
                    continue
                if cores[i] is not None:  # a window of a tiled image: its core's labels and statistics
                    heights[i], widths[i] = keep_core(list(prediction.heads.values()), windows[i], cores[i])
                for head, part in prediction.heads.items():
                    labels = np.ascontiguousarray(part.labels)
                    outputs[head_key(head, heads, "labels")][i] = memoryview(labels).cast("B")
                    outputs[head_key(head, heads, "pixel_counts")][i] = part.pixel_counts.tolist()
                    outputs[head_key(head, heads, "mean_confidence")][i] = part.mean_confidence
                inference_ms[i] = per_image_ms
        if self.tally is not None:
            tiles = sum(core is not None for core in cores)
            self.tally.add.remote(n - tiles, tiles)
        kept = [name for name in batch.column_names if name not in _REPLACED_BY_SEGMENTER]
        out = batch.select(kept)
        columns = {
            "error": errors,
            "height": heights,
            "width": widths,
            "decode_ms": decode_ms,
            "inference_ms": inference_ms,
            **outputs,
            "fcn_actor": [self.process] * n,
        }
        if self.keep_pixels:  # whole images' RGB for their overlays (a tiled image's is drawn from its overview)
            columns["pixels"] = [None if cores[i] else _rgb_bytes(images.get(i)) for i in range(n)]
        return with_columns(out, columns, columns_schema.SEGMENT)

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

    def _predict(self, images: list[Any], confidence: bool = False) -> list[Any]:
        """Predictions for ``images`` (with their ``confidence`` maps if asked); if the batch fails, each image
        alone, and an image that runs out of memory alone in smaller tiles (its exception in its place if that
        fails too)."""
        try:
            return self.predictor.predict_batch(images, confidence=confidence, statistics=True)
        except Exception as error:
            self._recover(error)
        results: list[Any] = []
        for image in images:
            try:
                results.append(self.predictor(image, confidence=confidence, statistics=True))
                continue
            except Exception as error:
                self._recover(error)
                if not out_of_memory(error):
                    results.append(error)
                    continue
            try:
                results.append(
                    self.predictor.tiled(OUT_OF_MEMORY_TILE_SIZE)(image, confidence=confidence, statistics=True)
                )
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


_REPLACED_BY_SEGMENTER = columns_schema.replaced_by(columns_schema.SEGMENT)
"""Columns of ``load_images`` that the Segmenter consumes or writes anew; it passes the others through."""


def _height_width(pixels: Any) -> tuple[int, int]:
    """(height, width) of an ``HxWx3`` array or a ``3xHxW`` tensor."""
    height, width = pixels.shape[:2] if isinstance(pixels, np.ndarray) else pixels.shape[1:]
    return int(height), int(width)


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
