"""Segment every image under a URI with an FCN on Ray: masks, Parquet statistics, manifest, _SUCCESS.

One Ray Data streaming pipeline::

    from_items(listing) -> read bytes (I/O tasks) -> Segmenter actors (decode, FCN, encode mask)
                        -> write masks + one Parquet part file per batch (I/O tasks) -> driver

The ``Segmenter`` actors each load the checkpoint once and keep it on their device (one GPU per
actor when the cluster has GPUs). Every image yields exactly one stats row: per-image failures are
caught inside the stages and become ``status="error"`` rows with a reason. A rerun into the same
output skips images whose newest row is ``ok`` for the same source and model; the run ends by
compacting the stats to one row per image, then writes ``manifest.json`` and, last, ``_SUCCESS``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from pipelines import stats as stats_table
from pipelines.decode import decode_image
from pipelines.listing import InputError, list_images
from pipelines.masks import encode_mask, encode_overlay
from pipelines.progress import LIVE_REFRESH_S, Progress, Tally

logger = logging.getLogger("pipelines.segment")

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"
STATS_DIR = "stats"
MANIFEST_FILE = "manifest.json"
SUCCESS_FILE = "_SUCCESS"
ERROR_SAMPLES = 20
MAX_INPUT_BLOCKS = 10_000
PERMANENT_IO_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)  # never retried
_REGISTRY_VERSION = re.compile(r"/models/(v\d+)/[^/]+$")

_TYPES = {name: type_ for name, type_, _ in stats_table.FIELDS}
# What the listing knows of each image, and what the Segmenter actors add (plus the encoded files).
_SOURCE_COLUMNS = [(name, _TYPES[name]) for name in ("image_uri", "key", "source_size", "source_etag", "source_mtime")]
_ACTOR_COLUMNS = [
    *((name, _TYPES[name]) for name in (
        "width", "height", "pixel_counts", "class_fractions", "dominant_class", "dominant_class_name",
        "mean_confidence", "read_ms", "decode_ms", "inference_ms", "write_ms", "status", "error",
    )),
    ("mask_png", pa.large_binary()),
    ("overlay_jpg", pa.large_binary()),
]
_ACTOR_OUTPUT_SCHEMA = pa.schema(_SOURCE_COLUMNS + _ACTOR_COLUMNS)


class ConfigError(ValueError):
    """A bad parameter; ``param`` names the CLI flag. The CLI shows it without a traceback (exit 2)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class SegmentConfig:
    """Parameters of one segmentation run (the CLI flags, one to one)."""

    input: str
    output: str
    model: str
    ray_address: str | None = None
    actors: int | None = None  # default: one per GPU, else one per cpus_per_actor CPUs of the cluster
    cpus_per_actor: float = 2.0  # CPU actors: CPUs reserved per actor = torch threads
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    batch_size: int = 4
    overlays: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for --input, --output, --model
    max_image_pixels: int = 100_000_000
    rows_per_file: int = 256
    read_retries: int = 3
    progress: bool | None = None  # live bar; None: when stderr is a terminal

    def validate(self) -> None:
        """Raise ConfigError naming the first bad parameter."""
        for name in ("input", "output", "model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"--{name}", "must be a non-empty URI or path")
        if self.device not in DEVICES:
            raise ConfigError("--device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError("--precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        positive = {
            "--actors": self.actors,
            "--cpus-per-actor": self.cpus_per_actor,
            "--batch-size": self.batch_size,
            "--max-image-pixels": self.max_image_pixels,
            "--rows-per-file": self.rows_per_file,
        }
        for flag, value in positive.items():
            if value is not None and not value > 0:
                raise ConfigError(flag, f"must be > 0, got {value}")
        if self.read_retries < 0:
            raise ConfigError("--read-retries", f"must be >= 0, got {self.read_retries}")
        if not isinstance(self.storage_options, dict):
            raise ConfigError("--storage-options", "must be a JSON object")


@dataclass
class SegmentSummary:
    """What a run did; also written (with the config) to ``<output>/manifest.json``."""

    run_id: str
    input: str
    output: str
    model: str  # "<architecture> <version>"
    model_id: str  # the checkpoint file used (a registry's champion resolved at the start)
    model_version: str
    listed: int
    ok: int
    error: int
    skipped: int
    duration_s: float  # the whole run: listing, Ray pipeline, compaction, manifest
    images_per_second: float  # images processed (ok + error) per second of the Ray pipeline (actor start-up included)
    stats_uri: str
    masks_uri: str
    manifest_uri: str
    success_uri: str
    errors: list[dict[str, str]] = field(default_factory=list)  # the first few {image_uri, error}


@dataclass(frozen=True)
class ModelInfo:
    """The checkpoint a run uses, resolved and described once on the driver."""

    uri: str
    version: str
    arch: dict[str, Any]
    class_names: list[str]
    palette: list[int]

    @property
    def label(self) -> str:
        return f"{self.arch['name']} {self.version}"


# ---------------------------------------------------------------------------------------------
# Pipeline stages (they run on Ray workers)


def read_sources(batch: pa.Table, *, storage_options: dict[str, Any], retries: int) -> pa.Table:
    """Fetch the bytes of every image in ``batch`` (concurrently, per filesystem) and retry transient
    errors up to ``retries`` times; a failure becomes the row's ``error``, never an exception."""
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
            time.sleep(min(0.5 * 2**attempt, 10.0))
    read_ms = (time.perf_counter() - start) * 1000 / max(len(uris), 1)
    return (
        batch.append_column("data", pa.array(data, pa.large_binary()))
        .append_column("read_error", pa.array(errors, pa.string()))
        .append_column("read_ms", pa.array([read_ms] * len(uris), pa.float64()))
    )


class Segmenter:
    """Ray actor: loads the checkpoint once onto its device, then decodes and segments batches."""

    def __init__(
        self,
        *,
        model_uri: str,
        storage_options: dict[str, Any],
        tally: Any,
        device: str,
        precision: str,
        cpu_threads: int,
        max_image_pixels: int,
        overlays: bool,
    ):
        import torch
        from PIL import Image

        import fcn

        checkpoint = fcn.load_checkpoint(model_uri, storage_options=storage_options)
        cuda = device == "cuda"  # the driver resolves "auto" from the cluster's GPUs
        if not cuda:
            torch.set_num_threads(cpu_threads)
        self.cuda = cuda
        self.predictor = fcn.Predictor.from_checkpoint(
            checkpoint,
            device="cuda" if cuda else "cpu",
            bf16=precision == "bf16" or (precision == "auto" and cuda),
            channels_last=cuda,
        )
        self.class_names = checkpoint.class_names
        self.palette = checkpoint.palette
        self.max_image_pixels = max_image_pixels
        self.overlays = overlays
        self.tally = tally  # a Tally actor: the driver's progress counts images as they are segmented
        Image.MAX_IMAGE_PIXELS = None  # decode_image applies --max-image-pixels itself, naming the flag

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Decode every image of the batch, run the network on the decodable ones (equal sizes share
        forward passes), and return one row per image; any per-image failure becomes an error row."""
        rows = batch.drop_columns(["data"]).to_pylist()
        data = batch["data"]
        outs, decoded = [], []
        for i, row in enumerate(rows):
            out = {name: row[name] for name, _ in _SOURCE_COLUMNS}
            out.update(read_ms=row["read_ms"], status=stats_table.STATUS_ERROR, error=row["read_error"])
            outs.append(out)
            if out["error"] is not None:
                continue
            start = time.perf_counter()
            try:
                rgb = decode_image(data[i].as_py(), max_pixels=self.max_image_pixels)
            except Exception as error:  # noqa: BLE001 - DecodeError, or anything Pillow raises
                out["error"] = f"decode: {error}"
                continue
            out.update(height=rgb.shape[0], width=rgb.shape[1], decode_ms=(time.perf_counter() - start) * 1000)
            decoded.append((out, rgb))
        if decoded:
            start = time.perf_counter()
            predictions = self._predict([rgb for _, rgb in decoded])
            inference_ms = (time.perf_counter() - start) * 1000 / len(decoded)
            for (out, rgb), prediction in zip(decoded, predictions):
                out["inference_ms"] = inference_ms
                self._finish(out, rgb, prediction)
        self.tally.add.remote(len(outs))
        return pa.Table.from_pylist(outs, schema=_ACTOR_OUTPUT_SCHEMA)

    def _predict(self, images: list[np.ndarray]) -> list[Any]:
        """Predictions for ``images``; if the batch fails, each image alone (its exception in its place)."""
        try:
            return self.predictor.predict_batch(images, confidence=True)
        except Exception:  # noqa: BLE001 - isolate the image(s) that fail
            self._free_device_memory()
        results: list[Any] = []
        for rgb in images:
            try:
                results.append(self.predictor(rgb, confidence=True))
            except Exception as error:  # noqa: BLE001
                self._free_device_memory()
                results.append(error)
        return results

    def _finish(self, out: dict[str, Any], rgb: np.ndarray, prediction: Any) -> None:
        """Fill the statistics and encoded mask of an image into ``out`` (an error row on failure)."""
        if isinstance(prediction, Exception):
            out["error"] = f"inference: {type(prediction).__name__}: {prediction}"
            return
        start = time.perf_counter()
        try:
            result = self._statistics(prediction.labels, prediction.confidence)
            result["mask_png"] = encode_mask(prediction.labels, self.palette)
            if self.overlays:
                result["overlay_jpg"] = encode_overlay(rgb, prediction.labels, self.palette)
        except Exception as error:  # noqa: BLE001
            out["error"] = f"encode: {type(error).__name__}: {error}"
            return
        out.update(result, status=stats_table.STATUS_OK, error=None, write_ms=(time.perf_counter() - start) * 1000)

    def _free_device_memory(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.empty_cache()  # e.g. after an out-of-memory error on a huge image

    def _statistics(self, labels: np.ndarray, confidence: np.ndarray | None) -> dict[str, Any]:
        counts = np.bincount(labels.ravel(), minlength=len(self.class_names))
        dominant = int(counts.argmax())
        return {
            "pixel_counts": counts.tolist(),
            "class_fractions": (counts / labels.size).tolist(),
            "dominant_class": dominant,
            "dominant_class_name": self.class_names[dominant] if dominant < len(self.class_names) else None,
            "mean_confidence": None if confidence is None else float(confidence.mean(dtype=np.float64)),
        }


def write_outputs(
    batch: pa.Table,
    *,
    output: str,
    storage_options: dict[str, Any],
    run_id: str,
    model: ModelInfo,
    schema: pa.Schema,
) -> pa.Table:
    """Write the masks (and overlays) of the ok rows, then the batch's stats as one Parquet file
    (written whole). Returns ``image_uri``, ``status`` and ``error`` for the driver's progress."""
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    root = root.rstrip("/")
    rows = batch.drop_columns(["mask_png", "overlay_jpg"]).to_pylist()
    files: dict[str, bytes] = {}
    owners: dict[str, dict[str, Any]] = {}
    for row, mask, overlay in zip(rows, batch["mask_png"].to_pylist(), batch["overlay_jpg"].to_pylist()):
        if row["status"] != stats_table.STATUS_OK:
            continue
        mask_path = f"{root}/{MASKS_DIR}/{row['key']}.png"
        files[mask_path], owners[mask_path] = mask, row
        row["mask_uri"] = fs.unstrip_protocol(mask_path)
        if overlay is not None:
            overlay_path = f"{root}/{OVERLAYS_DIR}/{row['key']}.jpg"
            files[overlay_path], owners[overlay_path] = overlay, row
            row["overlay_uri"] = fs.unstrip_protocol(overlay_path)
    start = time.perf_counter()
    failures = _put_files(fs, files)
    write_ms = (time.perf_counter() - start) * 1000 / max(len(owners), 1)
    for path, reason in failures.items():
        row = owners[path]
        row.update(status=stats_table.STATUS_ERROR, error=f"write: {reason}", mask_uri=None, overlay_uri=None)
    now = datetime.now(timezone.utc)
    for row in rows:
        if row["status"] == stats_table.STATUS_OK:
            row["write_ms"] += write_ms  # encoding time (from the actor) + this batch's share of writing
        row.update(run_id=run_id, processed_at=now, model_id=model.uri, model_version=model.version)
    table = pa.Table.from_pylist(rows, schema=schema)
    stats_table.write_part(f"{output.rstrip('/')}/{STATS_DIR}", table, run_id, storage_options)
    return table.select(["image_uri", "status", "error"])


def _put_files(fs: fsspec.AbstractFileSystem, files: dict[str, bytes]) -> dict[str, str]:
    """Write all ``files`` (concurrently where the filesystem can); return {path: reason} of failures."""
    for parent in {path.rsplit("/", 1)[0] for path in files}:
        fs.makedirs(parent, exist_ok=True)
    try:
        fs.pipe(files)
        return {}
    except Exception:  # noqa: BLE001 - find out which ones failed, one by one
        failures = {}
        for path, data in files.items():
            try:
                fs.pipe_file(path, data)
            except Exception as error:  # noqa: BLE001
                failures[path] = f"{type(error).__name__}: {error}"
        return failures


# ---------------------------------------------------------------------------------------------
# Driver


def run_segmentation(config: SegmentConfig) -> SegmentSummary:
    """Run one segmentation job (see the module docstring). Raises ConfigError for bad parameters."""
    config.validate()
    started = datetime.now(timezone.utc)
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    so = config.storage_options
    out_fs, out_root = fsspec.core.url_to_fs(config.output, **so)
    output = out_fs.unstrip_protocol(out_root.rstrip("/"))
    stats_uri, masks_uri = f"{output}/{STATS_DIR}", f"{output}/{MASKS_DIR}"
    model = describe_model(config.model, so)
    try:
        listing = list_images(config.input, so, exclude=output)
    except InputError as error:
        raise ConfigError("--input", str(error)) from None
    except (OSError, ValueError) as error:
        raise ConfigError("--input", f"cannot list {config.input}: {type(error).__name__}: {error}") from None

    success_path = f"{out_root.rstrip('/')}/{SUCCESS_FILE}"
    if out_fs.exists(success_path):
        out_fs.rm_file(success_path)  # a stale marker must not vouch for this run's partial output
    done = stats_table.done_keys(stats_table.read_state(stats_uri, so), listing.images, model.uri, model.version)
    todo = [image for image in listing.images if image["key"] not in done]
    logger.info(
        "run %s: %d images at %s (%s), %d already done, %d to segment with %s",
        run_id, len(listing.images), listing.prefix or config.input, listing.kind, len(done), len(todo), model.label,
    )
    ok, error, errors, seconds = _segment_on_ray(config, todo, output, run_id, model) if todo else (0, 0, [], 0.0)

    state = stats_table.compact(stats_uri, so)
    missing = {image["key"] for image in listing.images} - set(state["key"].to_pylist())
    if missing:
        raise RuntimeError(f"{len(missing)} images have no stats row after the run (e.g. {sorted(missing)[:3]})")
    summary = SegmentSummary(
        run_id=run_id,
        input=config.input,
        output=output,
        model=model.label,
        model_id=model.uri,
        model_version=model.version,
        listed=len(listing.images),
        ok=ok,
        error=error,
        skipped=len(done),
        duration_s=round((datetime.now(timezone.utc) - started).total_seconds(), 3),
        images_per_second=round((ok + error) / seconds, 3) if seconds > 0 else 0.0,
        stats_uri=stats_uri,
        masks_uri=masks_uri,
        manifest_uri=f"{output}/{MANIFEST_FILE}",
        success_uri=f"{output}/{SUCCESS_FILE}",
        errors=errors,
    )
    manifest = {
        **asdict(summary),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {"uri": config.input, "prefix": listing.prefix, "kind": listing.kind, "ignored_files": listing.ignored},
        "model_arch": model.arch,
        "class_names": model.class_names,
        "stats_rows": state.num_rows,
        "config": {k: v for k, v in asdict(config).items() if k != "storage_options"},
    }
    stats_table.write_atomic(out_fs, f"{out_root.rstrip('/')}/{MANIFEST_FILE}", json.dumps(manifest, indent=2, default=str).encode())
    stats_table.write_atomic(out_fs, success_path, json.dumps({"run_id": run_id}).encode())
    logger.info("run %s finished: %d ok, %d error, %d skipped, %.2f images/s", run_id, ok, error, len(done), summary.images_per_second)
    return summary


def describe_model(uri: str, storage_options: dict[str, Any]) -> ModelInfo:
    """Resolve ``uri`` (a checkpoint, or a registry root: its champion) and read its description."""
    import fcn

    try:
        checkpoint = fcn.load_checkpoint(uri, storage_options=storage_options)  # resolves a registry's champion
    except (ValueError, OSError) as error:
        raise ConfigError("--model", str(error)) from None
    fs, path = fsspec.core.url_to_fs(checkpoint.uri, **storage_options)
    match = _REGISTRY_VERSION.search(path)
    if match:
        version = match.group(1)
    else:
        info = fs.info(path)
        etag = info.get("ETag") or info.get("etag")
        version = f"etag:{str(etag).strip(chr(34))}" if etag else f"size:{info['size']}-mtime:{info.get('mtime')}"
    return ModelInfo(
        uri=fs.unstrip_protocol(path),
        version=version,
        arch=checkpoint.arch,
        class_names=list(checkpoint.class_names),
        palette=list(checkpoint.palette),
    )


def _segment_on_ray(
    config: SegmentConfig, todo: list[dict[str, Any]], output: str, run_id: str, model: ModelInfo
) -> tuple[int, int, list[dict[str, str]], float]:
    """Stream ``todo`` through the Ray Data pipeline; return (ok, error, first errors, seconds)."""
    import ray

    from pipelines.ray_utils import connect

    connect(config.ray_address)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if config.device == "cuda" and not gpus:
        raise ConfigError("--device", "cuda requested but the Ray cluster has no GPUs")
    use_gpus = gpus > 0 and config.device != "cpu"
    actors = config.actors or (gpus if use_gpus else max(1, int(resources.get("CPU", 1) // config.cpus_per_actor)))
    io_tasks = max(2, actors)
    schema = stats_table.stats_schema(model.class_names, model.palette, {"uri": model.uri, "version": model.version, "arch": model.arch})
    logger.info("Ray: %d %s actor(s), batch size %d, cluster %s", actors, "GPU" if use_gpus else "CPU", config.batch_size, resources)

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # our own bar counts images, skips included
    tally = ray.remote(Tally).options(num_cpus=0).remote()
    sources = pa.Table.from_pylist(todo, schema=pa.schema(_SOURCE_COLUMNS))
    rows_per_block = max(config.batch_size, math.ceil(len(todo) / MAX_INPUT_BLOCKS))
    ds = ray.data.from_arrow([sources.slice(i, rows_per_block) for i in range(0, len(todo), rows_per_block)])
    ds = ds.map_batches(
        read_sources,
        batch_format="pyarrow",
        fn_kwargs={"storage_options": config.storage_options, "retries": config.read_retries},
        compute=ray.data.TaskPoolStrategy(size=io_tasks),
        num_cpus=0,  # I/O bound; concurrency is bounded by the task pool size
        udf_modifying_row_count=False,
    )
    ds = ds.map_batches(
        Segmenter,
        batch_format="pyarrow",
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1 if use_gpus else config.cpus_per_actor,
        num_gpus=1 if use_gpus else None,
        fn_constructor_kwargs={
            "model_uri": model.uri,
            "storage_options": config.storage_options,
            "tally": tally,
            "device": "cuda" if use_gpus else "cpu",
            "precision": config.precision,
            "cpu_threads": max(1, int(config.cpus_per_actor)),
            "max_image_pixels": config.max_image_pixels,
            "overlays": config.overlays,
        },
        udf_modifying_row_count=False,
    )
    ds = ds.map_batches(
        write_outputs,
        batch_format="pyarrow",
        batch_size=config.rows_per_file,
        fn_kwargs={"output": output, "storage_options": config.storage_options, "run_id": run_id, "model": model, "schema": schema},
        compute=ray.data.TaskPoolStrategy(size=io_tasks),
        num_cpus=0,
        udf_modifying_row_count=False,
    )
    start = time.monotonic()
    progress = Progress(len(todo), live=config.progress)
    stop = threading.Event()
    follower = threading.Thread(target=_follow_tally, args=(tally, progress, stop), name="progress", daemon=True)
    follower.start()
    errors: list[dict[str, str]] = []
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            status = batch["status"].to_pylist()
            n_ok = status.count(stats_table.STATUS_OK)
            if len(errors) < ERROR_SAMPLES:
                for uri, stat, reason in zip(batch["image_uri"].to_pylist(), status, batch["error"].to_pylist()):
                    if stat != stats_table.STATUS_OK and len(errors) < ERROR_SAMPLES:
                        errors.append({"image_uri": uri, "error": reason})
            progress.update(n_ok, len(status) - n_ok)
    finally:
        stop.set()
        follower.join()
        ray.kill(tally)
    progress.close()
    return progress.ok, progress.error, errors, time.monotonic() - start


def _follow_tally(tally: Any, progress: Progress, stop: threading.Event) -> None:
    """Until ``stop`` is set, copy the FCN actors' count of segmented images into ``progress``."""
    import ray

    while not stop.wait(LIVE_REFRESH_S):
        try:
            progress.set_segmented(ray.get(tally.get.remote(), timeout=10))
        except ray.exceptions.RayError:  # progress is informational: the next poll tries again
            continue


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    defaults = SegmentConfig(input="", output="", model="")
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.segment",
        description="Segment every image under a URI with an FCN on Ray; write indexed-PNG masks, "
        "Parquet statistics (one row per image), manifest.json and _SUCCESS under --output. "
        "Rerunning into the same output resumes: images already done are skipped.",
    )
    parser.add_argument("--input", required=True, help="prefix/folder, glob, or manifest file (one image URI per line); any fsspec URI")
    parser.add_argument("--output", required=True, help="output URI (masks/, stats/, manifest.json, _SUCCESS)")
    parser.add_argument("--model", required=True, help="checkpoint URI, or a model registry root (its champion is used)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    parser.add_argument("--actors", type=int, default=None, help="FCN actors (default: one per GPU, else one per --cpus-per-actor CPUs)")
    parser.add_argument("--cpus-per-actor", type=float, default=defaults.cpus_per_actor, help="CPUs (= torch threads) per CPU actor (default: %(default)s)")
    parser.add_argument("--device", choices=DEVICES, default=defaults.device, help="auto: CUDA if the cluster has GPUs (default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision, help="auto: bf16 on CUDA, fp32 on CPU (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per actor call (default: %(default)s)")
    parser.add_argument("--overlays", action="store_true", help="also write colour overlays to <output>/overlays/<key>.jpg")
    parser.add_argument("--storage-options", default="{}", metavar="JSON", help='fsspec options for --input, --output and --model, e.g. \'{"endpoint_url": "http://minio:9000"}\'')
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels, help="refuse images declaring more pixels (default: %(default)s)")
    parser.add_argument("--rows-per-file", type=int, default=defaults.rows_per_file, help="stats rows per Parquet part file (default: %(default)s)")
    parser.add_argument("--read-retries", type=int, default=defaults.read_retries, help="retries of a failed read (default: %(default)s)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="live progress bar (default: when stderr is a terminal)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit code 0 on a finished run, 2 for a bad parameter, 130 when interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        storage_options = json.loads(args.storage_options)
    except json.JSONDecodeError as error:
        parser.error(f"--storage-options: not valid JSON ({error})")
    config = SegmentConfig(
        **{k: v for k, v in vars(args).items() if k != "storage_options"}, storage_options=storage_options
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run_segmentation(config)
    except ConfigError as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (finished images are kept)", file=sys.stderr)
        return 130
    print(json.dumps(asdict(summary), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
