"""Benchmark: the segmentation job against the bare model and a plain loop doing the same work, in one run.

On ``file://`` (a temporary folder) or loopback S3 (moto's server in its own process), with synthetic JPEGs:
  1. bare model: ``fcn.Predictor`` over already-decoded images, in this process (torch on all CPUs);
  2. plain loop: for each image read the bytes, decode, predict (with statistics), encode the PNG mask,
     write it; one Parquet file at the end: the same work as the job, in one Python thread;
  3. the job: ``run_segmentation`` on a new local Ray cluster (started inside the run, so end to end
     includes Ray's start-up), while the CPU time of every process is sampled and grouped: FCN actors,
     other Ray workers (load/store tasks), Ray's own processes (raylet, GCS, agents), the driver, the
     S3 server.
Prints images/s of each (the job: steady state and end to end), their ratios, mean per-image stage
times from the Parquet rows, and CPU milliseconds per image by process group. On S3 it then prints the
client's and the server's CPU per GET and per PUT of a 40 KB object, s3fs against the job's obstore path
(``bench.object_store``).

    .venv/bin/python -m bench.segment_throughput --store file --images 1500 --size 128 --width 0.0625
    .venv/bin/python -m bench.segment_throughput --store file --images 300 --size 256 --width 0.25
    .venv/bin/python -m bench.segment_throughput --store s3 --images 1500 --size 128 --width 0.0625
    .venv/bin/python -m bench.segment_throughput --store file --images 5000 --size 8   # CPU outside the network
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict

import numpy as np

from pipelines.common.processes import command_line, cpu_seconds, descendants


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
        x1, y1 = x0 + int(rng.integers(1, max(2, size // 2))), y0 + int(rng.integers(1, max(2, size // 2)))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.filter(ImageFilter.GaussianBlur(1)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def start_s3(server_module: str = "moto.server") -> tuple[subprocess.Popen, str]:
    """moto's S3 server (or ``server_module``, run the same way) on loopback in its own process (so its CPU is
    counted apart)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", server_module, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        FSSPEC_S3_ENDPOINT_URL=endpoint,
        AWS_ENDPOINT_URL=endpoint,
    )
    return server, endpoint


def group_of(pid: int, cmdline: str, me: int, s3_pid: int | None) -> str:
    if pid == me:
        return "driver"
    if pid == s3_pid:
        return "S3 server"
    if "MapBatches(Segmenter)" in cmdline:
        return "FCN actors"
    if cmdline.startswith("ray::"):
        return "other Ray workers"
    return "Ray's own processes"


class CpuSampler:
    """Samples the CPU seconds of this process and everything below it (plus the S3 server) until stopped."""

    def __init__(self, s3_pid: int | None):
        self.me, self.s3_pid = os.getpid(), s3_pid
        self.start = self._snapshot()
        self.latest = dict(self.start)
        self.series: list[tuple[float, float]] = [(time.monotonic(), 0.0)]  # (time, CPU seconds of all)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        mine = {self.me, *descendants(self.me)} | ({self.s3_pid} if self.s3_pid else set())
        snapshot = {}
        for pid in mine:
            with contextlib.suppress(OSError, IndexError, ValueError):  # a process that ended meanwhile
                snapshot[pid] = (group_of(pid, command_line(pid), self.me, self.s3_pid), cpu_seconds(pid))
        return snapshot

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self.latest.update(self._snapshot())
            self.series.append((time.monotonic(), sum(self._totals().values())))

    def _totals(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for pid, (group, seconds) in self.latest.items():
            totals[group] += seconds - self.start.get(pid, (group, 0.0))[1]
        return totals

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds of all sampled processes between two monotonic times (linear between samples)."""
        times, totals = zip(*self.series)
        return float(np.interp(end, times, totals) - np.interp(start, times, totals))

    def finish(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        self.latest.update(self._snapshot())
        self.series.append((time.monotonic(), sum(self._totals().values())))
        return dict(self._totals())


def bare_model(predictor, images: list[np.ndarray], batch: int = 1) -> tuple[float, float]:
    """Images per second of the network alone over already-decoded images, ``batch`` at a time, and
    the CPU seconds per image it used (all torch threads)."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(images), batch):
        predictor.predict_batch(images[i : i + batch], statistics=True)
    return len(images) / (time.perf_counter() - start), (time.process_time() - cpu) / len(images)


def plain_loop(predictor, uris: list[str], output: str, palette: list[int]) -> float:
    """Images per second of a plain Python loop doing the job's work (read, decode, predict with
    statistics, encode and write the mask; one Parquet file at the end)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.common.decode import decode_image
    from pipelines.segment.masks import encode_mask

    fs, root = fsspec.core.url_to_fs(output)
    rows = []
    start = time.perf_counter()
    fs.makedirs(f"{root}/masks", exist_ok=True)
    for uri in uris:
        in_fs, path = fsspec.core.url_to_fs(uri)
        rgb = decode_image(in_fs.cat_file(path), max_pixels=10**8)
        prediction = predictor(rgb, statistics=True)
        mask_path = f"{root}/masks/{path.rsplit('/', 1)[-1]}.png"
        fs.pipe_file(mask_path, encode_mask(prediction.labels, palette))
        counts = prediction.pixel_counts
        rows.append(
            {
                "image_uri": uri,
                "mask_uri": mask_path,
                "pixel_counts": counts.tolist(),
                "dominant_class": int(counts.argmax()),
                "mean_confidence": prediction.mean_confidence,
            }
        )
    with fs.open(f"{root}/stats.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    return len(uris) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("file", "s3"), default="file")
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--width", type=float, default=1 / 16, help="FCN-8s channel width multiplier")
    parser.add_argument("--bare-sample", type=int, default=200, help="images per bare-model measurement")
    parser.add_argument("--batch-size", type=int, default=None, help="the job's --batch-size (default: the job's)")
    args = parser.parse_args()

    server, s3_pid = None, None
    if args.store == "s3":
        server, _ = start_s3()
        s3_pid = server.pid
    import fsspec
    import torch

    import fcn
    from pipelines.common.decode import decode_image
    from pipelines.segment import SegmentConfig, run_segmentation
    from pipelines.segment.infer import CPU_FORWARD_PIXELS

    cpus = os.cpu_count() or 1
    root = f"s3://bench-{os.getpid()}" if args.store == "s3" else f"file://{tempfile.mkdtemp(prefix='segbench-')}"
    fs, root_path = fsspec.core.url_to_fs(root)
    fs.makedirs(root_path, exist_ok=True)
    model_uri = f"{root}/model.pt"
    fcn.save_checkpoint(fcn.get_model("fcn8s_vgg16", num_classes=21, width=args.width, geometry="aligned"), model_uri)
    rng = np.random.default_rng(0)
    files = {
        f"{root_path}/images/{i // 500:02d}/img{i:05d}.jpg": synthetic_jpeg(rng, args.size) for i in range(args.images)
    }
    for parent in {path.rsplit("/", 1)[0] for path in files}:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe(files)
    uris = [fs.unstrip_protocol(path) for path in files]
    print(
        f"{len(files)} JPEGs of {args.size}x{args.size} px ({sum(map(len, files.values())) / 1e6:.1f} MB) "
        f"on {args.store}; FCN-8s width {args.width:g}; {cpus} CPUs"
    )

    torch.set_num_threads(cpus)
    checkpoint = fcn.load_checkpoint(model_uri)
    predictor = fcn.Predictor.from_checkpoint(checkpoint, device="cpu")
    sample = [decode_image(data, max_pixels=10**8) for data in list(files.values())[: args.bare_sample]]
    predictor(sample[0])  # warm-up
    config = SegmentConfig(
        input=f"{root}/images",
        output=f"{root}/out",
        model=model_uri,
        progress=False,
        **({"batch_size": args.batch_size} if args.batch_size else {}),
    )
    bare, _ = bare_model(predictor, sample)
    predictor.batch_pixels = CPU_FORWARD_PIXELS  # stacked as the job's FCN actor stacks them
    bare_batched, network_cpu = bare_model(predictor, sample, config.batch_size)
    predictor.batch_pixels = predictor.max_pixels
    loop = plain_loop(predictor, uris, f"{root}/loop", checkpoint.palette)
    print(
        f"bare model {bare:.2f} images/s ({bare_batched:.2f} in batches of {config.batch_size}, "
        f"{1000 * network_cpu:.2f} CPU ms/image), plain loop {loop:.2f} images/s"
    )
    sampler = CpuSampler(s3_pid)
    started = time.monotonic()
    summary = run_segmentation(config)
    cpu = sampler.finish()
    bare_after, _ = bare_model(predictor, sample)

    import pyarrow.parquet as pq

    stats = pq.read_table(f"{root_path}/out/stats", filesystem=fs).to_pandas()
    processed = summary.ok + summary.error
    print(f"bare model again after the job: {bare_after:.2f} images/s")
    print(
        f"job: {summary.ok} ok, {summary.error} error; start-up {summary.startup_s:.1f} s; "
        f"whole run {summary.duration_s:.1f} s"
    )
    print(
        "mean per image (ms): "
        + ", ".join(f"{c} {stats[c].mean():.2f}" for c in ("read_ms", "decode_ms", "inference_ms", "write_ms"))
        + f"; bare model {1000 / bare:.2f}"
    )
    print()
    print("| measure | images/s | vs plain loop | vs bare model |")
    print("|---|---|---|---|")
    print(f"| bare model | {bare:.2f} | {bare / loop:.2f} | 1.00 |")
    print(
        f"| bare model, batches of {config.batch_size} | {bare_batched:.2f} | {bare_batched / loop:.2f} | {bare_batched / bare:.2f} |"
    )
    print(f"| plain loop | {loop:.2f} | 1.00 | {loop / bare:.2f} |")
    print(
        f"| job, steady state | {summary.images_per_second:.2f} | {summary.images_per_second / loop:.2f} | {summary.images_per_second / bare:.2f} |"
    )
    print(
        f"| job, end to end (Ray start-up included) | {summary.end_to_end_images_per_second:.2f} | "
        f"{summary.end_to_end_images_per_second / loop:.2f} | {summary.end_to_end_images_per_second / bare:.2f} |"
    )
    print()
    print("| process group | CPU s | CPU ms per image |")
    print("|---|---|---|")
    for group in ("FCN actors", "other Ray workers", "Ray's own processes", "driver", "S3 server"):
        if group in cpu:
            print(f"| {group} | {cpu[group]:.1f} | {1000 * cpu[group] / processed:.2f} |")
    total = sum(cpu.values())
    print(f"| all, whole run (start-up included) | {total:.1f} | {1000 * total / processed:.2f} |")
    if summary.images_per_second > 0:  # the steady-state window: after start-up, at the steady rate
        window_start = started + summary.startup_s
        window = processed / summary.images_per_second
        steady_cpu = sampler.cpu_between(window_start + 0.1 * window, window_start + 0.9 * window)
        per_image = steady_cpu / (0.8 * processed)
        print(f"| all, steady state | {steady_cpu:.1f} | {1000 * per_image:.2f} |")
        print(
            f"| all, steady state, outside the network (minus the bare model's CPU per image) | | "
            f"{1000 * (per_image - network_cpu):.2f} |"
        )
    if server:
        from bench.object_store import compare_clients, print_table

        print()
        print_table(compare_clients(f"{root}/objects", 300, 40_000, server.pid), 300, 40_000)
        server.terminate()


if __name__ == "__main__":
    main()
