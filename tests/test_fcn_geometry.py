"""Coordinate mapping, crop offsets, bilinear kernels and the alignment of score maps with the image."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn

from fcn.geometry import CoordMap, bilinear_kernel, conv_flops, coord_map, crop_offset, fuse_offset, receptive_field
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
    model = get_model(name, width=1 / 64, geometry=geometry, num_classes=2).eval()  # only channel 0 matters
    with torch.no_grad():
        for layer_name in model.backbone.layer_names:
            conv = getattr(model.backbone, layer_name)
            if isinstance(conv, nn.Conv2d):
                conv.weight.zero_()
                conv.bias.zero_()
                c = conv.kernel_size[0] // 2
                conv.weight[0, 0, c, c] = 1.0
        for score in ("score_fr", "score_pool4", "score_pool3"):
            if hasattr(model.head, score):
                getattr(model.head, score).weight.zero_()
        source = {"fc7": "score_fr", "pool4": "score_pool4", "pool3": "score_pool3"}[path]
        getattr(model.head, source).weight[1, 0] = 1.0
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
def test_score_peaks_sit_at_the_centre_of_the_pixels_they_pool(
    name: str, path: str, stride: int, geometry: str
) -> None:
    """An impulse at column p lights the one cell whose pooling block holds p; the upsampled score
    must peak at the centre of that block. A crop off by even one pixel moves the peak off centre."""
    width_px = 128
    model = _impulse_net(name, geometry, path)
    x = torch.zeros(width_px, 3, 1, width_px)
    x[torch.arange(width_px), 0, 0, torch.arange(width_px)] = 1.0
    with torch.no_grad():
        score = model(x)["semantic"][:, 1, 0, :]  # [impulse position, output column]
    peak = score.max(dim=1, keepdim=True).values
    at_peak = (score >= peak - 1e-5 * peak).float()
    centre = (at_peak * torch.arange(width_px)).sum(1) / at_peak.sum(1)
    blocks: dict[float, list[int]] = {}
    for p in range(width_px):
        blocks.setdefault(round(centre[p].item(), 3), []).append(p)
    full = [(c, ps) for c, ps in blocks.items() if len(ps) == stride]
    sizes = [len(v) for v in blocks.values()]
    assert len(full) >= width_px // stride - 2, f"expected blocks of {stride} pixels, got {sizes}"
    for c, ps in full:
        assert ps == list(range(ps[0], ps[0] + stride))
        assert c == pytest.approx((ps[0] + ps[-1]) / 2), f"peak at {c}, block {ps[0]}..{ps[-1]}"


def _interior_cells(model: nn.Module, tap: str, size: int) -> list[int]:
    """Cells of a tap whose receptive field lies inside a ``size``-pixel image (no padding seen)."""
    trunk = model.backbone
    upto = trunk.layer_names[: trunk.layer_names.index(tap if tap != "fc7" else "drop7") + 1]
    field = receptive_field(getattr(trunk, n) for n in upto)
    m = trunk.tap_maps()[tap]
    half = Fraction(field - 1, 2)
    return [i for i in range(size) if m(i) - half >= 0 and m(i) + half <= size - 1]


def test_aligned_equals_reference_wherever_no_padding_is_seen() -> None:
    """Both geometries put the score grid at the same image positions (pad 100 = pad 4 + three fc6
    cells), and every cell that sees no padding is equal to float tolerance, for any weights; only
    the border band, which sees zeros at different depths, may differ."""
    torch.manual_seed(0)
    size = 448
    reference = get_model("fcn8s_vgg16", width=WIDTH, num_classes=4).eval()
    aligned = get_model("fcn8s_vgg16", width=WIDTH, num_classes=4, geometry="aligned").eval()
    aligned.load_state_dict(reference.state_dict())
    assert reference.backbone.tap_maps()["fc7"] == aligned.backbone.tap_maps()["fc7"]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref, ali = reference.backbone.features(x), aligned.backbone.features(x)
    for tap in ("pool3", "pool4", "fc7"):
        cells = _interior_cells(reference, tap, size)
        assert len(cells) >= 2, tap
        ref_at = {reference.backbone.tap_maps()[tap](i): i for i in cells}
        ali_at = {aligned.backbone.tap_maps()[tap](i): i for i in _interior_cells(aligned, tap, size)}
        assert ref_at.keys() == ali_at.keys(), tap  # the same image positions, maybe other indices
        i = torch.tensor([ref_at[p] for p in sorted(ref_at)])
        j = torch.tensor([ali_at[p] for p in sorted(ali_at)])
        a = ref[tap][..., i[:, None], i]
        b = ali[tap][..., j[:, None], j]
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the border band does differ (this is what the agreement numbers in the README measure)
    assert not torch.allclose(ref["fc7"][..., :2, :2], ali["fc7"][..., :2, :2], rtol=1e-3, atol=1e-4)


def test_aligned_saves_the_pad_100_flops() -> None:
    with torch.device("meta"):
        reference = get_model("fcn8s_vgg16").eval()
        aligned = get_model("fcn8s_vgg16", geometry="aligned").eval()
    ref, ali = conv_flops(reference, 500), conv_flops(aligned, 500)
    # 500x500: conv1 runs on 698x698 vs 508x508 pixels; fc6/fc7 run on the same 16x16 cells.
    assert (round(ref / 1e9), round(ali / 1e9)) == (363, 221), (ref, ali)  # the README's figures


@pytest.mark.parametrize(("output_stride", "geometry"), [(16, "reference"), (16, "aligned"), (8, "aligned")])
def test_rarefaction_equals_shift_and_stitch(output_stride: int, geometry: str) -> None:
    """Paper 3.2: dropping pooling strides and dilating later filters (output_stride < 32) gives, at
    every fc7 cell, the stride-32 net's fc7 on the input shifted by a multiple of output_stride.
    Compared on cells that see no padding (padding makes any shift differ at the border)."""
    torch.manual_seed(0)
    size = 440
    coarse = get_model("fcn32s_vgg16", width=WIDTH, geometry=geometry).eval()
    fine = get_model("fcn32s_vgg16", width=WIDTH, geometry=geometry, output_stride=output_stride).eval()
    fine.backbone.load_state_dict(coarse.backbone.state_dict())
    image = torch.randn(1, 3, size, size)
    with torch.no_grad():
        dense = fine.backbone.features(image)["fc7"]
    dense_at = {fine.backbone.tap_maps()["fc7"](i): i for i in _interior_cells(fine, "fc7", size)}
    phases: set[Fraction] = set()
    for dy in range(0, 32, output_stride):
        for dx in range(0, 32, output_stride):
            with torch.no_grad():
                shifted = coarse.backbone.features(image[..., dy:, dx:])["fc7"]
            cells = _interior_cells(coarse, "fc7", size - max(dy, dx))
            m = coarse.backbone.tap_maps()["fc7"]
            rows = [(i, m(i) + dy) for i in cells if m(i) + dy in dense_at]
            cols = [(j, m(j) + dx) for j in cells if m(j) + dx in dense_at]
            assert rows and cols, (dy, dx)
            i = torch.tensor([i for i, _ in rows])
            j = torch.tensor([j for j, _ in cols])
            y = torch.tensor([dense_at[y] for _, y in rows])
            x = torch.tensor([dense_at[x] for _, x in cols])
            torch.testing.assert_close(dense[..., y[:, None], x], shifted[..., i[:, None], j], rtol=1e-4, atol=1e-5)
            phases.add(rows[0][1] % 32)
    assert len(phases) == 32 // output_stride  # the stitched cells interlace every phase of the fine grid


def test_aligned_masks_agree_with_reference_for_fitted_weights() -> None:
    """With weights that carry a signal (score layers fitted to synthetic scenes; random score layers
    give near-tied logits, where any change flips labels and agreement means nothing), the aligned
    net labels almost every pixel as the reference does: only the border band can differ."""
    import numpy as np
    from PIL import Image

    from fcn import get_convention
    from pipelines.synthetic import render_scene

    size = 160
    images, labels = [], []
    for seed in range(4):  # scenes drawn small and enlarged, so objects are large
        image, label = render_scene(np.random.default_rng(seed), size // 4, size // 4, 4)
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize((size, size), Image.Resampling.NEAREST))
        images.append(get_convention("torchvision").to_tensor(image))
        labels.append(torch.from_numpy(label.astype(np.int64)))
    x, y = torch.stack(images), torch.stack(labels)
    torch.manual_seed(0)
    reference = get_model("fcn8s_vgg16", width=WIDTH, num_classes=6).eval()
    with torch.no_grad():
        feats = reference.backbone.features(x)
    optimizer = torch.optim.Adam([p for n, p in reference.head.named_parameters() if n.startswith("score")], lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference.head(feats, x.shape[-2:]), y).backward()
        optimizer.step()
    aligned = get_model("fcn8s_vgg16", width=WIDTH, num_classes=6, geometry="aligned").eval()
    aligned.load_state_dict(reference.state_dict())
    with torch.no_grad():
        ref_mask, ali_mask = reference(x)["semantic"].argmax(1), aligned(x)["semantic"].argmax(1)
    background = (y == 0).float().mean()
    assert (ref_mask == y).float().mean() > background + 0.05  # the weights do segment
    assert (ref_mask != 0).any() and (ali_mask != 0).any()
    assert (ali_mask == ref_mask).float().mean() >= 0.95  # measured 0.983


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 5, 3, bias=False), nn.ConvTranspose2d(3, 5, 4, stride=2, bias=False)])
def test_conv_flops_counts_every_multiply_accumulate_once(layer: nn.Module) -> None:
    """Brute force: a dense layer's multiply-accumulates are the nonzero products of a one-hot probe."""
    x = torch.zeros(1, 3, 7, 7)
    products = 0
    for index in range(x.numel()):  # each input element multiplies its out_channels x k x k kernel entries once
        probe = torch.zeros_like(x).view(-1)
        probe[index] = 1
        layer_with_ones = type(layer)(**_same_args(layer))
        nn.init.ones_(layer_with_ones.weight)
        with torch.no_grad():
            products += int(layer_with_ones(probe.view_as(x)).count_nonzero())
    assert conv_flops(nn.Sequential(layer), 7) == 2 * products


def _same_args(layer: nn.Module) -> dict:
    return {
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "kernel_size": layer.kernel_size,
        "stride": layer.stride,
        "padding": layer.padding,
        "bias": False,
    }
