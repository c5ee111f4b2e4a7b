"""``make demo``: segment a sample bucket end to end on one machine.

1. Puts sample images in a local folder used as the bucket (``demo-data/bucket``): synthetic scenes
   of varied sizes, one large photo-sized scene, and a broken file (it becomes an error row).
2. Obtains a model: the champion of ``demo-data/registry``, else trains a small FCN-2s on labelled
   synthetic scenes with Ray Train (``pipelines.train``) and promotes it.
3. Runs the ``segment-bucket`` flow on a local Ray cluster and Prefect's temporary server (when
   ``PREFECT_API_URL`` is not set), then prints where the masks, Parquet and HTML report are.

Run it again and the segmentation skips the images already done; ``make clean`` starts over.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from prefect.settings import (
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

from fcn import registry
from flows.segment_bucket import segment_bucket
from pipelines.common.ray_utils import LOG_FORMAT, exit_interrupted
from pipelines.synthetic import render_scene, write_synthetic_voc
from pipelines.train import TrainConfig, run_training

DEMO_DIR = Path("demo-data")
LABELLED_SEED, BUCKET_SEED = 0, 1
LABELLED_IMAGES = 160
DEMO_MODEL = "fcn2s_vgg16"
"""The skip head continued to pool1: on these scenes' thin rings and wires, 8 epochs reach a mean IU of
0.64 where FCN-8s reaches 0.29 (bench/thin_structures.py and the README)."""
EPHEMERAL_STARTUP_TIMEOUT = 300


def make_bucket(bucket: Path, num_images: int) -> None:
    """Fill ``bucket`` with synthetic scenes (JPEG), one large scene and a file that is not an image."""
    if bucket.exists():
        return
    scenes = bucket.parent / ".bucket-scenes"
    write_synthetic_voc(scenes.as_uri(), num_images=num_images, seed=BUCKET_SEED, min_size=64, max_size=160)
    (bucket / "scenes").mkdir(parents=True)
    for image in sorted((scenes / "JPEGImages").glob("*.jpg")):
        shutil.move(image, bucket / "scenes" / image.name)
    shutil.rmtree(scenes)
    rgb, _ = render_scene(np.random.default_rng([BUCKET_SEED, 10_000]), 480, 640, 6)
    (bucket / "large").mkdir()
    Image.fromarray(rgb).save(bucket / "large" / "scene_large.png")
    (bucket / "broken.jpg").write_text("this is not a JPEG\n")


def obtain_model(
    registry_dir: Path, labelled: Path, *, epochs: int, width: float, lr: float, workers: int
) -> dict[str, Any]:
    """The registry's champion, training and promoting a small model first if there is none."""
    champion = registry.get_champion(registry_dir.as_uri())
    if champion is not None:
        return champion
    if not labelled.exists():
        write_synthetic_voc(labelled.as_uri(), num_images=LABELLED_IMAGES, seed=LABELLED_SEED)
    print(
        f"training a small {DEMO_MODEL} (width {width}, {epochs} epochs, {workers} Ray Train workers) ...", flush=True
    )
    run_training(
        TrainConfig(
            data=labelled.as_uri(),
            registry=registry_dir.as_uri(),
            model=DEMO_MODEL,
            width=width,
            epochs=epochs,
            lr=lr,
            workers=workers,
            geometry="aligned",
            run_name="demo",
        )
    )
    champion = registry.get_champion(registry_dir.as_uri())
    if champion is None:
        raise RuntimeError(f"training did not produce a champion in {registry_dir}")
    return champion


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEMO_DIR, help="demo folder (default: %(default)s)")
    parser.add_argument("--images", type=int, default=24, help="synthetic scenes in the bucket")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs if no champion exists")
    parser.add_argument("--width", type=float, default=0.0625, help="network width multiplier for training")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate for training")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)

    root = args.dir.resolve()
    bucket, registry_dir, output = root / "bucket", root / "registry", root / "segmented"
    started = time.monotonic()
    make_bucket(bucket, args.images)
    try:
        champion = obtain_model(
            registry_dir, root / "labelled", epochs=args.epochs, width=args.width, lr=args.lr, workers=args.workers
        )
    except KeyboardInterrupt:  # trainer.fit() may still be inside Ray on a thread: end here (see exit_interrupted)
        exit_interrupted("interrupted: run the same command to resume training after the last finished epoch")
    # Prefect's temporary server migrates its database on first use: allow a slow machine more than 20 s. It
    # sends no usage analytics: its telemetry task can find the busy SQLite file locked and log a traceback.
    server_settings = {
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: EPHEMERAL_STARTUP_TIMEOUT,
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
    }
    with temporary_settings(server_settings):
        result = segment_bucket(input=bucket.as_uri(), output=output.as_uri(), model=registry_dir.as_uri())
    elapsed = time.monotonic() - started
    print(
        f"""
Demo finished in {elapsed:.0f} s.
  bucket (input)   {bucket}
  model            {champion["checkpoint"]} ({champion["version"]}, val mean IU {champion["metrics"]["mean_iu"]:.3f})
  images           {result["ok"]} ok, {result["error"]} error, {result["skipped"]} skipped (already done)
  throughput       {_steady(result["images_per_second"])} after {result["startup_s"]:.1f} s of start-up (Ray, actors, model); {result["end_to_end_images_per_second"]:.1f} images/s end to end
  masks            {result["masks"]}
  Parquet stats    {result["stats"]}
  manifest         {result["manifest"]}
  HTML report      {result["report"]}

Query the statistics:
  .venv/bin/python -c "import duckdb; print(duckdb.sql(\\"select dominant_class_name, count(*) n from read_parquet('{output}/stats/**/*.parquet') group by 1 order by n desc\\"))"
""",
        flush=True,
    )
    return 0


def _steady(images_per_second: float) -> str:
    """The steady-state rate, or why there is none (the run's images fit in too few batches to time)."""
    return (
        f"{images_per_second:.1f} images/s steady state"
        if images_per_second
        else "too few batches for a steady-state rate"
    )


if __name__ == "__main__":
    sys.exit(main())
