"""Benchmark: end-to-end segmentation throughput from a loopback S3 endpoint vs the bare model loop.

Starts moto's S3 server on 127.0.0.1, uploads synthetic JPEGs, then in one run:
  1. bare model loop: ``fcn.Predictor`` over the same images, already decoded, in this process
     (torch threads = all CPUs), on a sample before and after the pipeline (the mean is used);
  2. the pipeline: ``run_segmentation`` (S3 -> Ray Data -> FCN actors -> masks + Parquet on S3),
     while resident memory (RSS) of the driver and of every Ray worker process is sampled.
Prints images/s of both, their ratio (target >= 0.9), and the RSS samples (should stay flat).

    .venv/bin/python bench/segment_throughput.py            # 2,000 images, 128 px, FCN-8s width 1/16
    .venv/bin/python bench/segment_throughput.py --images 200 --size 128   # a quick look
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import socket
import threading
import time

import numpy as np


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def synthetic_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A smooth scene with a few rectangles and ellipses (compresses like a photo, not like noise)."""
    from PIL import Image, ImageDraw, ImageFilter

    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        x1, y1 = x0 + int(rng.integers(8, size // 2)), y0 + int(rng.integers(8, size // 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.filter(ImageFilter.GaussianBlur(1)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(root: int) -> dict[int, str]:
    """{pid: name} of every process below ``root`` (this driver's Ray cluster: gcs, raylet, workers)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                names[int(entry)] = f.read().split(b"\0")[0].decode(errors="replace")[:60]
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, stack = {}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found[child] = names.get(child, "?")
            stack.append(child)
    return found


def bare_loop(predictor, images: list[np.ndarray]) -> float:
    """Images per second of the model alone over already-decoded images."""
    start = time.perf_counter()
    for rgb in images:
        predictor(rgb, confidence=True)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--width", type=float, default=1 / 16, help="FCN-8s channel width multiplier")
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--cpus-per-actor", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bare-sample", type=int, default=200, help="images per bare-loop measurement")
    parser.add_argument("--rss-every", type=float, default=10.0, help="seconds between RSS samples")
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log lines
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        FSSPEC_S3_ENDPOINT_URL=endpoint, AWS_ENDPOINT_URL=endpoint,
    )
    import fsspec
    import ray
    import torch

    import fcn
    from pipelines.decode import decode_image
    from pipelines.segment import SegmentConfig, run_segmentation

    cpus = os.cpu_count() or 1
    fs = fsspec.filesystem("s3")
    fs.mkdir("bench")
    model_uri = "s3://bench/model.pt"
    fcn.save_checkpoint(fcn.get_model("fcn8s_vgg16", num_classes=21, width=args.width, geometry="aligned"), model_uri)
    rng = np.random.default_rng(0)
    files = {f"bench/images/{i // 500:02d}/img{i:05d}.jpg": synthetic_jpeg(rng, args.size) for i in range(args.images)}
    fs.pipe(files)
    print(f"uploaded {len(files)} JPEGs of {args.size}x{args.size} px "
          f"({sum(map(len, files.values())) / 1e6:.1f} MB) to {endpoint}; {cpus} CPUs")

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(cpus)
    predictor = fcn.Predictor.from_checkpoint(fcn.load_checkpoint(model_uri), device="cpu")
    sample = [decode_image(data, max_pixels=10**8) for data in list(files.values())[: args.bare_sample]]
    predictor(sample[0])  # warm-up
    bare_before = bare_loop(predictor, sample)
    print(f"bare model loop (before): {bare_before:.2f} images/s over {len(sample)} decoded images")

    config = SegmentConfig(
        input="s3://bench/images", output="s3://bench/out", model=model_uri, actors=args.actors,
        batch_size=args.batch_size, progress=False,
        **({"cpus_per_actor": args.cpus_per_actor} if args.cpus_per_actor else {}),
    )
    result: dict = {}
    driver_cpu = time.process_time()  # the driver process also hosts the moto S3 server
    worker = threading.Thread(target=lambda: result.update(summary=run_segmentation(config)))
    worker.start()
    print("RSS samples (MB): t, driver, Ray workers total, largest actor")
    started = time.monotonic()
    while worker.is_alive():
        procs = descendants(os.getpid())
        workers = {pid: name for pid, name in procs.items() if name.startswith("ray::")}
        actors = [rss_mb(pid) for pid, name in workers.items() if "MapWorker" in name]
        print(f"  {time.monotonic() - started:6.0f}s  {rss_mb(os.getpid()):7.0f}  "
              f"{sum(rss_mb(pid) for pid in workers):8.0f}  {max(actors, default=0):7.0f}", flush=True)
        worker.join(args.rss_every)
    summary = result["summary"]
    driver_cpu = time.process_time() - driver_cpu

    bare_after = bare_loop(predictor, sample)
    bare = (bare_before + bare_after) / 2
    stage_columns = ["read_ms", "decode_ms", "inference_ms", "write_ms"]
    stats = ray.data.read_parquet("s3://bench/out/stats").select_columns(["processed_at", "status", *stage_columns]).to_pandas()
    span = (stats["processed_at"].max() - stats["processed_at"].min()).total_seconds()
    first_batch = (stats["processed_at"] == stats["processed_at"].min()).sum()
    steady = (len(stats) - first_batch) / span if span > 0 else float("nan")
    print(f"bare model loop (after):  {bare_after:.2f} images/s")
    print(f"pipeline: {summary.ok} ok, {summary.error} error in {summary.duration_s:.1f} s")
    print("mean per image (ms): " + ", ".join(f"{c} {stats[c].mean():.1f}" for c in stage_columns)
          + f"; bare loop {1000 / bare:.1f}; driver + S3 server CPU {1000 * driver_cpu / len(stats):.1f}")
    print()
    print("| measure | images/s | ratio to bare loop |")
    print("|---|---|---|")
    print(f"| bare model loop (mean of before/after) | {bare:.2f} | 1.00 |")
    print(f"| pipeline end to end (incl. actor start-up) | {summary.images_per_second:.2f} | {summary.images_per_second / bare:.2f} |")
    print(f"| pipeline steady state (first to last Parquet write) | {steady:.2f} | {steady / bare:.2f} |")
    ray.shutdown()
    server.stop()


if __name__ == "__main__":
    main()
