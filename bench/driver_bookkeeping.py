"""The segmentation driver's bookkeeping at 10^5 to 10^7 images: time and memory per image.

A synthetic bucket is described by an inventory (Parquet, S3 Inventory's columns) and an output that
already holds one stats row per image (as after a finished run), in part files of ``--rows-per-part``
rows. Each phase runs in its own process, sampling its resident memory every 5 ms:

- listing: ``list_images`` on the inventory (filtered and turned into the listing table);
- resume decision: ``read_state`` + ``todo_images`` (the listing's images are all done but
  ``--changed`` of them, whose etag changed; the output is a finished run's, so its keys are unique);
- compaction: a run that rewrote those images writes its part, then ``compact`` (only the files
  holding their older rows are touched).

    python -m bench.driver_bookkeeping --out /tmp/bookkeeping --sizes 100000,1000000,10000000

Prints a Markdown table (time per image, peak memory above the phase's start per image).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.common.processes import resident_bytes
from pipelines.segment import resume
from pipelines.segment.schema import stats_schema
from pipelines.segment.write import write_part

MODEL, VERSION = "file:///models/fcn.pt", "v0001"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def synthesize(root: Path, n: int, rows_per_part: int, changed: float) -> None:
    """The inventory and the stats history of ``n`` images under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    index = np.arange(n)
    keys = pc.binary_join_element_wise("images/", pa.array(np.char.zfill(index.astype(str), 9)), ".jpg", "")
    etags = pc.binary_join_element_wise("e", pa.array(index.astype(str)), "")
    pq.write_table(
        pa.table(
            {
                "key": keys,
                "size": pa.array(10_000 + index % 5000),
                "e_tag": etags,
                "last_modified_date": pa.array(np.full(n, T0), pa.timestamp("us", tz="UTC")),
            }
        ),
        root / "inventory.parquet",
    )
    schema = stats_schema(["background", "object"], [0, 0, 0, 255, 255, 255], {})
    flipped = index < int(n * changed)  # these images' etag changed since: redone by the next run
    history = pa.table(
        {
            "image_uri": pc.binary_join_element_wise(f"file://{root}/", keys, ""),
            "key": keys,
            "source_size": pa.array(10_000 + index % 5000),
            "source_etag": pc.if_else(pa.array(flipped), "stale", etags),
            "source_mtime": pa.array(np.full(n, T0), pa.timestamp("us", tz="UTC")),
            "model_id": pa.array([MODEL] * n).dictionary_encode(),
            "model_version": pa.array([VERSION] * n).dictionary_encode(),
            "status": pa.array(["ok"] * n).dictionary_encode(),
            "run_id": pa.array(["run0"] * n).dictionary_encode(),
            "processed_at": pa.array(np.full(n, T0), pa.timestamp("us", tz="UTC")),
        }
    )
    history = pa.Table.from_arrays(
        [history[f.name].cast(f.type) if f.name in history.column_names else pa.nulls(n, f.type) for f in schema],
        schema=schema,
    )
    (root / "out" / "stats").mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, n, rows_per_part)):
        pq.write_table(
            history.slice(start, rows_per_part),
            root / "out" / "stats" / f"part-run0-{part:05d}.parquet",
            compression="zstd",
        )


def measure(phase, *args) -> dict[str, float]:
    """Run ``phase(*args)`` while sampling this process's resident memory: seconds, peak resident
    bytes above the start, and the peak of the bytes Arrow held for the phase (its own memory pool)."""
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    pa.set_memory_pool(pool)
    start_rss, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], resident_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    result = phase(*args)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {
        "seconds": seconds,
        "peak_bytes": max(peak[0], resident_bytes()) - start_rss,
        "arrow_peak_bytes": pool.max_memory(),
        "result": result,
    }


def run_phase(root: Path, phase: str) -> dict[str, float]:
    """One phase, in this process (called in a fresh subprocess by ``main``)."""
    from pipelines.segment.listing import list_images

    output = f"file://{root}/out"
    if phase == "listing":
        outcome = measure(lambda: list_images(str(root / "inventory.parquet"), {}, exclude=output).images.num_rows)
    else:
        listing = list_images(str(root / "inventory.parquet"), {}, exclude=output).images
        if phase == "resume":
            state = lambda: resume.read_state(f"{output}/stats", {})  # noqa: E731
            outcome = measure(lambda: resume.todo_images(listing, state(), MODEL, VERSION, unique_keys=True).num_rows)
        else:  # compaction, after a run that redid the changed images
            previous = resume.read_state(f"{output}/stats", {})
            todo = resume.todo_images(listing, previous, MODEL, VERSION)
            del listing
            redone = previous.filter(pc.is_in(previous["key"], value_set=todo["key"])).select(["key"])
            schema = pq.read_schema(next((root / "out" / "stats").glob("*.parquet")))
            rows = pa.Table.from_arrays(
                [
                    redone["key"]
                    if f.name == "key"
                    else pa.array(np.full(redone.num_rows, datetime.now(UTC)), f.type)
                    if f.name == "processed_at"
                    else pa.nulls(redone.num_rows, f.type)
                    for f in schema
                ],
                schema=schema,
            )
            write_part(f"{output}/stats", rows, "run1", {})
            outcome = measure(lambda: len(resume.compact(f"{output}/stats", {}, "run1", previous, unique_keys=True)))
    return {
        "seconds": outcome["seconds"],
        "peak_bytes": outcome["peak_bytes"],
        "arrow_peak_bytes": outcome["arrow_peak_bytes"],
        "rows": outcome["result"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--rows-per-part", type=int, default=100_000)
    parser.add_argument("--changed", type=float, default=0.01, help="share of images whose source changed")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase on --out and print JSON
    args = parser.parse_args(argv)
    if args.phase:
        print(json.dumps(run_phase(Path(args.out), args.phase)))
        return 0
    results = []
    for n in (int(v) for v in args.sizes.split(",")):
        root = Path(args.out) / f"n{n}"
        start = time.perf_counter()
        synthesize(root, n, args.rows_per_part, args.changed)
        print(f"n={n}: synthesized in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        for phase in ("listing", "resume", "compaction"):
            out = subprocess.run(
                [sys.executable, "-m", "bench.driver_bookkeeping", "--out", str(root), "--phase", phase],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            result = {"images": n, "phase": phase, **json.loads(out.strip().splitlines()[-1])}
            results.append(result)
            print(result, file=sys.stderr, flush=True)
    print(
        "\n| images | phase | seconds | µs per image | peak resident above start | bytes per image | Arrow peak, bytes per image |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['images']:,} | {r['phase']} | {r['seconds']:.2f} | {1e6 * r['seconds'] / r['images']:.2f} | "
            f"{r['peak_bytes'] / 2**20:.0f} MiB | {r['peak_bytes'] / r['images']:.0f} | {r['arrow_peak_bytes'] / r['images']:.0f} |"
        )
    (Path(args.out) / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
