"""Benchmark: gigapixel tiled TIFFs through the segmentation job, window by window over the FCN actors.

For each size, a synthetic tiled RGB TIFF (JPEG tiles, BigTIFF above 4 GB raw) is generated band by band (one band
of 256 rows in memory, however big the image), then ``python -m pipelines.segment`` runs on it (a new local Ray
cluster each run, as a user starts it) while the resident memory of the job's whole process tree (driver, Ray's
daemons and workers) is sampled from /proc: RSS (shared pages, e.g. Ray's object store, counted in each process)
and PSS (shared pages split). A 512 x 512 run gives the fixed cost of a run. Prints per size: wall
time, time per megapixel (whole run, and beyond the 512 x 512 run's wall), peak memory and its excess over the
512 x 512 run, the windows and how many FCN actors took them (from the run's manifest).

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

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
BAND = 256


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


def tree_memory(pid: int) -> tuple[int, int]:
    """Resident bytes (RSS, shared pages counted in every process that maps them) and proportional bytes (PSS,
    shared pages split between their processes) of ``pid`` and every process under it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    rss, pss, pending = 0, 0, [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError, IndexError, ValueError):
            rss += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * PAGE_BYTES
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
            pss += int(rollup.split("\nPss:", 1)[1].split()[0]) * 1024
        pending.extend(children.get(current, []))
    return rss, pss


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
    peak = [0, 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak[:] = [max(a, b) for a, b in zip(peak, tree_memory(job.pid))]

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = job.communicate()
    stop.set()
    sampler.join()
    wall = time.monotonic() - start
    if job.returncode != 0:
        raise SystemExit(f"the job failed ({job.returncode}):\n{stderr[-3000:]}")
    with fsspec.open(f"{output}/manifest.json") as f:
        manifest = json.load(f)
    return {"wall_s": wall, "peak_rss": peak[0], "peak_pss": peak[1], "manifest": manifest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", default="10,100", help="sizes of the square test images, comma-separated")
    parser.add_argument("--store", choices=("file", "s3"), default="file", help="a temporary folder or loopback S3")
    parser.add_argument("--actors", type=int, default=2, help="FCN actors")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--width", type=float, default=1 / 16, help="network width (FCN-8s VGG16, random weights)")
    parser.add_argument("--tile-size", type=int, default=2048)
    parser.add_argument("--tile-pixels", type=int, default=4_194_304, help="(the job's default: 16,777,216)")
    args = parser.parse_args()

    import fcn

    server = None
    with tempfile.TemporaryDirectory(prefix="gigapixel-bench-") as folder:
        if args.store == "s3":
            from bench.segment_throughput import start_s3

            server, _ = start_s3()
            root = "s3://gigapixel-bench"
            fsspec.filesystem("s3").mkdir("gigapixel-bench")
        else:
            root = f"file://{folder}"
        try:
            model = fcn.save_checkpoint(
                fcn.get_model("fcn8s_vgg16", num_classes=4, width=args.width),
                f"{root}/model.pt",
                class_names=[f"class_{i}" for i in range(4)],
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
                megapixels = height * width / 1e6
                extra = result["wall_s"] - base["wall_s"]
                print(
                    f"{name:>10} ({width}x{height}, generated in {generated:.0f} s): wall {result['wall_s']:.1f} s, "
                    f"{result['wall_s'] / megapixels:.3f} s/MP ({extra / megapixels:.3f} s/MP beyond the 512x512 "
                    f"run), peak memory RSS {result['peak_rss'] / 2**30:.2f} GiB "
                    f"({(result['peak_rss'] - base['peak_rss']) / 2**30:+.2f} vs 512x512), "
                    f"PSS {result['peak_pss'] / 2**30:.2f} GiB ({(result['peak_pss'] - base['peak_pss']) / 2**30:+.2f}), "
                    + (
                        f"{tiled[0]['tiles']} windows by {tiled[0]['fcn_actors']} FCN actor(s), "
                        f"{'ok' if tiled[0]['error'] is None else tiled[0]['error']}"
                        if tiled
                        else "segmented whole"
                    ),
                    flush=True,
                )
                fs, path = fsspec.core.url_to_fs(f"{root}/in-{height}")
                fs.rm(path, recursive=True)  # keep the disk (or moto's memory) to one image at a time
        finally:
            if server is not None:
                server.terminate()
                server.wait()


if __name__ == "__main__":
    main()
