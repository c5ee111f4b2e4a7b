"""FCN-32s vs FCN-16s vs FCN-8s (paper Table 2) on the same synthetic scenes with the same budget.

The paper starts every net from an ImageNet-trained VGG16; nothing is downloaded here, so a shared
backbone is trained first (an FCN-8s for ``--warm-epochs``) and its conv1_1..fc7 weights start all
three nets, whose score and upsampling layers start fresh (score layers at zero, as in the paper).
Each net then trains with the same recipe, epochs, data and Ray Train workers; its best epoch is
scored on the validation split with the paper's four metrics and the pixel accuracy in a band
around ground-truth boundaries, where the skip connections should matter most.

    python -m bench.train_skip_comparison --out /tmp/skip-bench

Prints a Markdown table and writes <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import fcn
from pipelines.common.ray_utils import connect
from pipelines.synthetic import write_synthetic_voc
from pipelines.train import SCORES, TrainConfig, TrainSummary, copy_matching_weights, run_training
from pipelines.train.datasets import BadSample, load_sample, open_dataset

MODELS = ("fcn32s_vgg16", "fcn16s_vgg16", "fcn8s_vgg16")


def boundary_band(labels: np.ndarray, radius: int) -> np.ndarray:
    """Pixels with a differently labelled pixel (255 excluded) within ``radius`` (Chebyshev)."""
    height, width = labels.shape
    padded = np.pad(labels, radius, mode="edge")
    band = np.zeros(labels.shape, bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            other = padded[dy : dy + height, dx : dx + width]
            band |= (other != labels) & (other != 255)
    return band & (labels != 255)


def boundary_accuracy(checkpoint: str, data_uri: str, radius: int) -> float:
    """Pixel accuracy of ``checkpoint`` on the validation pixels within ``radius`` of a boundary."""
    data = open_dataset(data_uri)
    predictor = fcn.Predictor.from_checkpoint(checkpoint, device="cpu")
    correct = total = 0
    for sample in data.val:
        try:
            rgb, labels = load_sample(sample, data.num_classes)
        except BadSample:
            continue
        band = boundary_band(labels, radius)
        correct += int((predictor(rgb).labels[band] == labels[band]).sum())
        total += int(band.sum())
    return correct / max(total, 1)


def backbone_init(warm_checkpoint: str, model: str, width: float, num_classes: int, uri: str) -> str:
    """A fresh ``model`` with the backbone (the trunk, conv1_1..fc7) of the warm-up checkpoint, saved at ``uri``."""
    warm = fcn.load_checkpoint(warm_checkpoint)
    backbone = {k: v for k, v in warm.model.state_dict().items() if k.startswith("streams.")}
    net = fcn.get_model(model, num_classes=num_classes, width=width, geometry="aligned")
    copy_matching_weights(net, backbone)
    return fcn.save_checkpoint(net, uri, class_names=warm.class_names, input_convention=warm.input_convention)


def budget_parser(description: str, *, images: int, epochs: int) -> argparse.ArgumentParser:
    """The options of a same-budget comparison: data, shared warm-up, epochs per net, workers, recipe."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="folder for the data, the registry and results.json")
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--max-size", type=int, default=96)
    parser.add_argument("--warm-epochs", type=int, default=10, help="epochs of the shared backbone warm-up")
    parser.add_argument("--epochs", type=int, default=epochs, help="epochs of each compared net")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--width", type=float, default=1 / 16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--band", type=int, default=2, help="boundary band radius in pixels")
    parser.add_argument("--ray-address")
    return parser


def shared_warmup(args: argparse.Namespace, run_name: str) -> tuple[str, dict, TrainSummary]:
    """Write the synthetic data under ``args.out``, connect to Ray and train the shared backbone (an
    FCN-8s for ``args.warm_epochs``); return the data URI, the training options every compared net
    shares, and the warm-up's summary."""
    out = Path(args.out)
    data = str(out / "data")
    write_synthetic_voc(data, num_images=args.images, seed=0, min_size=args.min_size, max_size=args.max_size)
    connect(args.ray_address)
    common = {
        "data": data,
        "registry": str(out / "registry"),
        "workers": args.workers,
        "width": args.width,
        "geometry": "aligned",
        "lr": args.lr,
    }
    warm = run_training(TrainConfig(model="fcn8s_vgg16", epochs=args.warm_epochs, run_name=run_name, **common))
    print(f"warm-up FCN-8s: mean IU {warm.metrics['mean_iu']:.3f}", file=sys.stderr, flush=True)
    return data, common, warm


def main(argv: list[str] | None = None) -> int:
    args = budget_parser(__doc__.split("\n\n")[0], images=200, epochs=6).parse_args(argv)

    out = Path(args.out)
    data, common, warm = shared_warmup(args, "bench-warmup")
    num_classes = len(warm.metrics["class_names"])
    rows = []
    for model in MODELS:
        init = backbone_init(warm.checkpoint_uri, model, args.width, num_classes, str(out / f"init-{model}.pt"))
        start = time.perf_counter()
        summary = run_training(
            TrainConfig(model=model, epochs=args.epochs, init=init, run_name=f"bench-{model}", **common)
        )
        seconds = time.perf_counter() - start
        rows.append(
            {
                "model": model,
                **{k: summary.metrics[k] for k in SCORES},
                "boundary_accuracy": boundary_accuracy(summary.checkpoint_uri, data, args.band),
                "best_epoch": summary.metrics["epoch"],
                "train_seconds": seconds,
            }
        )
        print(f"{model}: {rows[-1]}", file=sys.stderr, flush=True)

    print(
        f"\n{args.images} synthetic scenes ({args.min_size}-{args.max_size} px), width {args.width:g}, shared backbone "
        f"from a {args.warm_epochs}-epoch FCN-8s warm-up (mean IU {warm.metrics['mean_iu']:.3f}), then {args.epochs} "
        f"epochs per net, {args.workers} Ray Train workers, modern recipe, lr {args.lr:g}\n"
    )
    print(f"| network | pixel acc | mean acc | mean IU | f.w. IU | boundary acc (±{args.band} px) | train s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{100 * row[k]:.1f}" for k in (*SCORES, "boundary_accuracy")]
        print(f"| {row['model']} | {' | '.join(cells)} | {row['train_seconds']:.0f} |")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
