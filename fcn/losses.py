"""Per-pixel softmax cross-entropy with an ignore label and the paper's loss sampling (section 3.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum")


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    reduction: str = "mean",
    sample_rate: float = 1.0,
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of ``logits`` [N, C, H, W] against integer ``target`` [N, H, W].

    Pixels labelled ``ignore_index`` contribute nothing. With ``sample_rate`` p < 1 each remaining
    pixel's term is kept independently with probability p (drawn from ``generator`` if given), which
    the paper shows is equivalent to patchwise training. ``weight`` [C] (non-negative) multiplies each
    pixel's term by the weight of its target class. ``reduction="sum"`` adds the kept terms (the
    reference solvers' unnormalised loss); ``"mean"`` divides by the kept pixels' summed weights (their
    number without ``weight``; 0 if that is 0): a weighted average, as ``torch.nn.functional.cross_entropy``
    computes it, so the weights' scale does not change the loss's.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"expected logits [N, C, H, W] and target [N, H, W], got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if target.is_floating_point():
        raise ValueError(f"target must hold integer labels, got dtype {target.dtype}")
    if weight is not None and (weight.shape != logits.shape[1:2] or not ((weight >= 0) & weight.isfinite()).all()):
        raise ValueError(f"weight must be {logits.shape[1]} finite values >= 0 (one per class), got {weight.tolist()}")
    target = target.long()
    kept = target != ignore_index
    out_of_range = kept & ((target < 0) | (target >= logits.shape[1]))
    if out_of_range.any():
        label = int(target[out_of_range][0])
        raise ValueError(f"target contains label {label} outside [0, {logits.shape[1]}) that is not ignore_index")
    if sample_rate < 1.0:
        device = generator.device if generator is not None else target.device
        draw = torch.rand(target.shape, generator=generator, device=device).to(target.device)
        kept &= draw < sample_rate
    terms = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    pixel_weight = kept.to(terms.dtype)
    if weight is not None:
        pixel_weight = pixel_weight * weight.to(terms)[target.masked_fill(~kept, 0)]
    total = (terms * pixel_weight).sum()
    if reduction == "sum":
        return total
    return total / pixel_weight.sum().clamp(min=torch.finfo(terms.dtype).tiny)
