"""The paper's segmentation metrics from a confusion matrix (the reference ``score.py``).

The matrix counts pixels by (ground truth, prediction); pixels whose ground truth is outside
``[0, num_classes)`` (e.g. the ignore label 255) are not counted. Matrices from different workers
or batches merge by addition, so scores of the merged matrix equal scores over all pixels at once.
Classes absent from both ground truth and prediction are skipped by ``nanmean``, as in the reference;
a class absent from the ground truth but predicted somewhere has IU 0.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor


class ConfusionMatrix:
    """A ``num_classes x num_classes`` int64 histogram of (ground truth, prediction) pixel pairs."""

    def __init__(self, num_classes: int, hist: np.ndarray | None = None) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if hist is None:
            hist = np.zeros((num_classes, num_classes), dtype=np.int64)
        elif np.shape(hist) != (num_classes, num_classes):
            raise ValueError(f"hist must have shape ({num_classes}, {num_classes}), got {np.shape(hist)}")
        self.num_classes = num_classes
        self.hist = np.asarray(hist, dtype=np.int64).copy()

    def update(self, pred: np.ndarray | Tensor, gt: np.ndarray | Tensor) -> ConfusionMatrix:
        """Count the pixels of one or more predicted label maps against their ground truth; returns self.

        Accepts numpy arrays or tensors; tensors are counted on their own device.
        """
        if tuple(pred.shape) != tuple(gt.shape):
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground truth shape {tuple(gt.shape)}")
        n = self.num_classes
        pred = _as_long(pred).flatten()
        gt = _as_long(gt).to(pred.device).flatten()
        valid = (gt >= 0) & (gt < n)
        pred, gt = pred[valid], gt[valid]
        bad = pred[(pred < 0) | (pred >= n)]
        if bad.numel():
            raise ValueError(f"prediction contains label {int(bad[0])} outside [0, {n})")
        counts = torch.bincount(n * gt + pred, minlength=n * n).cpu().numpy()
        self.hist += counts.reshape(n, n)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """A new matrix counting the pixels of both."""
        if not isinstance(other, ConfusionMatrix) or other.num_classes != self.num_classes:
            described = f"{other.num_classes} classes" if isinstance(other, ConfusionMatrix) else type(other).__name__
            raise ValueError(f"cannot merge a {self.num_classes}-class confusion matrix with {described}")
        return ConfusionMatrix(self.num_classes, self.hist + other.hist)

    __add__ = merge

    def scores(self) -> dict[str, float | list[float]]:
        """pixel_accuracy, mean_accuracy, mean_iu, fw_iu (floats, NaN if nothing was counted) and
        per_class_iu (NaN for classes absent from both ground truth and prediction)."""
        hist = self.hist.astype(np.float64)
        diag = np.diag(hist)
        gt_count, pred_count, total = hist.sum(1), hist.sum(0), hist.sum()
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN -> NaN, as intended
            class_accuracy = diag / gt_count
            iu = diag / (gt_count + pred_count - diag)
            freq = gt_count / total
            return {
                "pixel_accuracy": float(diag.sum() / total),
                "mean_accuracy": float(np.nanmean(class_accuracy)),
                "mean_iu": float(np.nanmean(iu)),
                "fw_iu": float((freq[freq > 0] * iu[freq > 0]).sum()) if total else float("nan"),
                "per_class_iu": [float(v) for v in iu],
            }

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={int(self.hist.sum())})"


def _as_long(labels: np.ndarray | Tensor) -> Tensor:
    if isinstance(labels, Tensor):
        return labels.long()
    return torch.from_numpy(np.asarray(labels).astype(np.int64))
