"""``python -m pipelines.synthetic``: write a synthetic dataset in one of the layouts of ``WRITERS``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipelines.synthetic.layouts import WRITERS


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m pipelines.synthetic OUT_URI [--layout L] [--num-images N] [--seed S] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.synthetic",
        description="Write deterministic synthetic scenes in the VOC, NYUDv2 or SIFT Flow layout.",
    )
    parser.add_argument("uri", help="output directory (any fsspec URI, e.g. s3://bucket/synthetic)")
    parser.add_argument("--layout", choices=tuple(WRITERS), default="voc")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--max-size", type=int, default=96)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--ignore-band", type=int, default=0, help="width of the 255 band around objects")
    args = parser.parse_args(argv)
    try:
        ids = WRITERS[args.layout](
            args.uri,
            num_images=args.num_images,
            seed=args.seed,
            min_size=args.min_size,
            max_size=args.max_size,
            max_objects=args.max_objects,
            val_fraction=args.val_fraction,
            ignore_band=args.ignore_band,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {len(ids)} {args.layout} scenes to {args.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
