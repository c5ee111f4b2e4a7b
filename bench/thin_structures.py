"""Thin structures: FCN-8s vs FCN-4s, unweighted vs median-frequency loss, at the same budget.

The project's synthetic scenes hold two thin classes, rings and wires (1-2.5 px wide bars), among
discs, boxes and triangles. As in ``bench.train_skip_comparison``, a shared backbone is trained first
(an FCN-8s for ``--warm-epochs``, nothing downloaded) and starts every variant; each variant then
trains with the same recipe, epochs, data and workers. Its best epoch is scored on the validation
split: per-class IU, mean IU and the pixel accuracy in a band around ground-truth boundaries.

    python -m bench.thin_structures --out /tmp/thin-bench
    python -m bench.thin_structures --out /tmp/thin-bench --variants fcn8s_vgg16:none,fcn4s_vgg16:median-frequency

Prints a Markdown table and writes <out>/results.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench.train_skip_comparison import backbone_init, boundary_accuracy, budget_parser, shared_warmup
from pipelines.train import TrainConfig, run_training

VARIANTS = ("fcn8s_vgg16:none", "fcn8s_vgg16:median-frequency", "fcn4s_vgg16:none", "fcn4s_vgg16:median-frequency")


def main(argv: list[str] | None = None) -> int:
    parser = budget_parser(__doc__.split("\n\n")[0], images=160, epochs=12)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated <model>:<class weights>")
    args = parser.parse_args(argv)
    variants = [tuple(v.split(":", 1)) for v in args.variants.split(",")]

    out = Path(args.out)
    data, common, warm = shared_warmup(args, "thin-warmup")
    class_names = list(warm.metrics["class_names"])
    rows = []
    for model, weights in variants:
        init = backbone_init(warm.checkpoint_uri, model, args.width, len(class_names), str(out / f"init-{model}.pt"))
        start = time.perf_counter()
        summary = run_training(
            TrainConfig(
                model=model,
                epochs=args.epochs,
                init=init,
                class_weights=weights,
                run_name=f"thin-{model}-{weights}",
                **common,
            )
        )
        rows.append(
            {
                "model": model,
                "class_weights": weights,
                "mean_iu": summary.metrics["mean_iu"],
                "per_class_iu": dict(zip(class_names, summary.metrics["per_class_iu"], strict=True)),
                "boundary_accuracy": boundary_accuracy(summary.checkpoint_uri, data, args.band),
                "best_epoch": summary.metrics["epoch"],
                "train_seconds": time.perf_counter() - start,
            }
        )
        print(f"{model} {weights}: {rows[-1]}", file=sys.stderr, flush=True)

    print(
        f"\n{args.images} synthetic scenes ({args.min_size}-{args.max_size} px), width {args.width:g}, shared backbone "
        f"from a {args.warm_epochs}-epoch FCN-8s warm-up, then {args.epochs} epochs per variant, {args.workers} "
        f"Ray Train workers, lr {args.lr:g}; IU in %\n"
    )
    print(f"| network | loss | {' | '.join(class_names)} | mean IU | boundary acc (±{args.band} px) | train s |")
    print("|---|---|" + "---|" * (len(class_names) + 3))
    for row in rows:
        ius = [f"{100 * row['per_class_iu'][name]:.1f}" for name in class_names]
        print(
            f"| {row['model']} | {row['class_weights']} | {' | '.join(ius)} | {100 * row['mean_iu']:.1f} | "
            f"{100 * row['boundary_accuracy']:.1f} | {row['train_seconds']:.0f} |"
        )
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
