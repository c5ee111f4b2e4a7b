"""The FCN networks: any-size output, attributes, arguments, upsampling layers, at-once scaling."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import fcn
from fcn.geometry import bilinear_kernel
from fcn.models import BUILDERS, get_model

WIDTH = 1 / 16
VGG_NAMES = ["fcn32s_vgg16", "fcn16s_vgg16", "fcn8s_vgg16", "fcn8s_atonce_vgg16"]
ALL_NAMES = [*VGG_NAMES, "fcn32s_alexnet", "fcn32s_googlenet"]


def randomize_scores(model: nn.Module, seed: int = 0) -> nn.Module:
    """Score layers start at zero; give them values so outputs depend on every path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("score_fr", "score_pool4", "score_pool3"):
            if hasattr(model, name):
                w = getattr(model, name).weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("geometry", ["reference", "aligned"])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_output_is_input_sized_for_any_input(name: str, geometry: str) -> None:
    model = get_model(name, width=WIDTH, geometry=geometry, num_classes=5).eval()
    with torch.no_grad():
        for h, w in [(1, 1), (2, 7), (31, 33), (45, 97)]:
            out = model(torch.randn(2, 3, h, w))
            assert out.shape == (2, 5, h, w), (h, w)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("geometry", ["reference", "aligned"])
@pytest.mark.parametrize("name", [n for n in ALL_NAMES if n != "fcn8s_atonce_vgg16"])
def test_rarefied_nets_are_input_sized(name: str, geometry: str, output_stride: int) -> None:
    model = get_model(name, width=WIDTH, geometry=geometry, output_stride=output_stride).eval()
    assert model.output_stride == output_stride
    with torch.no_grad():
        for h, w in [(1, 1), (17, 40)]:
            assert model(torch.randn(1, 3, h, w)).shape == (1, 21, h, w)


def test_large_odd_input_full_width_shape() -> None:
    with torch.device("meta"):
        model = get_model("fcn8s_vgg16").eval()
        out = model(torch.empty(1, 3, 1001, 777))
    assert out.shape == (1, 21, 1001, 777)
    assert model.fc6.weight.shape == (4096, 512, 7, 7)
    assert model.fc7.weight.shape == (4096, 4096, 1, 1)


RECEPTIVE_FIELDS = {"fcn32s_alexnet": 355, "fcn32s_googlenet": 379}
"""Paper Table 1: 404 (VGG16), 355 (AlexNet); GoogLeNet 907 in the paper, which has true 5x5
branches and counts the final 7x7 average pooling; torchvision's 3x3 "5x5" branches give 379."""


@pytest.mark.parametrize("name", ALL_NAMES)
def test_model_attributes(name: str) -> None:
    model = fcn.get_model(name, num_classes=7, width=0.125, geometry="aligned", learnable_upsampling=False)
    assert model.num_classes == 7
    assert model.output_stride == 32
    assert model.receptive_field == RECEPTIVE_FIELDS.get(name, 404)
    assert model.arch == {
        "name": name,
        "kwargs": {
            "num_classes": 7,
            "geometry": "aligned",
            "width": 0.125,
            "output_stride": 32,
            "learnable_upsampling": False,
        },
    }
    json.dumps(model.arch)
    rebuilt = get_model(model.arch["name"], **model.arch["kwargs"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_width_scales_every_layer_including_fc() -> None:
    model = get_model("fcn8s_vgg16", width=0.25)
    assert model.conv1_1.out_channels == 16
    assert model.conv5_3.out_channels == 128
    assert model.fc6.out_channels == 1024 and model.fc7.out_channels == 1024
    assert model.score_pool3.in_channels == 64 and model.score_pool4.in_channels == 128


@pytest.mark.parametrize("learnable", [True, False])
def test_upsampling_is_bilinear_and_learnable_or_frozen(learnable: bool) -> None:
    model = get_model("fcn8s_vgg16", width=WIDTH, num_classes=3, learnable_upsampling=learnable)
    for name, kernel in [("upscore2", 4), ("upscore_pool4", 4), ("upscore8", 16)]:
        up = getattr(model, name)
        assert isinstance(up, nn.ConvTranspose2d) and up.bias is None
        assert up.kernel_size == (kernel, kernel) and up.stride == (kernel // 2, kernel // 2)
        torch.testing.assert_close(up.weight.detach(), bilinear_kernel(3, 3, kernel))
        assert up.weight.requires_grad is learnable
    assert model.fc6.weight.requires_grad and model.score_fr.weight.requires_grad


def test_pytorch_fcn_kernel_sizes() -> None:
    with torch.device("meta"):
        m32, m16 = get_model("fcn32s_vgg16"), get_model("fcn16s_vgg16")
    assert m32.upscore.kernel_size == (64, 64) and m32.upscore.stride == (32, 32)
    assert m16.upscore2.kernel_size == (4, 4) and m16.upscore16.kernel_size == (32, 32)


def test_at_once_scales_pool4_and_pool3() -> None:
    torch.manual_seed(0)
    at_once = randomize_scores(get_model("fcn8s_atonce_vgg16", width=WIDTH)).eval()
    plain = get_model("fcn8s_vgg16", width=WIDTH).eval()
    state = at_once.state_dict()
    state["score_pool4.weight"] = state["score_pool4.weight"] * 0.01
    state["score_pool3.weight"] = state["score_pool3.weight"] * 1e-4
    plain.load_state_dict(state)
    x = torch.randn(1, 3, 40, 50)
    with torch.no_grad():
        a, b = at_once(x), plain(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert at_once.arch["name"] == "fcn8s_atonce_vgg16"


def test_skips_contribute() -> None:
    """FCN-8s's output changes when only the pool3 path's weights change (the fusion is wired in)."""
    model = randomize_scores(get_model("fcn8s_vgg16", width=WIDTH)).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        before = model(x)
        model.score_pool3.weight.mul_(2)
        after = model(x)
    assert not torch.allclose(before, after)


def test_get_model_rejects_bad_names_and_arguments() -> None:
    with pytest.raises(ValueError, match="unknown model 'fcn4s_vgg16'"):
        get_model("fcn4s_vgg16")
    with pytest.raises(ValueError, match="unknown argument.*'depth'"):
        get_model("fcn8s_vgg16", depth=3)
    bad = [
        ({"geometry": "tight"}, "geometry"),
        ({"width": 0}, "width"),
        ({"width": float("nan")}, "width"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"output_stride": 4}, "output_stride"),
        ({"learnable_upsampling": "yes"}, "learnable_upsampling"),
    ]
    for kwargs, word in bad:
        with pytest.raises(ValueError, match=word):
            get_model("fcn16s_vgg16", **kwargs)


def test_bad_input_tensor_names_the_problem() -> None:
    model = get_model("fcn32s_vgg16", width=WIDTH)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        model(torch.randn(3, 32, 32))


def test_package_exports_builders() -> None:
    assert sorted(BUILDERS) == sorted(ALL_NAMES)
    for name in ALL_NAMES:
        assert getattr(fcn, name) is BUILDERS[name]
    assert fcn.get_model is get_model


PAPER_PARAMETERS = {"fcn32s_alexnet": 57e6, "fcn32s_vgg16": 134e6, "fcn32s_googlenet": 6e6}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMETERS))
def test_parameter_counts_match_the_paper(name: str) -> None:
    """Paper Table 1 prints 57M, 134M, 6M: whole millions, so the tolerance is half a million
    (for 6M, printed with one significant digit, that is [5.5M, 6.5M)). Counted: the
    convolutionalized classifier plus the 21-class score layer; the upsampling layer (bilinear,
    fixed in the paper's Table 1 comparison; 21x21x63x63 = 1.75M weights) is not part of it."""
    with torch.device("meta"):
        model = get_model(name)
    count = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("upscore"))
    assert abs(count - PAPER_PARAMETERS[name]) < 0.5e6, count


@pytest.mark.parametrize(
    ("name", "classifier", "dropped"),
    [
        ("fcn32s_alexnet", torchvision.models.alexnet, ()),
        (
            "fcn32s_googlenet",
            lambda weights: torchvision.models.googlenet(weights=weights, aux_logits=False, init_weights=False),
            ("fc.",),
        ),
    ],
)
def test_trunks_are_torchvision_definitions(name: str, classifier, dropped: tuple[str, ...]) -> None:
    """At width 1 the rebuilt trunk has exactly the torchvision classifier's convolution shapes."""
    with torch.device("meta"):
        tv = classifier(weights=None)
        model = get_model(name)
    tv_convs = [m.weight.shape for n, m in tv.named_modules() if isinstance(m, nn.Conv2d)]
    fcn_convs = [
        m.weight.shape
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and not n.startswith(("fc", "score"))
    ]
    assert fcn_convs == tv_convs
    if name == "fcn32s_googlenet":
        tv_keys = {k for k in tv.state_dict() if not k.startswith(dropped)}
        assert tv_keys == {k for k in model.state_dict() if not k.startswith(("score_fr", "upscore"))}
    else:
        assert model.fc6.weight.shape == (4096, 256, 6, 6) and model.fc7.weight.shape == (4096, 4096, 1, 1)
        assert model.crops == {"score": 18}  # Caffe voc-fcn-alexnet
