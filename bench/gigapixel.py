"""Benchmark: gigapixel tiled TIFFs through the segmentation job, window by window over the FCN actors.

For each size, a synthetic tiled RGB TIFF (JPEG tiles, BigTIFF above 4 GB raw) is generated band by band (one band
of 256 rows in memory, however big the image), then ``python -m pipelines.segment`` runs on it (a new local Ray
cluster each run, as a user starts it) while the resident memory of the job's whole process tree (driver, Ray's
daemons and workers) is sampled from /proc: RSS (shared pages, e.g. Ray's object store, counted in each process)
and PSS (shared pages split). A 512 x 512 run gives the fixed cost of a run. Prints per size: wall
time, time per megapixel (whole run, and beyond the 512 x 512 run's wall), peak memory and its excess over the
512 x 512 run, the windows and how many FCN actors took them (from the run's manifest); then each process group's
PSS at the peak (driver, Ray daemons, loaders, FCN actors, writers, other Ray workers), each process's own peak, and
Ray's object store counted whole (``--trace``: every sample per process, as JSON lines).

    .venv/bin/python -m bench.gigapixel --megapixels 10,100 --actors 2
    .venv/bin/python -m bench.gigapixel --megapixels 10,1000 --store s3 --actors 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import tifffile

from pipelines.common.processes import command_line, descendants, resident_bytes

BAND = 256
CLASSES = 4


def synthetic_tiles(height: int, width: int, seed: int = 0) -> Iterator[np.ndarray]:
    """The 256 x 256 tiles of a smooth synthetic scene (blocks of colour, a gradient, some noise), row by row,
    computed one band of ``BAND`` rows at a time."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (64, 3), dtype=np.uint8)
    for top in range(0, height, BAND):
        rows = np.arange(top, min(top + BAND, height))[:, None]
        columns = np.arange(width)[None, :]
        block = (rows // 300 * 7 + columns // 400 * 13) % len(colours)
        band = colours[block].astype(np.int16)
        band += ((columns * 31 // max(width, 1)) % 32).astype(np.int16)[..., None]
        band += rng.integers(-12, 12, band.shape, dtype=np.int16)
        band = np.clip(band, 0, 255).astype(np.uint8)
        for left in range(0, width, BAND):
            yield band[:, left : left + BAND]


def write_scene(uri: str, height: int, width: int) -> None:
    """A tiled JPEG-compressed RGB TIFF of ``height`` x ``width`` at ``uri``, written tile by tile."""
    with tempfile.TemporaryDirectory(prefix="gigapixel-") as folder:
        local = os.path.join(folder, "scene.tif")
        with tifffile.TiffWriter(local, bigtiff=height * width * 3 > 2**32 - 2**25) as writer:
            writer.write(
                synthetic_tiles(height, width),
                shape=(height, width, 3),
                dtype=np.uint8,
                tile=(BAND, BAND),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
            )
        fs, path = fsspec.core.url_to_fs(uri)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(local, path)


GROUPS = (("loaders", "ImageLoader"), ("FCN actors", "Segmenter"), ("writers", "ResultWriter"))
"""Ray Data's workers by the UDF in their process title (``ray::MapWorker(MapBatches(<UDF>))``)."""


def process_group(pid: int, job: int) -> str:
    """Which part of the job process ``pid`` is: the driver (``job``), a stage's workers, other Ray workers, or
    Ray's daemons (GCS, raylet with its object store, dashboard, agents)."""
    if pid == job:
        return "driver"
    title = command_line(pid)
    for group, udf in GROUPS:
        if udf in title:
            return group
    program = title.split(" ", 1)[0]
    worker = program.startswith("ray::") and not program.endswith("Agent") or program.endswith("default_worker.py")
    return "other Ray workers" if worker else "Ray daemons"


def tree_memory(pid: int) -> dict[int, tuple[str, int, int, int]]:
    """Per process of ``pid``'s tree: its group (``process_group``), resident bytes (RSS, shared pages counted in
    every process that maps them), proportional bytes (PSS, shared pages split between their processes) and the
    part of its PSS in shared memory (Ray's object store)."""
    processes = {}
    for current in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError, IndexError, ValueError):
            rss = resident_bytes(current)
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
            pss = int(rollup.split("\nPss:", 1)[1].split()[0]) * 1024
            shmem = int(rollup.split("\nPss_Shmem:", 1)[1].split()[0]) * 1024
            processes[current] = (process_group(current, pid), rss, pss, shmem)
    return processes


def object_store_bytes(processes: dict[int, tuple[str, int, int, int]]) -> int:
    """Bytes allocated in the shared-memory files Ray's daemons hold open (the raylet's object store): its pages
    stay resident once written, whether or not a process still maps them."""
    files = {}
    for pid, (group, *_) in processes.items():
        if group != "Ray daemons":
            continue
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd).startswith("/dev/shm/"):
                        stat = fd.stat()
                        files[stat.st_dev, stat.st_ino] = stat.st_blocks * 512
    return sum(files.values())


class MemorySampler:
    """Samples ``tree_memory`` of a job every ``period_s``: the tree's peak RSS and PSS, each group's PSS (and its
    shared-memory part) at the PSS peak, each process's own peak PSS, and the peak of the processes' private
    memory plus Ray's object store counted whole (``object_store_bytes``); with ``trace``, one JSON line per
    sample (seconds, PSS by process as ``group:pid``)."""

    def __init__(self, pid: int, period_s: float = 0.2, trace: str | None = None):
        self.pid, self.period_s, self.trace = pid, period_s, trace
        self.peak_rss = self.peak_pss = self.peak_private_and_store = self.peak_store = 0
        self.at_peak: dict[str, tuple[int, int]] = {}
        self.process_peaks: dict[tuple[str, int], int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        start = time.monotonic()
        with open(self.trace or os.devnull, "a") as trace:
            while not self.stop.wait(self.period_s):
                processes = tree_memory(self.pid)
                self.peak_rss = max(self.peak_rss, sum(rss for _, rss, _, _ in processes.values()))
                pss = sum(p for _, _, p, _ in processes.values())
                if pss > self.peak_pss:
                    self.peak_pss, self.at_peak = pss, {}
                    for group, _, p, shmem in processes.values():
                        old = self.at_peak.get(group, (0, 0))
                        self.at_peak[group] = (old[0] + p, old[1] + shmem)
                store = object_store_bytes(processes)
                private = sum(p - shmem for _, _, p, shmem in processes.values())
                self.peak_store = max(self.peak_store, store)
                self.peak_private_and_store = max(self.peak_private_and_store, private + store)
                for pid, (group, _, p, _) in processes.items():
                    self.process_peaks[group, pid] = max(self.process_peaks.get((group, pid), 0), p)
                if self.trace:
                    by_process = {f"{group}:{pid}": p >> 20 for pid, (group, _, p, _) in processes.items()}
                    sample = {"s": round(time.monotonic() - start, 1), "store_mb": store >> 20, "pss_mb": by_process}
                    trace.write(json.dumps(sample) + "\n")

    def breakdown(self) -> str:
        """Each group's PSS at the tree's PSS peak (its object-store share in brackets) and its processes' peaks."""
        lines = [
            f"    private memory + object store: peak {self.peak_private_and_store / 2**30:.2f} GiB "
            f"(object store alone: peak {self.peak_store / 2**30:.2f} GiB)"
        ]
        for group, (pss, shmem) in sorted(self.at_peak.items(), key=lambda item: -item[1][0]):
            peaks = sorted((p for (g, _), p in self.process_peaks.items() if g == group), reverse=True)
            lines.append(
                f"    {group:>17}: {pss / 2**30:.2f} GiB PSS at the peak ({shmem / 2**30:.2f} in shared memory); "
                f"process peaks {', '.join(f'{p / 2**30:.2f}' for p in peaks[:6])} GiB"
            )
        return "\n".join(lines)


def run_job(input: str, output: str, model: str, args: argparse.Namespace) -> dict:
    """Run the job's CLI on ``input``; wall seconds, peak resident bytes of its process tree, and its manifest."""
    command = [
        sys.executable,
        "-m",
        "pipelines.segment",
        f"--input={input}",
        f"--output={output}",
        f"--model={model}",
        f"--actors={args.actors}",
        f"--cpus-per-actor={args.cpus_per_actor}",
        f"--tile-size={args.tile_size}",
        f"--tile-pixels={args.tile_pixels}",
        "--no-progress",
    ]
    start = time.monotonic()
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    trace = f"{args.trace}-{os.path.basename(output)}.jsonl" if args.trace else None
    with MemorySampler(job.pid, trace=trace) as memory:
        _, stderr = job.communicate()
    wall = time.monotonic() - start
    if job.returncode != 0:
        raise SystemExit(f"the job failed ({job.returncode}):\n{stderr[-3000:]}")
    with fsspec.open(f"{output}/manifest.json") as f:
        manifest = json.load(f)
    return {
        "wall_s": wall,
        "peak_rss": memory.peak_rss,
        "peak_pss": memory.peak_pss,
        "memory": memory,
        "manifest": manifest,
    }


def describe_mask(output: str, classes: int) -> str:
    """The tiled mask under ``output`` as a TIFF reader sees it (layout, levels, a decoded tile from the middle of
    the full-resolution level and the overview); SystemExit if it is not a tiled mask of ``classes`` labels."""
    fs, path = fsspec.core.url_to_fs(output)
    masks = [found for found in fs.find(path) if found.endswith(".tif")]
    if len(masks) != 1:
        raise SystemExit(f"expected one tiled mask under {output}, found {masks}")
    with fs.open(masks[0], "rb") as file, tifffile.TiffFile(file) as tiff:
        levels = [level.keyframe for level in tiff.series[0].levels]
        page = levels[0]
        middle = len(page.dataoffsets) // 2
        file.seek(page.dataoffsets[middle])
        tile, _, _ = page.decode(file.read(page.databytecounts[middle]), middle)
        overview = tiff.series[0].levels[-1].asarray()
        labels = np.union1d(np.unique(tile), np.unique(overview))
        if not page.is_tiled or len(levels) < 2 or labels.max() >= classes:
            raise SystemExit(f"{masks[0]}: not a tiled mask with an overview of {classes} labels")
        return (
            f"    mask: {'BigTIFF' if tiff.is_bigtiff else 'TIFF'} {page.imagewidth}x{page.imagelength}, "
            f"{page.tilewidth}x{page.tilelength} {page.compression.name} tiles, levels "
            + ", ".join(f"{level.imagewidth}x{level.imagelength}" for level in levels)
            + f", labels in the middle tile and the overview: {labels.tolist()}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", default="10,100", help="sizes of the square test images, comma-separated")
    parser.add_argument("--store", choices=("file", "s3"), default="file", help="a temporary folder or loopback S3")
    parser.add_argument("--actors", type=int, default=2, help="FCN actors")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--width", type=float, default=1 / 16, help="network width (FCN-8s VGG16, random weights)")
    parser.add_argument("--tile-size", type=int, default=2048)
    parser.add_argument("--trace", help="write each run's per-process PSS samples to <TRACE>-out-<side>.jsonl")
    parser.add_argument("--tile-pixels", type=int, default=4_194_304, help="(the job's default: 16,777,216)")
    args = parser.parse_args()

    import fcn

    server = None
    with tempfile.TemporaryDirectory(prefix="gigapixel-bench-") as folder:
        if args.store == "s3":
            from bench.segment_throughput import start_s3

            server, _ = start_s3("bench.ranged_moto")  # moto, reading only the bytes a ranged GET asks for
            root = "s3://gigapixel-bench"
            fsspec.filesystem("s3").mkdir("gigapixel-bench")
        else:
            root = f"file://{folder}"
        try:
            model = fcn.save_checkpoint(
                fcn.get_model("fcn8s_vgg16", num_classes=CLASSES, width=args.width),
                f"{root}/model.pt",
                class_names=[f"class_{i}" for i in range(CLASSES)],
            )
            sizes = [("512x512", 512, 512)] + [
                (f"{mp:g} MP", side, side)
                for mp in (float(v) for v in args.megapixels.split(","))
                for side in [int(math.sqrt(mp * 1e6)) // 32 * 32]
            ]
            results = []
            for name, height, width in sizes:
                start = time.monotonic()
                write_scene(f"{root}/in-{height}/scene.tif", height, width)
                generated = time.monotonic() - start
                result = run_job(f"{root}/in-{height}", f"{root}/out-{height}", model, args)
                tiled = result["manifest"]["tiled_images"]
                results.append((name, height * width / 1e6, result, tiled))
                base = results[0][2]
                memory = result["memory"]
                megapixels = height * width / 1e6
                extra = result["wall_s"] - base["wall_s"]
                print(
                    f"{name:>10} ({width}x{height}, generated in {generated:.0f} s): wall {result['wall_s']:.1f} s, "
                    f"{result['wall_s'] / megapixels:.3f} s/MP ({extra / megapixels:.3f} s/MP beyond the 512x512 "
                    f"run), peak memory RSS {result['peak_rss'] / 2**30:.2f} GiB "
                    f"({(result['peak_rss'] - base['peak_rss']) / 2**30:+.2f} vs 512x512), "
                    f"PSS {result['peak_pss'] / 2**30:.2f} GiB ({(result['peak_pss'] - base['peak_pss']) / 2**30:+.2f}), "
                    f"private + object store {memory.peak_private_and_store / 2**30:.2f} GiB "
                    f"({(memory.peak_private_and_store - base['memory'].peak_private_and_store) / 2**30:+.2f}), "
                    + (
                        f"{tiled[0]['tiles']} windows by {tiled[0]['fcn_actors']} FCN actor(s), "
                        f"{'ok' if tiled[0]['error'] is None else tiled[0]['error']}"
                        if tiled
                        else "segmented whole"
                    ),
                    flush=True,
                )
                print(memory.breakdown(), flush=True)
                if tiled:
                    print(describe_mask(f"{root}/out-{height}/masks", CLASSES), flush=True)
                fs, path = fsspec.core.url_to_fs(f"{root}/in-{height}")
                fs.rm(path, recursive=True)  # keep the disk (or moto's memory) to one image at a time
        finally:
            if server is not None:
                server.terminate()
                server.wait()


if __name__ == "__main__":
    main()
