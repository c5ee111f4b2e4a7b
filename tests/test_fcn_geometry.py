"""Coordinate mapping, crop offsets, bilinear kernels and the alignment of score maps with the image."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn

from fcn.geometry import CoordMap, bilinear_kernel, coord_map, crop_offset, fuse_offset, receptive_field
from fcn.models import get_model

WIDTH = 1 / 16


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fcn32s_vgg16", {"score": 19}),
        ("fcn16s_vgg16", {"score_pool4c": 5, "score": 27}),
        ("fcn8s_vgg16", {"score_pool4c": 5, "score_pool3c": 9, "score": 31}),
        ("fcn8s_atonce_vgg16", {"score_pool4c": 5, "score_pool3c": 9, "score": 31}),
    ],
)
def test_reference_crops_come_out_of_the_coordinate_map(name: str, expected: dict[str, int]) -> None:
    with torch.device("meta"):
        model = get_model(name)  # full width: the crops do not depend on it, but check the real net
    assert model.crops == expected


def test_coord_map_of_layers() -> None:
    # conv pad 100 then a 2x2/2 pool: x = 2*y + 0.5 - 99
    layers = [nn.Conv2d(1, 1, 3, padding=100), nn.MaxPool2d(2, 2)]
    m = coord_map(layers)
    assert m == CoordMap(Fraction(2), Fraction(-197, 2))
    # a transposed conv undoes a conv of the same kernel/stride
    up = coord_map([nn.Conv2d(1, 1, 4, stride=2), nn.ConvTranspose2d(1, 1, 4, stride=2)])
    assert up == CoordMap()
    assert crop_offset(CoordMap(Fraction(1), Fraction(-19))) == 19
    with pytest.raises(ValueError, match="misaligned"):
        crop_offset(CoordMap(Fraction(1), Fraction(-37, 2)))
    with pytest.raises(ValueError, match="scale"):
        crop_offset(CoordMap(Fraction(2), Fraction(0)))
    assert fuse_offset(CoordMap(Fraction(16), Fraction(-23, 2)), CoordMap(Fraction(16), Fraction(-183, 2))) == 5
    with pytest.raises(ValueError, match="fraction of a cell"):
        fuse_offset(CoordMap(Fraction(16), Fraction(0)), CoordMap(Fraction(16), Fraction(8)))


def test_receptive_fields() -> None:
    with torch.device("meta"):
        vgg = get_model("fcn32s_vgg16")
        rarefied = get_model("fcn32s_vgg16", output_stride=8)
    assert vgg.receptive_field == 404  # paper Table 1
    assert rarefied.receptive_field == 404  # rarefaction keeps the field, only densifies the grid
    assert receptive_field([nn.Conv2d(1, 1, 3), nn.MaxPool2d(2, 2), nn.Conv2d(1, 1, 3, dilation=2)]) == 1 + 2 + 1 + 8


def test_bilinear_kernel_is_the_reference_formula() -> None:
    k4 = bilinear_kernel(2, 2, 4)
    expected = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(k4[0, 0], torch.outer(expected, expected))
    torch.testing.assert_close(k4[1, 1], k4[0, 0])
    assert k4[0, 1].abs().sum() == 0 and k4[1, 0].abs().sum() == 0
    k3 = bilinear_kernel(1, 1, 3)[0, 0]
    torch.testing.assert_close(k3, torch.outer(torch.tensor([0.5, 1.0, 0.5]), torch.tensor([0.5, 1.0, 0.5])))
    with pytest.raises(ValueError, match="in 2 != out 3"):
        bilinear_kernel(2, 3, 4)


def test_bilinear_upsampling_reproduces_a_linear_ramp() -> None:
    up = nn.ConvTranspose2d(1, 1, 16, stride=8, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(1, 1, 16))
    ramp = torch.arange(10, dtype=torch.float32).view(1, 1, 1, 10).expand(1, 1, 10, 10)
    out = up(ramp)[0, 0]
    interior = out[20:60, 20:60]  # away from the border cells that only get one neighbour
    step = interior[:, 1:] - interior[:, :-1]
    torch.testing.assert_close(step, torch.full_like(step, 1 / 8))
    torch.testing.assert_close(interior[1:], interior[:-1])


def _impulse_net(name: str, geometry: str, path: str) -> nn.Module:
    """A net that carries input channel 0 straight through (max pooling spreads it over one cell) and
    scores class 1 from only one of the three paths (fc7, pool4 or pool3)."""
    model = get_model(name, width=WIDTH, geometry=geometry, num_classes=2).eval()
    with torch.no_grad():
        for layer_name in model.layer_names:
            conv = getattr(model, layer_name)
            if isinstance(conv, nn.Conv2d):
                conv.weight.zero_()
                conv.bias.zero_()
                c = conv.kernel_size[0] // 2
                conv.weight[0, 0, c, c] = 1.0
        for score in ("score_fr", "score_pool4", "score_pool3"):
            if hasattr(model, score):
                getattr(model, score).weight.zero_()
        source = {"fc7": "score_fr", "pool4": "score_pool4", "pool3": "score_pool3"}[path]
        getattr(model, source).weight[1, 0] = 1.0
    return model


@pytest.mark.parametrize("geometry", ["reference", "aligned"])
@pytest.mark.parametrize(
    ("name", "path", "stride"),
    [
        ("fcn32s_vgg16", "fc7", 32),
        ("fcn16s_vgg16", "fc7", 32),
        ("fcn16s_vgg16", "pool4", 16),
        ("fcn8s_vgg16", "fc7", 32),
        ("fcn8s_vgg16", "pool4", 16),
        ("fcn8s_vgg16", "pool3", 8),
    ],
)
def test_score_peaks_sit_at_the_centre_of_the_pixels_they_pool(name: str, path: str, stride: int, geometry: str) -> None:
    """An impulse at column p lights the one cell whose pooling block holds p; the upsampled score
    must peak at the centre of that block. A crop off by even one pixel moves the peak off centre."""
    width_px = 128
    model = _impulse_net(name, geometry, path)
    x = torch.zeros(width_px, 3, 1, width_px)
    x[torch.arange(width_px), 0, 0, torch.arange(width_px)] = 1.0
    with torch.no_grad():
        score = model(x)[:, 1, 0, :]  # [impulse position, output column]
    peak = score.max(dim=1, keepdim=True).values
    at_peak = (score >= peak - 1e-5 * peak).float()
    centre = (at_peak * torch.arange(width_px)).sum(1) / at_peak.sum(1)
    blocks: dict[float, list[int]] = {}
    for p in range(width_px):
        blocks.setdefault(round(centre[p].item(), 3), []).append(p)
    full = [(c, ps) for c, ps in blocks.items() if len(ps) == stride]
    assert len(full) >= width_px // stride - 2, f"expected blocks of {stride} pixels, got {[len(v) for v in blocks.values()]}"
    for c, ps in full:
        assert ps == list(range(ps[0], ps[0] + stride))
        assert c == pytest.approx((ps[0] + ps[-1]) / 2), f"peak at {c}, block {ps[0]}..{ps[-1]}"
