"""Throughput of full-width FCN-8s VGG16 at 500x500: reference fp32 vs aligned fp32 vs aligned bf16.

Prints images/s, achieved GFLOP/s, the machine's measured fp32 / bf16 matmul peak (same run), and
mask agreement with the reference fp32 net. Numbers are ratios within one run; no timing is asserted.

Weights: a He-random VGG16 trunk, with the three score layers fitted (Adam on the cross-entropy,
trunk frozen) to the synthetic scene's label map, so the logits carry a real, spatially structured
signal with confident regions and uncertain boundaries, as a trained net's do. With random score
layers every pixel's top-2 logit margin is tiny and agreement numbers say nothing; that case is
printed too, for contrast.

A bf16 forward (timed once, no warm-up) runs only when its predicted time (from a bf16 convolution probe) fits
``--bf16-budget-s``: CPUs without native bf16 (no AVX512-BF16/AMX) run bf16 convolutions tens of
times slower than fp32. Its mask agreement is then measured with bf16-rounded numerics emulated in
fp32 (inputs, weights and outputs of every convolution rounded to bf16; fp32 accumulation, as in
oneDNN and cuDNN), and its speed is reported as the prediction.

    python -m bench.model_throughput [--size 500] [--iters 3] [--bf16-budget-s 150]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from fcn import get_convention, get_model
from fcn.geometry import conv_flops
from fcn.heads import PRIMARY_HEAD
from pipelines.synthetic import SYNTHETIC_CLASSES, render_scene


def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: bool = True) -> tuple[float, object]:
    """Seconds per call and the last result: the fastest of ``iters`` calls after an optional warm-up
    (on a shared machine the minimum is the measurement least disturbed by other work)."""
    out = fn() if warmup else None
    best = float("inf")
    for _ in range(iters):
        device_sync(device)
        start = time.perf_counter()
        out = fn()
        device_sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int, seconds: float) -> float:
    """GFLOP/s of square ``n`` matmuls: the fastest of the calls made in about ``seconds``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    per_call, _ = timed(lambda: a @ b, device, 1)
    iters = max(3, int(seconds / max(per_call, 1e-6)))
    return 2 * n**3 / timed(lambda: a @ b, device, iters, warmup=False)[0] / 1e9


def conv_rate(dtype: torch.dtype, device: torch.device, channels_last: bool) -> float:
    """GFLOP/s of a VGG-like 3x3 convolution (64 channels, 64x64) in ``dtype``."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(1, 64, 64, 64, device=device).to(dtype).contiguous(memory_format=memory_format)
    conv = nn.Conv2d(64, 64, 3, padding=1).to(device=device, dtype=dtype, memory_format=memory_format)
    with torch.no_grad():
        seconds, _ = timed(lambda: conv(x), device, 3)
    return 2 * 64 * 64 * 64 * 64 * 9 / seconds / 1e9


def fit_score_layers(model: nn.Module, x: torch.Tensor, label: torch.Tensor, steps: int) -> float:
    """Fit only the score layers (trunk frozen) to ``label``; returns the final pixel accuracy."""
    with torch.no_grad():
        feats = model.backbone.features(x)
    scores = [p for n, p in model.head.named_parameters() if n.startswith("score")]
    optimizer = torch.optim.Adam(scores, lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model.head(feats, x.shape[-2:])
        nn.functional.cross_entropy(logits, label).backward()
        optimizer.step()
    with torch.no_grad():
        return (model.head(feats, x.shape[-2:]).argmax(1) == label).float().mean().item()


def describe(mask: torch.Tensor) -> str:
    """Share of each class in a label map, e.g. ``0:81% 2:12% ...``."""
    values, counts = mask.unique(return_counts=True)
    return " ".join(f"{v}:{100 * c / mask.numel():.0f}%" for v, c in zip(values.tolist(), counts.tolist(), strict=True))


def emulate_bf16(model: nn.Module) -> nn.Module:
    """A copy computing in fp32 with bf16-rounded conv inputs, weights and outputs."""
    emulated = copy.deepcopy(model)

    def to_bf16(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).to(torch.float32)

    with torch.no_grad():
        for m in emulated.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                m.weight.copy_(to_bf16(m.weight))
                m.register_forward_pre_hook(lambda _m, args: (to_bf16(args[0]),))
                m.register_forward_hook(lambda _m, _args, out: to_bf16(out))
    return emulated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=500)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--fit-steps", type=int, default=40)
    parser.add_argument("--bf16-budget-s", type=float, default=150.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)

    # the synthetic scenes are drawn for ~100 px images: draw one at a quarter size and enlarge it,
    # so objects cover a realistic share of the frame (not 2% of it)
    small = max(16, args.size // 4)
    image, label = render_scene(np.random.default_rng(args.seed), small, small, 6)
    image = np.asarray(Image.fromarray(image).resize((args.size, args.size), Image.Resampling.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize((args.size, args.size), Image.Resampling.NEAREST))
    x = get_convention("torchvision").to_tensor(image).unsqueeze(0).to(device)
    target = torch.from_numpy(label.astype(np.int64)).unsqueeze(0).to(device)
    num_classes = len(SYNTHETIC_CLASSES)

    reference = get_model("fcn8s_vgg16", num_classes=num_classes).to(device).eval()
    aligned = get_model("fcn8s_vgg16", num_classes=num_classes, geometry="aligned").to(device).eval()
    random_scores = {}
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if ".score_" in name and name.endswith("weight"):
                random_scores[name] = torch.randn_like(p) * 0.01
    fitted_accuracy = fit_score_layers(reference, x, target, args.fit_steps)
    aligned.load_state_dict(reference.state_dict())

    flops = {"reference": conv_flops(reference, args.size), "aligned": conv_flops(aligned, args.size)}
    peak32 = matmul_peak(torch.float32, device, 1024, 2.0)
    peak16 = matmul_peak(torch.bfloat16, device, 256 if device.type == "cpu" else 4096, 2.0)
    rate32 = conv_rate(torch.float32, device, channels_last=False)
    rate16 = conv_rate(torch.bfloat16, device, channels_last=False)
    rate16_cl = conv_rate(torch.bfloat16, device, channels_last=True)

    rows = []
    with torch.no_grad():
        t_ref, out = timed(lambda: reference(x)[PRIMARY_HEAD], device, args.iters)
        ref_mask = out.argmax(1)
        rows.append(("reference fp32", t_ref, flops["reference"], 1.0, "measured"))
        t_ali, out = timed(lambda: aligned(x)[PRIMARY_HEAD], device, args.iters)
        agree_ali = (out.argmax(1) == ref_mask).float().mean().item()
        rows.append(("aligned fp32", t_ali, flops["aligned"], agree_ali, "measured"))
        emulated_agree = None
        for channels_last in (False, True):
            name = "aligned bf16" + (" channels_last" if channels_last else "")
            rate = rate16_cl if channels_last else rate16
            predicted = flops["aligned"] / 1e9 / rate
            if predicted <= args.bf16_budget_s:
                net = copy.deepcopy(aligned)
                xin = x
                if channels_last:
                    net = net.to(memory_format=torch.channels_last)
                    xin = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    seconds, out = timed(lambda net=net, xin=xin: net(xin)[PRIMARY_HEAD], device, 1, warmup=False)
                agree = (out.argmax(1) == ref_mask).float().mean().item()
                rows.append((name, seconds, flops["aligned"], agree, "measured"))
            else:
                if emulated_agree is None:
                    emulated_agree = (
                        (emulate_bf16(aligned)(x)[PRIMARY_HEAD].argmax(1) == ref_mask).float().mean().item()
                    )
                rows.append((name, predicted, flops["aligned"], emulated_agree, "predicted; agreement emulated"))
        # contrast: random score layers (tiny logit margins)
        for net in (reference, aligned):
            net.load_state_dict(random_scores, strict=False)
        random_ref = reference(x)[PRIMARY_HEAD].argmax(1)
        random_agree = (aligned(x)[PRIMARY_HEAD].argmax(1) == random_ref).float().mean().item()
        random_agree_bf16 = (emulate_bf16(aligned)(x)[PRIMARY_HEAD].argmax(1) == random_ref).float().mean().item()

    print(f"device {device}, threads {torch.get_num_threads()}, input {args.size}x{args.size}, FCN-8s VGG16")
    best16 = max(peak16, rate16, rate16_cl)
    print(f"matmul peak: fp32 {peak32:.1f} GFLOP/s, bf16 {peak16:.2f} GFLOP/s")
    print(f"3x3 conv probe: fp32 {rate32:.1f}, bf16 {rate16:.2f}, bf16 channels_last {rate16_cl:.2f} GFLOP/s")
    print(f"% of peak: fp32 rows vs the fp32 matmul peak, bf16 rows vs the best bf16 rate above ({best16:.2f})")
    print(f"scene labels {describe(target)}; fitted reference fp32 predicts {describe(ref_mask)}")
    print(f"score layers fitted to the scene: pixel accuracy {fitted_accuracy:.3f} (reference fp32)")
    print()
    columns = "configuration | GFLOP/image | s/image | images/s | GFLOP/s | % of peak | speed-up | mask agreement"
    print(f"| {columns} | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, seconds, f, agree, note in rows:
        peak = best16 if "bf16" in name else peak32
        achieved = f / 1e9 / seconds
        print(
            f"| {name} | {f / 1e9:.0f} | {seconds:.2f} | {1 / seconds:.3f} | {achieved:.1f} | "
            f"{100 * achieved / peak:.0f}% | {t_ref / seconds:.2f}x | {100 * agree:.2f}% | {note} |"
        )
    print()
    print(
        f"random score layers (contrast): aligned fp32 vs reference {100 * random_agree:.2f}%, "
        f"aligned bf16 (emulated) vs reference {100 * random_agree_bf16:.2f}%; "
        f"reference predicts {describe(random_ref)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
