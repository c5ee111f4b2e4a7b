"""Cross-entropy against hand computation: ignore label, sum/mean, loss sampling, class weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fcn.losses import cross_entropy


def _hand_terms(logits: torch.Tensor, target: torch.Tensor) -> dict[tuple[int, int, int], float]:
    """-log softmax at the target class, pixel by pixel, with math (not torch)."""
    terms = {}
    n, c, h, w = logits.shape
    for i in range(n):
        for y in range(h):
            for x in range(w):
                t = int(target[i, y, x])
                if t == 255:
                    continue
                values = [float(logits[i, k, y, x]) for k in range(c)]
                terms[(i, y, x)] = math.log(sum(math.exp(v) for v in values)) - values[t]
    return terms


@pytest.fixture
def case() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 5), generator=gen)
    target[0, 0, :3] = 255
    target[1, 2, 2] = 255
    return logits, target


def test_sum_and_mean_match_hand_computation(case: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, target = case
    terms = _hand_terms(logits, target)
    assert len(terms) == 2 * 4 * 5 - 4
    assert float(cross_entropy(logits, target, reduction="sum")) == pytest.approx(sum(terms.values()))
    assert float(cross_entropy(logits, target)) == pytest.approx(sum(terms.values()) / len(terms))


def test_loss_sampling_keeps_the_drawn_pixels(case: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, target = case
    terms = _hand_terms(logits, target)
    rate = 0.5
    kept_mask = torch.rand(target.shape, generator=torch.Generator().manual_seed(7)) < rate
    kept = [v for k, v in terms.items() if kept_mask[k]]
    assert 0 < len(kept) < len(terms)
    got_sum = cross_entropy(
        logits, target, reduction="sum", sample_rate=rate, generator=torch.Generator().manual_seed(7)
    )
    got_mean = cross_entropy(logits, target, sample_rate=rate, generator=torch.Generator().manual_seed(7))
    assert float(got_sum) == pytest.approx(sum(kept))
    assert float(got_mean) == pytest.approx(sum(kept) / len(kept))


def test_class_weights_match_hand_computation_and_torch(case: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Each term times its target class's weight; "mean" divides by the summed weights of the labelled
    pixels (torch's weighted mean), so ignored pixels count in neither sum."""
    logits, target = case
    terms = _hand_terms(logits, target)
    weight = torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64)
    weighted = sum(float(weight[target[k]]) * v for k, v in terms.items())
    weights = sum(float(weight[target[k]]) for k in terms)
    got_sum = cross_entropy(logits, target, reduction="sum", weight=weight)
    got_mean = cross_entropy(logits, target, weight=weight)
    assert float(got_sum) == pytest.approx(weighted)
    assert float(got_mean) == pytest.approx(weighted / weights)
    assert float(got_mean) == pytest.approx(float(F.cross_entropy(logits, target, weight=weight, ignore_index=255)))
    assert float(got_mean) != pytest.approx(float(cross_entropy(logits, target)))
    # only class-2 pixels (weight 0): nothing to average, 0 and not NaN
    only_zero_weight = torch.where(target == 255, target, torch.full_like(target, 2))
    assert float(cross_entropy(logits, only_zero_weight, weight=weight)) == 0.0
    with pytest.raises(ValueError, match="weight must be 3 finite values >= 0"):
        cross_entropy(logits, target, weight=torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="weight must be 3"):
        cross_entropy(logits, target, weight=torch.tensor([1.0, -1.0, 1.0]))


def test_gradient_flows_only_through_kept_pixels(case: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, target = case
    logits = logits.clone().requires_grad_(True)
    cross_entropy(logits, target, reduction="sum").backward()
    grad_per_pixel = logits.grad.abs().sum(1)
    assert torch.all(grad_per_pixel[target == 255] == 0)
    assert torch.all(grad_per_pixel[target != 255] > 0)


def test_all_ignored_mean_is_zero_not_nan() -> None:
    logits = torch.randn(1, 2, 3, 3, requires_grad=True)
    loss = cross_entropy(logits, torch.full((1, 3, 3), 255))
    assert loss.detach().item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_bad_arguments_name_the_problem(case: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, target = case
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="sample_rate"):
        cross_entropy(logits, target, sample_rate=0.0)
    with pytest.raises(ValueError, match="target"):
        cross_entropy(logits, target[:, :3])
    bad = target.clone()
    bad[0, 1, 1] = 3
    with pytest.raises(ValueError, match="label 3"):
        cross_entropy(logits, bad)
