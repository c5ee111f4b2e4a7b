"""Score maps to predictions: a head's float32 logits [N, C, H, W] decoded into per-pixel labels, the
softmax probability of each label (confidence) and per-image statistics, in bands of rows so that the
reductions' temporaries stay a band's size (``DECODE_BAND_PIXELS``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DECODE_BAND_PIXELS = 1 << 18
"""Output pixels decoded together (labels, confidence), about: 21 classes of a 2048 px window are 350 MB of float32
scores, and a softmax over all of them at once held as much again."""


@dataclass
class HeadPrediction:
    """One head's per-pixel class labels (HxW) and, if requested, the softmax probability of that label
    (``confidence``) and the per-image statistics computed on the device (``statistics``)."""

    labels: np.ndarray
    confidence: np.ndarray | None = None
    pixel_counts: np.ndarray | None = None  # int64 [num_classes]: pixels per label; sums to H*W
    mean_confidence: float | None = None  # mean over pixels of the winning label's probability


def label_dtype(classes: int) -> type:
    """uint8 labels up to 256 classes, int32 beyond."""
    return np.uint8 if classes <= 256 else np.int32


def decode_scores(logits: Tensor, confidence: bool, statistics: bool) -> list[HeadPrediction]:
    """One ``HeadPrediction`` per image of one head's ``logits`` [N, C, H, W]: arg-max labels and, as asked,
    the softmax probability of the arg-max and the statistics (reduced on the device). Computed in bands of
    rows (``DECODE_BAND_PIXELS``): the reductions' temporaries are a band's, not a copy of the whole score map."""
    images, classes, height, width = logits.shape
    label_type = torch.uint8 if label_dtype(classes) == np.uint8 else torch.int32
    labels = torch.empty((images, height, width), dtype=label_type, device=logits.device)
    probability = torch.empty_like(labels, dtype=logits.dtype) if confidence or statistics else None
    # a band's pixels are a multiple of 256, so the kernels' vector tails fall on the pixels of a one-pass decode
    step = 256 // math.gcd(width, 256)
    rows = max(step, DECODE_BAND_PIXELS // max(1, images * width) // step * step)
    for y in range(0, height, rows):
        band = logits[:, :, y : y + rows]
        top, index = band.max(1)  # (much faster than argmax on CPU; same first-maximum ties)
        labels[:, y : y + rows] = index
        if probability is not None:
            probability[:, y : y + rows] = torch.exp(top - band.logsumexp(1))
    counts = means = None
    if statistics:
        n = len(labels)
        offsets = torch.arange(n, device=labels.device).mul_(classes).view(n, 1)
        flat = labels.flatten(1).long().add_(offsets)  # image j's label c counts in bin j*C + c
        counts = torch.bincount(flat.flatten(), minlength=n * classes).view(n, classes).cpu().numpy()
        means = probability.flatten(1).double().mean(1).cpu().tolist()
    labels_np = labels.cpu().numpy()
    probability_np = probability.cpu().numpy() if confidence else None
    return [
        HeadPrediction(
            labels_np[j],
            None if probability_np is None else probability_np[j],
            None if counts is None else counts[j],
            None if means is None else means[j],
        )
        for j in range(len(labels_np))
    ]
