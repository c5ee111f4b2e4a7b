"""Benchmark: the report's gallery item of an image segmented by windows, built from its mask's overview page and
a reduced view of the source (``flows.gallery.overview_thumbnail``), never from the full-resolution pages; and the
job's share of it, the source preview (and overlay) that assembly writes beside the mask
(``pipelines.segment.preview.encode_previews``).

For each size, a tiled JPEG RGB TIFF (``bench.gigapixel.synthetic_tiles``: one band in memory) is generated without
and with a pyramid of reduced-resolution pages (2x steps down to 1024 px or less, as a Cloud-Optimized GeoTIFF),
with its mask (``pipelines.segment.mask_tiff.write_mask``: tiled, deflate, an overview page). Then, each in a fresh
process, with its wall time and its peak resident memory beside the same process's memory before the call (imports
done): the gallery item without a preview (read from the source), the job's preview and overlay, and the gallery
item from that preview.

    .venv/bin/python -m bench.report_gallery --megapixels 100,1000
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from bench.gigapixel import BAND, synthetic_tiles
from pipelines.common.processes import resident_bytes
from pipelines.segment.preview import preview_uri


def write_source(path: Path, height: int, width: int, pyramid: bool) -> None:
    """The source: full resolution, then (``pyramid``) reduced-resolution pages halving down to 1024 px."""
    options = {"tile": (BAND, BAND), "compression": "jpeg", "photometric": "rgb", "dtype": np.uint8}
    with tifffile.TiffWriter(path, bigtiff=height * width * 3 > 2**32 - 2**25) as writer:
        writer.write(synthetic_tiles(height, width), shape=(height, width, 3), **options)
        factor = 2
        while pyramid and max(height, width) // factor >= 1024:
            shape = (height // factor, width // factor)
            writer.write(synthetic_tiles(*shape), shape=(*shape, 3), subfiletype=1, **options)
            factor *= 2


def write_labels(path: Path, height: int, width: int) -> None:
    """A mask of four classes in blocks, as the job writes it."""
    from fcn.classes import voc_palette
    from pipelines.segment.mask_tiff import write_mask

    columns = np.arange(width)[None, :] // 700
    strips = (
        ((np.arange(top, min(top + BAND, height))[:, None] // 500 + columns) % 4).astype(np.uint8)
        for top in range(0, height, BAND)
    )
    write_mask(str(path), height, width, strips, palette=voc_palette())


STEPS = ("report, no preview", "job's preview + overlay", "report from preview")


def measure(step: str, source: Path, mask: Path) -> tuple[float, float, float]:
    """(wall s, peak RSS MiB, RSS MiB before the call) of ``step`` (one of ``STEPS``), in this process: the gallery
    item (``overview_thumbnail``), or the job's preview and overlay, written beside the mask."""
    from fcn.classes import voc_palette
    from flows.gallery import overview_thumbnail
    from pipelines.segment.preview import encode_previews

    before = resident_bytes() / 2**20
    start = time.perf_counter()
    if step == STEPS[1]:
        preview, _ = encode_previews(f"file://{source}", str(mask), voc_palette(), overlay=True, storage_options={})
        Path(preview_uri(str(mask))).write_bytes(preview)
    else:
        overview_thumbnail(f"file://{source}", f"file://{mask}", voc_palette())
    wall = time.perf_counter() - start
    return wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", default="100,1000", help="comma-separated sizes of square images")
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")  # each step in a fresh process: its peak memory is its own
    print("megapixels  pyramid  step                     wall_s  peak_rss_mib  rss_before_mib")
    with tempfile.TemporaryDirectory(prefix="report-gallery-") as folder:
        for megapixels in (int(m) for m in args.megapixels.split(",")):
            side = math.isqrt(megapixels * 10**6) // BAND * BAND
            mask = Path(folder) / "mask.tif"
            with spawn.Pool(1) as pool:
                pool.apply(write_labels, (mask, side, side))
            for pyramid in (False, True):
                source = Path(folder) / "scene.tif"
                with spawn.Pool(1) as pool:
                    pool.apply(write_source, (source, side, side, pyramid))
                Path(preview_uri(str(mask))).unlink(missing_ok=True)
                for step in STEPS:
                    with spawn.Pool(1) as pool:
                        wall, peak, before = pool.apply(measure, (step, source, mask))
                    print(
                        f"{side * side / 1e6:10.0f}  {'yes' if pyramid else 'no':>7}  {step:23}  {wall:6.1f}  "
                        f"{peak:12.0f}  {before:14.0f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
