"""The GPU acceptance check: one command that runs the project's CUDA paths and says, per target, pass or fail.

    python -m bench.gpu_acceptance --out results.json      # one CUDA GPU: ~4-6 min, always under 8
    python -m bench.gpu_acceptance --smoke --out r.json     # small sizes: what CI runs on a CPU (~1 min)

It needs torch, torchvision, pyarrow, fsspec, Pillow, scipy and numpy, run from the repository root (no
Ray, Prefect or s3fs; nothing is downloaded: networks are randomly initialised, images synthetic).

- **faults**: a forward hook makes the ``Segmenter``'s network raise a CUDA error that poisons the
  context (illegal address, device-side assert); the actor call must raise (Ray restarts the actor)
  rather than return error rows, while an ordinary exception still becomes the rows' ``error``.
- **segmenting**: the ``Segmenter`` stage on JPEGs left encoded by ``load_images`` (nvJPEG on the GPU),
  bf16 + channels_last, statistics on the device, FCN-8s VGG16 full width: images/s, the process's
  CPU ms per image, and label agreement and largest ``mean_confidence`` difference against the CPU fp32
  path (Pillow decoding) on a subset; the breakdown (nvJPEG, the network alone, fp32) and the CPU
  cost of the stages beside the actor (``load_images``, ``store_results``).
- **tiling**: a 20-megapixel image tiled on the GPU (time, peak GPU memory), and tiled == whole-image
  inference (fp32, TF32 off) on an image that fits whole.
- **training**: the training worker without Ray (NCCL, world size 1) for 2 epochs, then a resume from
  epoch 1 whose optimizer state was saved on the GPU: images/s and whether the data loader keeps the
  GPU busy (busy when waiting for batches takes < 10% of the step time).

The score layers of the random networks are fitted to a synthetic scene (trunk frozen), so that label
maps have structure and near-ties are as rare as in a trained net. Each section runs in its own process
within a time budget under one global deadline: a section that fails, hangs or crashes is reported with
its error and whatever figures it had, and ``--out`` is always written. Without CUDA (or with
``--smoke``) everything runs at small sizes on the CPU and the CUDA-only parts are reported as skipped.
Exit status 0 when the check ran (whatever the figures), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

FATAL_CUDA_ERRORS = (
    "CUDA error: an illegal memory access was encountered",
    "CUDA error: device-side assert triggered",
)
BUSY_WAIT_FRACTION = 0.10
"""The data loader keeps the GPU busy when waiting for batches takes less than this share of the step time."""
MAX_IMAGE_PIXELS = 10**9
NO_CUDA = "no CUDA"


@dataclass(frozen=True)
class Sizes:
    """The sizes of one run: ``FULL`` on a GPU, ``SMOKE`` on a CPU (or with ``--smoke``)."""

    width: float  # channel width multiplier of FCN-8s VGG16
    fit_steps: int  # steps fitting the score layers to a synthetic scene
    images: int  # JPEGs through the Segmenter
    image_size: int  # their side
    reference_images: int  # of which segmented on the CPU in fp32 too
    whole_image: tuple[int, int]  # (height, width) run whole and tiled
    tile_size: int  # the tile of that comparison
    large_image: tuple[int, int]  # (height, width) tiled on the GPU
    train_images: int
    train_size: tuple[int, int]  # min and max side of the training scenes
    train_geometry: str  # of the trained FCN-8s
    budgets_s: tuple[tuple[str, float], ...]  # nominal seconds per section, in running order
    deadline_s: float  # the whole check


FULL = Sizes(
    width=1.0,
    fit_steps=60,
    images=512,
    image_size=500,
    reference_images=16,
    whole_image=(1500, 2000),
    tile_size=1024,
    large_image=(4000, 5000),
    train_images=320,
    train_size=(320, 500),
    train_geometry="reference",
    budgets_s=(("faults", 30), ("segmenting", 200), ("tiling", 60), ("training", 130)),
    deadline_s=440,
)
SMOKE = Sizes(
    width=0.0625,
    fit_steps=30,
    images=16,
    image_size=64,
    reference_images=4,
    whole_image=(900, 1000),
    tile_size=896,
    large_image=(4000, 5000),
    train_images=8,
    train_size=(48, 64),
    train_geometry="aligned",
    budgets_s=(("faults", 60), ("segmenting", 90), ("tiling", 60), ("training", 90)),
    deadline_s=300,
)


class Section:
    """What one section found: figures, targets (value, rule, pass), skipped parts; saved on every change,
    so that a section stopped at its time limit still reports what it measured."""

    def __init__(self, name: str, path: str, deadline: float, sizes: Sizes) -> None:
        import torch

        self.name, self.path, self.sizes, self.deadline = name, path, sizes, deadline
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.data: dict[str, Any] = {
            "device": self.device.type,
            "figures": {},
            "targets": {},
            "skipped": {},
        }
        self.save()

    def workspace(self) -> str:
        """A folder for the section's files, beside its results (the parent removes them all at the end)."""
        return tempfile.mkdtemp(prefix=f"{self.name}-", dir=os.path.dirname(self.path))

    def remaining_s(self) -> float:
        """Seconds left before the parent stops this section (``deadline`` is a ``time.time()``)."""
        return self.deadline - time.time()

    def figure(self, name: str, value: Any) -> Any:
        self.data["figures"][name] = value
        self.save()
        print(
            f"  {self.name}: {name}: {value:.4g}" if isinstance(value, float) else f"  {self.name}: {name}: {value}",
            flush=True,
        )
        return value

    def target(self, name: str, value: float, rule: str, threshold: float) -> None:
        """Record ``value`` against ``rule`` (``>=``, ``<=`` or ``==``) ``threshold``."""
        passed = {
            ">=": value >= threshold,
            "<=": value <= threshold,
            "==": value == threshold,
        }[rule]
        self.data["targets"][name] = {
            "value": value,
            "target": f"{rule} {threshold}",
            "passed": bool(passed),
        }
        self.save()
        print(
            f"  {self.name}: {name}: {value} ({rule} {threshold}: {'pass' if passed else 'FAIL'})",
            flush=True,
        )

    def skip(self, part: str, reason: str) -> None:
        self.data["skipped"][part] = reason
        self.save()

    def save(self) -> None:
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(self.path + ".tmp", self.path)


# ---------------------------------------------------------------- shared pieces


def scene(seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic scene (RGB, labels) of exactly ``height`` x ``width``: drawn at a quarter of the size and
    enlarged, so that objects cover a realistic share of the frame."""
    from PIL import Image

    from pipelines.synthetic import render_scene

    small = max(16, min(height, width) // 4)
    image, label = render_scene(np.random.default_rng(seed), small, small, 6)
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))
    noise = np.random.default_rng(seed).normal(0.0, 4.0, image.shape)  # sensor noise at full resolution
    return np.clip(image + noise, 0, 255).astype(np.uint8), label


def jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def fitted_model(sizes: Sizes, device: Any, size: int) -> Any:
    """FCN-8s VGG16 (aligned geometry, ``sizes.width``), random trunk, score layers fitted to a scene."""
    import torch

    from bench.model_throughput import fit_score_layers
    from fcn import get_convention, get_model
    from pipelines.synthetic import SYNTHETIC_CLASSES

    torch.manual_seed(0)
    model = get_model(
        "fcn8s_vgg16",
        num_classes=len(SYNTHETIC_CLASSES),
        width=sizes.width,
        geometry="aligned",
    )
    model = model.to(device)
    image, label = scene(0, size, size)
    x = get_convention("torchvision").to_tensor(image, device)[None]
    target = torch.from_numpy(label.astype(np.int64))[None].to(device)
    fit_score_layers(model, x, target, sizes.fit_steps)
    return model.cpu().eval()


def save_model(model: Any, folder: str) -> str:
    from fcn.checkpoint import save_checkpoint
    from pipelines.synthetic import SYNTHETIC_CLASSES

    return save_checkpoint(model, f"{folder}/model.pt", class_names=list(SYNTHETIC_CLASSES))


def write_jpegs(folder: str, images: list[bytes]) -> Any:
    """Write ``images`` under ``folder`` and list them as the segmentation job does (its source table)."""
    from pipelines.segment.listing import list_images

    os.makedirs(folder, exist_ok=True)
    for i, data in enumerate(images):
        with open(f"{folder}/img{i:04d}.jpg", "wb") as f:
            f.write(data)
    return list_images(folder, {}).images


def load(sources: Any, *, device_jpegs: bool) -> Any:
    from pipelines.segment.load import load_images

    return load_images(
        sources,
        storage_options={},
        retries=0,
        max_image_pixels=MAX_IMAGE_PIXELS,
        device_jpegs=device_jpegs,
    )


def segmenter(model_uri: str, device: str, precision: str) -> Any:
    """The FCN actor as the segmentation job builds it."""
    from pipelines.segment.infer import Segmenter

    return Segmenter(
        model_uri=model_uri,
        storage_options={},
        device=device,
        precision=precision,
        cpu_threads=os.cpu_count() or 1,
        max_image_pixels=MAX_IMAGE_PIXELS,
        keep_pixels=False,
    )


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- sections


def check_faults(section: Section) -> None:
    """A poisoned CUDA context ends the actor call with an exception, and with the Ray job's
    ``exit_on_fatal_error`` the actor's process; an ordinary failure becomes error rows."""
    import multiprocessing

    from fcn import get_model
    from pipelines.synthetic import SYNTHETIC_CLASSES

    folder = section.workspace()
    network = get_model("fcn8s_vgg16", num_classes=len(SYNTHETIC_CLASSES), width=SMOKE.width)  # any network
    model_uri = save_model(network, folder)
    sources = write_jpegs(f"{folder}/in", [jpeg(scene(seed, 64, 64)[0]) for seed in range(2)])
    # as the Ray job runs the actor (started first: it imports torch meanwhile): the process must end, so
    # that Ray restarts the actor with a fresh CUDA context and retries the batch
    spawn = multiprocessing.get_context("spawn")
    outcomes = spawn.Queue()
    process = spawn.Process(
        target=poisoned_actor_process,
        args=(model_uri, sources, section.device.type, outcomes),
    )
    process.start()

    actor = segmenter(model_uri, section.device.type, "auto")
    for message in FATAL_CUDA_ERRORS:
        result = section.figure(
            f"simulated '{message}'",
            segment_with_fault(actor, sources, RuntimeError(message)),
        )
        section.target(
            f"'{message}' ends the actor call",
            float(result.startswith("raised")),
            "==",
            1.0,
        )
    ordinary = segment_with_fault(actor, sources, RuntimeError("shape mismatch in a layer"))
    section.figure("simulated ordinary RuntimeError", ordinary)
    section.target(
        "an ordinary error becomes error rows",
        float(" error rows" in ordinary),
        "==",
        1.0,
    )
    after = actor(load(sources, device_jpegs=section.cuda))
    section.target(
        "error rows once the fault is gone",
        after.num_rows - after["error"].null_count,
        "==",
        0,
    )

    process.join(max(5.0, section.remaining_s() - 2))
    if process.exitcode is None:
        process.kill()
        process.join()
    returned = "nothing" if outcomes.empty() else outcomes.get()
    section.figure(
        "exit_on_fatal_error: the actor's process",
        f"exit status {process.exitcode}, returned {returned}",
    )
    section.target(
        "exit_on_fatal_error: the process ends, returning nothing",
        float(process.exitcode not in (0, None) and returned == "nothing"),
        "==",
        1.0,
    )


def segment_with_fault(actor: Any, sources: Any, error: Exception) -> str:
    """What ``actor`` does with ``sources`` while its network raises ``error``: raised, or error rows."""

    def fail(*_: Any) -> None:
        raise error

    loaded = load(sources, device_jpegs=actor.cuda)
    hook = actor.predictor.model.register_forward_hook(fail)
    try:
        out = actor(loaded)
    except Exception as raised:
        return f"raised {type(raised).__name__}: {raised}"
    finally:
        hook.remove()
    errors = [e for e in out["error"].to_pylist() if e is not None]
    return f"{len(errors)} of {out.num_rows} rows became error rows: {errors[:1]}"


def poisoned_actor_process(model_uri: str, sources: Any, device: str, outcomes: Any) -> None:
    """A spawned process: the actor with ``exit_on_fatal_error`` meets an illegal address; puts what it returned."""
    from pipelines.segment.infer import Segmenter

    actor = Segmenter(
        model_uri=model_uri,
        storage_options={},
        device=device,
        precision="auto",
        cpu_threads=1,
        max_image_pixels=MAX_IMAGE_PIXELS,
        keep_pixels=False,
        exit_on_fatal_error=True,
    )
    outcomes.put(segment_with_fault(actor, sources, RuntimeError(FATAL_CUDA_ERRORS[0])))


def check_segmenting(section: Section) -> None:
    """The FCN actor on the device against the CPU fp32 path; the breakdown and the CPU stages beside it."""
    import pyarrow as pa

    from pipelines.segment.config import SegmentConfig

    sizes, device = section.sizes, section.device
    folder = section.workspace()
    start = time.perf_counter()
    jpegs = [jpeg(scene(seed, sizes.image_size, sizes.image_size)[0]) for seed in range(sizes.images)]
    sources = write_jpegs(f"{folder}/in", jpegs)
    section.figure(
        "images",
        f"{sizes.images} JPEGs of {sizes.image_size}x{sizes.image_size}, "
        f"{np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB on average",
    )
    model_uri = save_model(fitted_model(sizes, device, sizes.image_size), folder)
    section.figure("network", f"fcn8s_vgg16 aligned, width {sizes.width}, score layers fitted")
    section.figure("setup s", round(time.perf_counter() - start, 1))

    cpu_start = time.process_time()
    left_to_actor = load(sources, device_jpegs=True)
    section.figure(
        "load_images CPU ms/image (JPEGs left to the actor)",
        (time.process_time() - cpu_start) * 1000 / sources.num_rows,
    )
    cpu_start = time.process_time()
    decoded = load(sources, device_jpegs=False)
    section.figure(
        "load_images CPU ms/image (Pillow decode)",
        (time.process_time() - cpu_start) * 1000 / sources.num_rows,
    )

    # the actor on the device: nvJPEG, bf16 autocast, channels_last, statistics on the device
    actor = segmenter(model_uri, device.type, "bf16")
    predictor = actor.predictor
    section.figure(
        "actor precision",
        f"bf16={predictor.bf16}, channels_last={predictor.channels_last}",
    )
    batch_size = SegmentConfig().batch_size
    actor(left_to_actor.slice(0, batch_size))  # warm-up
    outputs = []
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for offset in range(0, left_to_actor.num_rows, batch_size):
        outputs.append(actor(left_to_actor.slice(offset, batch_size)))
    sync(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    segmented = pa.concat_tables(outputs)
    section.figure(f"actor images/s (batch {batch_size})", sizes.images / wall)
    section.figure("actor process CPU ms/image", cpu * 1000 / sizes.images)
    section.target("error rows", segmented.num_rows - segmented["error"].null_count, "==", 0)

    # the CPU fp32 path (Pillow decoding) on a subset, as many images as the budget allows
    reference_actor = segmenter(model_uri, "cpu", "fp32")
    reserve_s = 0.25 * section.remaining_s()  # for the breakdown after it
    references, seconds = [], []
    while len(references) < sizes.reference_images and (
        not seconds or section.remaining_s() - reserve_s > 1.5 * max(seconds)
    ):
        started = time.perf_counter()
        references.append(reference_actor(decoded.slice(len(references), 1)))
        seconds.append(time.perf_counter() - started)
    reference = pa.concat_tables(references)
    count = reference.num_rows
    section.figure("CPU fp32 reference images", count)
    section.figure("CPU fp32 s/image", float(np.median(seconds)))
    agreement, confidence = compare(segmented.slice(0, count), reference)
    section.target("label agreement with CPU fp32", agreement, ">=", 0.995)
    section.target("largest mean_confidence difference", confidence, "<=", 0.005)
    if device.type == "cuda":  # the network's numerics alone: bf16 on the GPU from the same Pillow pixels
        agreement, confidence = compare(actor(decoded.slice(0, count)), reference)
        section.figure("label agreement, same Pillow pixels (network numerics alone)", agreement)
        section.figure("largest mean_confidence difference, same Pillow pixels", confidence)

    breakdown(section, actor, jpegs, batch_size, model_uri)
    store_cpu(section, segmented, model_uri, f"{folder}/out")


def compare(segmented: Any, reference: Any) -> tuple[float, float]:
    """(share of equal labels, largest |mean_confidence difference|) between two Segmenter outputs."""
    equal = total = 0
    for ours, theirs in zip(segmented["labels"].to_pylist(), reference["labels"].to_pylist(), strict=True):
        a, b = np.frombuffer(ours, np.uint8), np.frombuffer(theirs, np.uint8)
        equal, total = equal + int((a == b).sum()), total + a.size
    ours, theirs = (np.array(table["mean_confidence"].to_pylist()) for table in (segmented, reference))
    differences = np.abs(ours - theirs)
    return equal / total, float(differences.max())


def breakdown(
    section: Section,
    actor: Any,
    jpegs: list[bytes],
    batch_size: int,
    model_uri: str,
) -> None:
    """nvJPEG against Pillow, and the network alone in bf16 and in fp32, at the actor's batch size."""
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    import fcn

    started = time.perf_counter()
    pixels = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in jpegs]
    section.figure("Pillow decode images/s (1 core)", len(jpegs) / (time.perf_counter() - started))
    if not section.cuda:
        section.skip("nvJPEG decoding, network alone on the GPU", NO_CUDA)
        return
    device = section.device
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    batches = [encoded[k : k + batch_size] for k in range(0, len(encoded), batch_size)]
    decode_jpeg(batches[0], mode=ImageReadMode.RGB, device=device)
    sync(device)
    started = time.perf_counter()
    tensors = [t for batch in batches for t in decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)]
    sync(device)
    section.figure(
        f"nvJPEG decode images/s (batches of {batch_size})",
        len(jpegs) / (time.perf_counter() - started),
    )
    differences = np.concatenate(
        [np.abs(t.permute(1, 2, 0).cpu().numpy().astype(int) - p).ravel() for t, p in zip(tensors, pixels)]
    )
    section.figure("nvJPEG vs Pillow pixels: mean |difference|", float(differences.mean()))
    section.figure("nvJPEG vs Pillow pixels: max |difference|", int(differences.max()))
    fp32 = fcn.Predictor.from_checkpoint(model_uri, device=device)
    for name, predictor in (
        ("bf16 + channels_last", actor.predictor),
        ("fp32 (TF32 convolutions)", fp32),
    ):
        chunks = [tensors[k : k + batch_size] for k in range(0, len(tensors), batch_size)]
        predictor.predict_batch(chunks[0], statistics=True)
        sync(device)
        done, started = 0, time.perf_counter()
        for chunk in chunks:
            if section.remaining_s() < 10:
                break
            predictor.predict_batch(chunk, statistics=True)
            done += len(chunk)
        sync(device)
        section.figure(
            f"network alone {name} images/s (batch {batch_size})",
            done / (time.perf_counter() - started),
        )


def store_cpu(section: Section, segmented: Any, model_uri: str, output: str) -> None:
    """CPU ms per image of ``store_results`` (PNG masks, Parquet) on the actor's output."""
    from pipelines.segment.model import describe_model
    from pipelines.segment.schema import stats_schema
    from pipelines.segment.write import store_results

    info = describe_model(model_uri, {})
    schema = stats_schema(info.class_names, info.palette, {})
    started = time.process_time()
    store_results(
        segmented,
        output=output,
        storage_options={},
        run_id="acceptance",
        model=info,
        schema=schema,
        retries=0,
    )
    section.figure(
        "store_results CPU ms/image",
        (time.process_time() - started) * 1000 / segmented.num_rows,
    )


def check_tiling(section: Section) -> None:
    """Tiled == whole-image inference on an image that fits (fp32, TF32 off); a 20 MP image tiled on the GPU."""
    import torch

    import fcn

    sizes, device = section.sizes, section.device
    model = fitted_model(sizes, device, sizes.image_size)
    height, width = sizes.whole_image
    image = scene(1, height, width)[0]
    allow_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        whole = fcn.Predictor(model, device=device, max_pixels=height * width)(image, confidence=True)
        tiled_predictor = fcn.Predictor(
            model,
            device=device,
            max_pixels=sizes.tile_size**2,
            tile_size=sizes.tile_size,
        )
        tiled = tiled_predictor(image, confidence=True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    section.figure(
        "equality image",
        f"{width}x{height}, tiles of {tiled_predictor.tile_size} px, fp32",
    )
    section.figure("differing labels (pixels)", int((tiled.labels != whole.labels).sum()))
    section.target(
        "tiled == whole: label agreement",
        float((tiled.labels == whole.labels).mean()),
        ">=",
        0.9999,
    )
    section.target(
        "tiled == whole: largest confidence difference",
        float(np.abs(tiled.confidence - whole.confidence).max()),
        "<=",
        1e-4,
    )
    if not section.cuda:
        section.skip(
            f"{sizes.large_image[1]}x{sizes.large_image[0]} image tiled on the GPU",
            NO_CUDA,
        )
        return
    height, width = sizes.large_image
    large = scene(2, height, width)[0]
    predictor = fcn.Predictor(model, device=device, bf16=True, channels_last=True)  # as the FCN actor runs it
    predictor(large[:2048, :2048], statistics=True)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sync(device)
    started = time.perf_counter()
    result = predictor(large, statistics=True)
    sync(device)
    seconds = time.perf_counter() - started
    section.figure(
        "large image",
        f"{width}x{height} ({width * height / 1e6:.0f} MP), bf16 + channels_last, tiles of {predictor.tile_size} px",
    )
    section.figure("large image s", seconds)
    section.figure(
        "large image peak GPU memory GiB",
        (torch.cuda.max_memory_allocated() - base) / 2**30,
    )
    section.figure("large image megapixels/s", height * width / 1e6 / seconds)
    counted = int(result.pixel_counts.sum())
    section.target("large image: the tiles' statistics count every pixel once", counted, "==", height * width)


def check_training(section: Section) -> None:
    """The training worker without Ray (NCCL on CUDA, gloo on the CPU; world size 1) for 2 epochs, then the
    same run resumed from epoch 1, whose optimizer state was saved on the training device."""
    import shutil
    import socket

    import torch
    import torch.distributed as dist

    from pipelines.synthetic import write_synthetic_voc
    from pipelines.train.config import TrainConfig
    from pipelines.train.context import LocalWorkerContext, run_folder
    from pipelines.train.datasets import open_dataset
    from pipelines.train.prepare import make_loop_config
    from pipelines.train.worker import loader_workers, run_training_worker

    sizes = section.sizes
    device = torch.device("cuda", torch.cuda.current_device()) if section.cuda else section.device  # NCCL: an index
    folder = section.workspace()
    write_synthetic_voc(
        f"{folder}/data",
        num_images=sizes.train_images,
        min_size=sizes.train_size[0],
        max_size=sizes.train_size[1],
    )
    config = TrainConfig(
        data=f"{folder}/data",
        registry=f"{folder}/registry",
        model="fcn8s_vgg16",
        workers=1,
        gpus_per_worker=1 if section.cuda else 0,
        cpus_per_worker=os.cpu_count() or 1,
        epochs=2,
        width=sizes.width,
        geometry=sizes.train_geometry,
        run_name="acceptance",
    )
    config.validate()
    data = open_dataset(config.data)
    section.figure(
        "data",
        f"{len(data.train)} train + {len(data.val)} val synthetic scenes of "
        f"{sizes.train_size[0]}-{sizes.train_size[1]} px, batch size {config.batch_size}, "
        f"{loader_workers(config, device)} data loader processes",
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = "nccl" if section.cuda else "gloo"
    extra = {"device_id": device} if section.cuda else {}  # binds NCCL's communicator to the GPU
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, **extra)
    try:
        section.figure("process group", f"{dist.get_backend()}, world size {dist.get_world_size()}")
        probe_tensor = torch.ones(4, device=device)
        dist.all_reduce(probe_tensor)  # at world size 1 the worker runs no collectives: one probe of the backend
        section.figure("all_reduce probe on the device", float(probe_tensor.sum()))

        run = run_folder(config.registry, "acceptance")
        context = LocalWorkerContext(run, device)
        started = time.perf_counter()
        run_training_worker(make_loop_config(config, data), context)
        section.figure("2 epochs s (with validation)", time.perf_counter() - started)
        epochs = {metrics["epoch"]: metrics for _, metrics in context.reports}
        for epoch, metrics in epochs.items():
            section.figure(f"epoch {epoch}: train loss", metrics["train_loss"])
            section.figure(f"epoch {epoch}: train images/s", metrics["train_images_per_s"])
            section.figure(
                f"epoch {epoch}: share of step time waiting for batches",
                metrics["loader_wait_fraction"],
            )
        last = epochs[config.epochs]
        if section.cuda:
            section.target(
                "data loader keeps the GPU busy: waiting share of epoch 2",
                last["loader_wait_fraction"],
                "<=",
                BUSY_WAIT_FRACTION,
            )
        else:
            section.skip("data loader keeps the GPU busy", NO_CUDA)

        # resume from epoch 1: a copy of the run holding only its first epoch folder
        locations: set[str] = set()
        torch.load(
            f"{run}/epoch-0001/train_state.pt",
            weights_only=True,
            map_location=lambda storage, location: locations.add(location) or storage,
        )
        section.figure("optimizer state saved on", sorted(locations))
        if section.cuda:  # the premise of the resume check
            section.target(
                "optimizer state saved on the GPU",
                float(any("cuda" in location for location in locations)),
                "==",
                1.0,
            )
        resumed_run = run_folder(config.registry, "acceptance-resumed")
        shutil.copytree(f"{run}/epoch-0001", f"{resumed_run}/epoch-0001")
        resumed = LocalWorkerContext(resumed_run, device)
        run_training_worker(
            make_loop_config(TrainConfig(**{**vars(config), "run_name": "acceptance-resumed"}), data),
            resumed,
        )
        reported = [metrics for _, metrics in resumed.reports]
        section.target(
            "resumed from epoch 1, trained epoch 2 only",
            float([(m["resumed_from_epoch"], m["epoch"]) for m in reported] == [(1, 2)]),
            "==",
            1.0,
        )
        loss = reported[-1]["train_loss"]
        section.figure("resumed epoch 2: train loss", loss)
        section.figure(
            "resumed epoch 2 vs uninterrupted: relative loss difference",
            abs(loss - last["train_loss"]) / abs(last["train_loss"]),
        )
        section.target("resumed epoch 2: finite loss", float(np.isfinite(loss)), "==", 1.0)
    finally:
        dist.destroy_process_group()


CHECKS: dict[str, Callable[[Section], None]] = {
    "faults": check_faults,
    "segmenting": check_segmenting,
    "tiling": check_tiling,
    "training": check_training,
}


# ---------------------------------------------------------------- running the sections


def run_section(name: str, path: str, deadline: float, sizes: Sizes) -> int:
    """Child process: run one section, recording its figures (and its error) in ``path``."""
    section = Section(name, path, deadline, sizes)
    try:
        CHECKS[name](section)
    except Exception:
        section.data["error"] = traceback.format_exc(limit=-8)
        section.save()
        return 1
    return 0


def run_all(sizes: Sizes, out: str, deadline_s: float, only: list[str]) -> dict[str, Any]:
    """Every section in its own process under the global deadline; the results, written to ``out`` as they come."""
    import torch
    import torchvision

    started = time.monotonic()
    cuda = torch.cuda.is_available()
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU only ({NO_CUDA})",
        "cuda": cuda,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "sizes": asdict(sizes),
        "deadline_s": deadline_s,
        "sections": {},
    }
    nominal = dict(sizes.budgets_s)
    order = [name for name, _ in sizes.budgets_s if name in only]
    with tempfile.TemporaryDirectory(prefix="acceptance-", ignore_cleanup_errors=True) as folder:
        for index, name in enumerate(order):
            remaining = deadline_s - (time.monotonic() - started)
            later = sum(nominal[n] for n in order[index + 1 :])
            budget = min(remaining, max(nominal[name], remaining - later))
            entry: dict[str, Any] = {"budget_s": round(budget, 1)}
            if budget < 5:
                entry.update(status="skipped", reason="no time left before the deadline")
            else:
                entry.update(run_child(name, f"{folder}/{name}.json", budget, sizes is SMOKE))
            results["sections"][name] = entry
            write_json(out, results)
    results["wall_s"] = round(time.monotonic() - started, 1)
    results["passed"] = all(s["status"] == "passed" for s in results["sections"].values())
    write_json(out, results)
    return results


def run_child(name: str, path: str, budget: float, smoke: bool) -> dict[str, Any]:
    """Run section ``name`` in a child process stopped at ``budget`` seconds; its entry of the results."""
    command = [
        sys.executable,
        "-m",
        "bench.gpu_acceptance",
        "--section",
        name,
        "--section-out",
        path,
        "--section-deadline",
        f"{time.time() + budget - 1:.1f}",
    ] + (["--smoke"] if smoke else [])
    started = time.monotonic()
    print(f"== {name} (budget {budget:.0f} s)", flush=True)
    with tempfile.TemporaryFile("w+") as stderr:
        try:
            code: int | str = subprocess.run(command, stderr=stderr, timeout=budget, check=False).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        stderr.seek(0)
        stderr_tail = stderr.read()[-3000:]
    entry: dict[str, Any] = {"wall_s": round(time.monotonic() - started, 1)}
    try:
        with open(path) as f:
            entry.update(json.load(f))
    except (OSError, ValueError):
        entry["figures"], entry["targets"], entry["skipped"] = {}, {}, {}
    failed_targets = [t for t, v in entry["targets"].items() if not v["passed"]]
    if code == "timeout":
        entry.update(
            status="timeout",
            error=f"stopped after its budget of {budget:.0f} s\n{stderr_tail}",
        )
    elif code != 0:
        entry["status"] = "error"
        entry.setdefault("error", f"exit status {code}\n{stderr_tail}")
    else:
        entry["status"] = "failed" if failed_targets else "passed"
    if failed_targets:
        entry["failed_targets"] = failed_targets
    return entry


def write_json(path: str, results: dict[str, Any]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def print_table(results: dict[str, Any]) -> None:
    print(
        f"\ndevice: {results['device']}; torch {results['torch']}, torchvision {results['torchvision']}, "
        f"{results['wall_s']} s"
    )
    print("| section | measure | value | target | result |\n|---|---|---|---|---|")
    for name, section in results["sections"].items():
        print(f"| **{name}** | status | {section['status']} ({section.get('wall_s', 0)} s) | | |")
        for measure, value in section.get("figures", {}).items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            print(f"| {name} | {measure} | {shown} | | |")
        for measure, value in section.get("targets", {}).items():
            shown = f"{value['value']:.6g}" if isinstance(value["value"], float) else value["value"]
            verdict = "pass" if value["passed"] else "FAIL"
            print(f"| {name} | {measure} | {shown} | {value['target']} | {verdict} |")
        for part, reason in section.get("skipped", {}).items():
            print(f"| {name} | {part} | skipped: {reason} | | |")
        if section.get("error"):
            print(f"| {name} | error | {section['error'].strip().splitlines()[-1]} | | |")
    print(f"\nall targets passed: {results['passed']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_acceptance.json", help="results file (JSON)")
    parser.add_argument("--smoke", action="store_true", help="small sizes (always so without CUDA)")
    parser.add_argument("--deadline-s", type=float, default=None, help="the whole check's time limit")
    parser.add_argument(
        "--sections",
        default=",".join(CHECKS),
        help="comma-separated subset of " + ",".join(CHECKS),
    )
    parser.add_argument("--section", choices=list(CHECKS), help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--section-out", help=argparse.SUPPRESS)
    parser.add_argument("--section-deadline", type=float, help=argparse.SUPPRESS)  # a time.time()
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {list(CHECKS)}")
    import torch

    sizes = SMOKE if args.smoke or not torch.cuda.is_available() else FULL
    if args.section:
        return run_section(args.section, args.section_out, args.section_deadline, sizes)
    results = run_all(sizes, args.out, args.deadline_s or sizes.deadline_s, only)
    print_table(results)
    print(f"results: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
