"""Metrics against hand-computed confusion matrices, and merging equals counting all at once."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fcn.metrics import ConfusionMatrix


def test_hand_computed_three_class_case() -> None:
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = ConfusionMatrix(3).update(pred, gt)
    # (gt, pred): (0,0) x2, (0,1) x1, (1,1) x2, (2,2) x1, (2,0) x1; the 255 pixel is not counted.
    assert cm.hist.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    s = cm.scores()
    assert s["pixel_accuracy"] == pytest.approx(5 / 7)
    assert s["mean_accuracy"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    ius = [2 / (3 + 3 - 2), 2 / (2 + 3 - 2), 1 / (2 + 1 - 1)]
    assert s["per_class_iu"] == pytest.approx(ius)
    assert s["mean_iu"] == pytest.approx(sum(ius) / 3)
    assert s["fw_iu"] == pytest.approx(3 / 7 * ius[0] + 2 / 7 * ius[1] + 2 / 7 * ius[2])


def test_absent_classes_follow_nanmean() -> None:
    # Class 2 never appears: excluded from mean accuracy and mean IU. Class 3 is predicted but absent
    # from the ground truth: accuracy undefined (skipped), IU 0 (counted), as in score.py.
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 3, 1, 1])
    s = ConfusionMatrix(4).update(pred, gt).scores()
    assert s["mean_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert math.isnan(s["per_class_iu"][2])
    assert s["per_class_iu"][3] == 0.0
    assert s["mean_iu"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert s["fw_iu"] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)


def test_empty_matrix_scores_are_nan() -> None:
    s = ConfusionMatrix(2).update(np.array([0, 1]), np.array([255, 255])).scores()
    assert all(math.isnan(s[k]) for k in ("pixel_accuracy", "mean_accuracy", "mean_iu", "fw_iu"))


def test_merge_equals_joint_count() -> None:
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 6, size=(9, 11)) for _ in range(4)]
    preds = [rng.integers(0, 5, size=(9, 11)) for _ in range(4)]
    for gt in gts:
        gt[rng.random(gt.shape) < 0.1] = 255
    joint = ConfusionMatrix(5)
    for pred, gt in zip(preds, gts):
        joint.update(pred, gt)
    workers = [ConfusionMatrix(5).update(p, g) for p, g in zip(preds, gts)]
    merged = workers[0] + workers[1] + workers[2].merge(workers[3])
    np.testing.assert_array_equal(merged.hist, joint.hist)
    assert merged.scores() == joint.scores()
    # gt label 5 is outside a 5-class matrix and is not counted, like 255.
    assert joint.hist.sum() == sum(int(((g >= 0) & (g < 5)).sum()) for g in gts)


def test_tensor_and_array_inputs_agree() -> None:
    gen = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 4, (2, 7, 5), generator=gen)
    pred = torch.randint(0, 4, (2, 7, 5), generator=gen)
    a = ConfusionMatrix(4).update(pred, gt)
    b = ConfusionMatrix(4).update(pred.numpy().astype(np.uint8), gt.numpy().astype(np.uint8))
    np.testing.assert_array_equal(a.hist, b.hist)
    assert a.hist.dtype == np.int64


def test_bad_inputs_name_the_problem() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="label 7"):
        cm.update(np.array([7]), np.array([1]))
    with pytest.raises(ValueError, match="merge a 3-class"):
        cm.merge(ConfusionMatrix(4))
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)
