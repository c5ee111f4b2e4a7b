"""The segment-bucket flow's own work at 10^5 and 10^6 images: time and memory per image, the job stubbed.

The job's outputs are synthesized with pyarrow: ``listing.parquet`` (``pipelines.segment.driver.LISTING_COLUMNS``),
the statistics in part files of ``--rows-per-part`` rows (21 VOC classes; the last 0.1% are error rows),
``_SUCCESS``, and real image/mask files for the rows the report's gallery samples. The flow's functions
then run in a fresh process, as its tasks call them but without a Prefect server (whose start-up and
API calls do not grow with the images): ``check_outputs`` (one scan of the statistics: ``_SUCCESS``, rows,
distinct keys, missing keys against the listing, and the report's digest) and ``write_report`` (the
gallery's thumbnails, report.html). The process's resident memory is sampled every 5 ms. Part files hold
``--rows-per-part`` rows: by default as many as a finished run's merged files
(``pipelines.segment.resume.MERGED_PART_ROWS``); ``--rows-per-part 256`` shows unmerged parts.

    python -m bench.flow_scale --out /tmp/flow-scale --sizes 100000,1000000

Prints a Markdown table: time per image (wall and CPU, all threads), peak resident memory above the start
(after imports) per image, and the peak of Arrow's memory pool per image; then the same per added image
between consecutive sizes, which leaves out the fixed costs (Arrow's thread pools, the gallery).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from bench.driver_bookkeeping import measure
from fcn.classes import VOC_CLASSES, voc_palette
from flows.digest import ERROR_ROWS, digest_stats, stats_dataset
from pipelines.segment import SegmentSummary
from pipelines.segment.driver import LISTING_COLUMNS, LISTING_FILE, SUCCESS_FILE
from pipelines.segment.resume import MERGED_PART_ROWS
from pipelines.segment.schema import stats_schema

GALLERY = 8
ERROR_SHARE = 0.001


def synthesize(root: Path, n: int, rows_per_part: int) -> None:
    """A finished run's outputs for ``n`` images under ``root``/out."""
    out, images = root / "out", root / "images"
    (out / "stats").mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    classes = len(VOC_CLASSES)
    index = np.arange(n)
    keys = pc.binary_join_element_wise("photos/2026/", pa.array(np.char.zfill(index.astype(str), 9)), ".jpg", "")
    image_uris = pc.binary_join_element_wise(f"file://{images}/", keys, "")
    pq.write_table(
        pa.table({"key": keys, "image_uri": image_uris, "source_size": pa.array(40_000 + index % 5000)}).select(
            LISTING_COLUMNS
        ),
        out / LISTING_FILE,
    )
    ok_rows = n - int(n * ERROR_SHARE)
    ok = index < ok_rows
    counts = rng.integers(0, 20_000, (n, classes))
    counts[:, 0] += 100_000  # background dominates, as in most photos
    offsets = pa.array(np.arange(0, n * classes + 1, classes, dtype=np.int32))
    no_list = pa.array(~ok)
    columns = {
        "image_uri": image_uris,
        "key": keys,
        "source_size": pa.array(40_000 + index % 5000),
        "width": pa.array(np.where(ok, 500, 0), pa.int32()),
        "height": pa.array(np.where(ok, 375, 0), pa.int32()),
        "pixel_counts": pa.ListArray.from_arrays(offsets, pa.array(counts.ravel()), mask=no_list),
        "class_fractions": pa.ListArray.from_arrays(
            offsets, pa.array((counts / counts.sum(axis=1, keepdims=True)).ravel()), mask=no_list
        ),
        "dominant_class": pa.array(counts.argmax(axis=1).astype(np.int32), mask=~ok),
        "mask_uri": pc.if_else(no_list, None, pc.binary_join_element_wise(f"file://{out}/masks/", keys, ".png")),
        "status": pc.if_else(no_list, "error", "ok"),
        "error": pc.if_else(no_list, "decode: not an image (truncated JPEG)", pa.scalar(None, pa.string())),
    }
    schema = stats_schema(list(VOC_CLASSES), voc_palette(), {"uri": "file:///models/fcn.pt", "version": "v0001"})
    stats = pa.Table.from_arrays(
        [columns[f.name].cast(f.type) if f.name in columns else pa.nulls(n, f.type) for f in schema], schema=schema
    )
    for part, start in enumerate(range(0, n, rows_per_part)):
        pq.write_table(stats.slice(start, rows_per_part), out / "stats" / f"part-run0-{part:05d}.parquet")
    (out / SUCCESS_FILE).write_text("{}")
    for row in digest_stats(stats_dataset(str(out / "stats")), sample_size=GALLERY).sample:  # the gallery's rows
        for uri, mode in ((row["image_uri"], "RGB"), (row["mask_uri"], "P")):
            path = Path(uri.removeprefix("file://"))
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new(mode, (500, 375)).save(path, format="PNG" if mode == "P" else "JPEG")


def summary_of(root: Path, n: int) -> SegmentSummary:
    """What the stubbed job would have returned."""
    output = f"file://{root}/out"
    errors = int(n * ERROR_SHARE)
    return SegmentSummary(
        run_id="run0",
        input=f"file://{root}/images",
        output=output,
        model="fcn8s v0001",
        model_id="file:///models/fcn.pt",
        model_version="v0001",
        listed=n,
        ok=n - errors,
        error=errors,
        skipped=0,
        duration_s=0.0,
        startup_s=0.0,
        images_per_second=0.0,
        end_to_end_images_per_second=0.0,
        stats_uri=f"{output}/stats",
        masks_uri=f"{output}/masks",
        manifest_uri=f"{output}/manifest.json",
        success_uri=f"{output}/{SUCCESS_FILE}",
        listing_uri=f"{output}/{LISTING_FILE}",
    )


def run_flow_work(root: Path, n: int) -> dict[str, float]:
    """The flow's verify and report functions on the synthesized outputs (in a fresh process)."""
    from flows.segment_bucket import check_outputs, write_report

    summary = summary_of(root, n)

    def work() -> dict[str, int]:
        counts, digest = check_outputs(summary, {}, GALLERY)
        report = write_report(summary, digest, "flow bench", f"{summary.output}/report.html", {})
        return {"rows": counts.rows, "errors_shown": len(report.errors), "gallery": len(digest.sample)}

    cpu = time.process_time()
    outcome = measure(work)
    cpu = time.process_time() - cpu
    with contextlib.suppress(NotImplementedError):  # the check's allocations (flows.digest.memory_returned_promptly)
        outcome["arrow_peak_bytes"] = max(outcome["arrow_peak_bytes"], pa.jemalloc_memory_pool().max_memory())
    return (
        {k: outcome[k] for k in ("seconds", "peak_bytes", "arrow_peak_bytes")}
        | {"cpu_seconds": cpu}
        | outcome["result"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--rows-per-part", type=int, default=MERGED_PART_ROWS)
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)  # internal: measure --out of this size, print JSON
    args = parser.parse_args(argv)
    if args.run:
        print(json.dumps(run_flow_work(Path(args.out), args.run)))
        return 0
    results = []
    for n in (int(v) for v in args.sizes.split(",")):
        root = Path(args.out) / f"n{n}"
        start = time.perf_counter()
        synthesize(root, n, args.rows_per_part)
        print(f"n={n}: synthesized in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, "-m", "bench.flow_scale", "--out", str(root), "--run", str(n)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        result = {"images": n, **json.loads(out.strip().splitlines()[-1])}
        assert result["rows"] == n and result["gallery"] == GALLERY, result
        assert result["errors_shown"] == min(ERROR_ROWS, int(n * ERROR_SHARE)), result
        results.append(result)
        print(result, file=sys.stderr, flush=True)
    print(
        "\n| images | part files | seconds | µs per image | CPU µs per image | peak resident above start "
        "| bytes per image | Arrow peak, bytes per image |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        n = r["images"]
        print(
            f"| {n:,} | {-(-n // args.rows_per_part):,} | {r['seconds']:.2f} | {1e6 * r['seconds'] / n:.2f} | "
            f"{1e6 * r['cpu_seconds'] / n:.2f} | {r['peak_bytes'] / 2**20:.0f} MiB | "
            f"{r['peak_bytes'] / n:.0f} | {r['arrow_peak_bytes'] / n:.0f} |"
        )
    for smaller, larger in zip(results, results[1:], strict=False):
        added = larger["images"] - smaller["images"]
        print(
            f"\nfrom {smaller['images']:,} to {larger['images']:,} images, per added image: "
            f"{1e6 * (larger['seconds'] - smaller['seconds']) / added:.2f} µs, "
            f"{(larger['peak_bytes'] - smaller['peak_bytes']) / added:.0f} bytes resident, "
            f"{(larger['arrow_peak_bytes'] - smaller['arrow_peak_bytes']) / added:.0f} bytes of Arrow's pool"
        )
    (Path(args.out) / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
