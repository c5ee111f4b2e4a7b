"""The FCN networks: any-size output, attributes, arguments, upsampling layers, at-once scaling."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import fcn
from fcn.geometry import bilinear_kernel
from fcn.models import NETWORKS, get_model, register_model
from fcn.weights import load_backbone

WIDTH = 1 / 16
VGG_NAMES = ["fcn32s_vgg16", "fcn16s_vgg16", "fcn8s_vgg16", "fcn8s_atonce_vgg16", "fcn4s_vgg16", "fcn2s_vgg16"]
ALL_NAMES = [*VGG_NAMES, "fcn32s_alexnet", "fcn32s_googlenet"]
NYUD_NAMES = ["fcn32s_rgbd_vgg16", "fcn32s_hha_vgg16", "fcn32s_rgbhha_vgg16", "fcn16s_rgbhha_vgg16"]
SIFTFLOW_NAMES = ["fcn32s_siftflow_vgg16", "fcn16s_siftflow_vgg16", "fcn8s_siftflow_vgg16"]


def randomize_scores(model: nn.Module, seed: int = 0) -> nn.Module:
    """Score layers start at zero; give them values so outputs depend on every path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if ".score_" in name and name.endswith("weight"):
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("geometry", ["reference", "aligned"])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_output_is_input_sized_for_any_input(name: str, geometry: str) -> None:
    model = get_model(name, width=WIDTH, geometry=geometry, num_classes=5).eval()
    with torch.no_grad():
        for h, w in [(1, 1), (2, 7), (31, 33), (45, 97)]:
            out = model(torch.randn(2, 3, h, w))
            assert list(out) == ["semantic"]  # a single-head net's scores are a dict too
            assert out["semantic"].shape == (2, 5, h, w), (h, w)
            assert torch.isfinite(out["semantic"]).all()


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("geometry", ["reference", "aligned"])
@pytest.mark.parametrize("name", [n for n in ALL_NAMES if n != "fcn8s_atonce_vgg16"])
def test_rarefied_nets_are_input_sized(name: str, geometry: str, output_stride: int) -> None:
    model = get_model(name, width=WIDTH, geometry=geometry, output_stride=output_stride).eval()
    assert model.output_stride == output_stride
    with torch.no_grad():
        for h, w in [(1, 1), (17, 40)]:
            assert model(torch.randn(1, 3, h, w))["semantic"].shape == (1, 21, h, w)


def test_large_odd_input_full_width_shape() -> None:
    with torch.device("meta"):
        model = get_model("fcn8s_vgg16").eval()
        out = model(torch.empty(1, 3, 1001, 777))["semantic"]
    assert out.shape == (1, 21, 1001, 777)
    assert model.backbone.fc6.weight.shape == (4096, 512, 7, 7)
    assert model.backbone.fc7.weight.shape == (4096, 4096, 1, 1)


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
    trunk, head = model.backbone, model.head
    assert trunk.conv1_1.out_channels == 16
    assert trunk.conv5_3.out_channels == 128
    assert trunk.fc6.out_channels == 1024 and trunk.fc7.out_channels == 1024
    assert head.score_pool3.in_channels == 64 and head.score_pool4.in_channels == 128


@pytest.mark.parametrize("learnable", [True, False])
def test_upsampling_is_bilinear_and_learnable_or_frozen(learnable: bool) -> None:
    model = get_model("fcn8s_vgg16", width=WIDTH, num_classes=3, learnable_upsampling=learnable)
    for name, kernel in [("upscore2", 4), ("upscore_pool4", 4), ("upscore8", 16)]:
        up = getattr(model.head, name)
        assert isinstance(up, nn.ConvTranspose2d) and up.bias is None
        assert up.kernel_size == (kernel, kernel) and up.stride == (kernel // 2, kernel // 2)
        torch.testing.assert_close(up.weight.detach(), bilinear_kernel(3, 3, kernel))
        assert up.weight.requires_grad is learnable
    assert model.backbone.fc6.weight.requires_grad and model.head.score_fr.weight.requires_grad


def test_pytorch_fcn_kernel_sizes() -> None:
    with torch.device("meta"):
        m32, m16 = get_model("fcn32s_vgg16"), get_model("fcn16s_vgg16")
    assert m32.head.upscore.kernel_size == (64, 64) and m32.head.upscore.stride == (32, 32)
    assert m16.head.upscore2.kernel_size == (4, 4) and m16.head.upscore16.kernel_size == (32, 32)


def test_at_once_scales_pool4_and_pool3() -> None:
    torch.manual_seed(0)
    at_once = randomize_scores(get_model("fcn8s_atonce_vgg16", width=WIDTH)).eval()
    plain = get_model("fcn8s_vgg16", width=WIDTH).eval()
    state = at_once.state_dict()
    state["heads.semantic.rgb.score_pool4.weight"] = state["heads.semantic.rgb.score_pool4.weight"] * 0.01
    state["heads.semantic.rgb.score_pool3.weight"] = state["heads.semantic.rgb.score_pool3.weight"] * 1e-4
    plain.load_state_dict(state)
    x = torch.randn(1, 3, 40, 50)
    with torch.no_grad():
        a, b = at_once(x), plain(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # (dicts of scores by head)
    assert at_once.arch["name"] == "fcn8s_atonce_vgg16"


def test_skips_contribute() -> None:
    """FCN-8s's output changes when only the pool3 path's weights change (the fusion is wired in)."""
    model = randomize_scores(get_model("fcn8s_vgg16", width=WIDTH)).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        before = model(x)["semantic"]
        model.head.score_pool3.weight.mul_(2)
        after = model(x)["semantic"]
    assert not torch.allclose(before, after)


def test_get_model_rejects_bad_names_and_arguments() -> None:
    with pytest.raises(ValueError, match="unknown model 'fcn1s_vgg16'"):
        get_model("fcn1s_vgg16")
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
    assert sorted(NETWORKS) == sorted([*ALL_NAMES, *NYUD_NAMES, *SIFTFLOW_NAMES])
    for name, network in NETWORKS.items():
        assert network.name == name and getattr(fcn, name) is network.builder is getattr(fcn.models, name)
    assert fcn.get_model is get_model
    with pytest.raises(AttributeError, match="no attribute 'fcn64s_vgg16'"):
        fcn.fcn64s_vgg16  # noqa: B018


PAPER_LR = {
    "fcn32s_vgg16": 1e-10,
    "fcn16s_vgg16": 1e-12,
    "fcn8s_vgg16": 1e-14,
    "fcn8s_atonce_vgg16": 1e-10,
    "fcn32s_hha_vgg16": 1e-10,
    "fcn32s_rgbhha_vgg16": 1e-12,
    "fcn32s_siftflow_vgg16": 1e-10,
    "fcn16s_siftflow_vgg16": 1e-12,
}
"""The reference solvers' fixed rates (summed loss, batch 1): voc-fcn32s/16s/8s 1e-10/1e-12/1e-14 (the
paper), voc-fcn8s-atonce, nyud-fcn32s-hha, nyud-fcn32s-color-hha, siftflow-fcn32s/16s ``solver.prototxt``."""


def test_registry_declares_the_paper_learning_rates_and_the_inputs_each_network_reads() -> None:
    assert {name: n.paper_lr for name, n in NETWORKS.items() if n.paper_lr is not None} == PAPER_LR
    for name, network in NETWORKS.items():
        with torch.device("meta"):
            model = get_model(name, width=WIDTH)
        assert model.modalities == network.modalities, name


def test_registering_a_network_twice_or_with_an_unknown_modality_is_an_error() -> None:
    def fcn32s_vgg16() -> nn.Module:
        return nn.Identity()

    before = dict(NETWORKS)
    with pytest.raises(ValueError, match="'fcn32s_vgg16' is already registered"):
        register_model(paper_lr=1.0)(fcn32s_vgg16)
    with pytest.raises(ValueError, match="modalities must be some of"):
        register_model(modalities=("thermal",), name="fcn32s_thermal_vgg16")(fcn32s_vgg16)
    assert before == NETWORKS and NETWORKS["fcn32s_vgg16"].paper_lr == 1e-10


PAPER_PARAMETERS = {"fcn32s_alexnet": 57e6, "fcn32s_vgg16": 134e6, "fcn32s_googlenet": 6e6}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMETERS))
def test_parameter_counts_match_the_paper(name: str) -> None:
    """Paper Table 1 prints 57M, 134M, 6M: whole millions, so the tolerance is half a million
    (for 6M, printed with one significant digit, that is [5.5M, 6.5M)). Counted: the
    convolutionalized classifier plus the 21-class score layer; the upsampling layer (bilinear,
    fixed in the paper's Table 1 comparison; 21x21x63x63 = 1.75M weights) is not part of it."""
    with torch.device("meta"):
        model = get_model(name)
    count = sum(p.numel() for n, p in model.named_parameters() if ".upscore" not in n)
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
        m.weight.shape for n, m in model.backbone.named_modules() if isinstance(m, nn.Conv2d) and not n.startswith("fc")
    ]
    assert fcn_convs == tv_convs
    if name == "fcn32s_googlenet":
        tv_keys = {k for k in tv.state_dict() if not k.startswith(dropped)}
        assert tv_keys == set(model.backbone.state_dict())
    else:
        assert model.backbone.fc6.weight.shape == (4096, 256, 6, 6) and model.backbone.fc7.weight.shape == (
            4096,
            4096,
            1,
            1,
        )
        assert model.crops == {"score": 18}  # Caffe voc-fcn-alexnet


@pytest.mark.parametrize("name", [*NYUD_NAMES, *SIFTFLOW_NAMES])
def test_nyud_and_siftflow_nets_read_their_modalities_and_return_a_dict_of_their_heads(name: str) -> None:
    model = randomize_scores(get_model(name, width=WIDTH)).eval()
    channels = {"rgb": 3, "depth": 1, "hha": 3}
    assert model.in_channels == sum(channels[m] for m in model.modalities)
    with torch.no_grad():
        out = model(torch.randn(2, model.in_channels, 29, 41))
    expected = {"semantic": 40} if "siftflow" not in name else {"semantic": 33, "geometric": 3}
    assert model.head_classes == expected
    assert {head: tuple(t.shape) for head, t in out.items()} == {h: (2, n, 29, 41) for h, n in expected.items()}
    assert list(out) == list(expected)  # in head order, the first head first
    with pytest.raises(ValueError, match=rf"\[N, {model.in_channels}, H, W\]"):
        model(torch.randn(1, 3 if model.in_channels != 3 else 4, 32, 32))
    rebuilt = get_model(model.arch["name"], **model.arch["kwargs"])
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_rgbd_is_one_four_channel_stream_initialised_with_the_mean_rgb_filter() -> None:
    model = get_model("fcn32s_rgbd_vgg16", width=1 / 64)
    assert model.modalities == ("rgb", "depth") and list(model.streams) == ["rgbd"]
    small = model.backbone.state_dict()
    tv = {k: torch.randn(v.shape) for k, v in _torchvision_shaped(small).items()}
    model = load_backbone(model, tv)
    weight = model.backbone.conv1_1.weight.detach()
    assert weight.shape[1] == 4
    torch.testing.assert_close(weight[:, :3], tv["features.0.weight"])
    torch.testing.assert_close(weight[:, 3], tv["features.0.weight"].mean(1))


def test_late_fusion_averages_the_two_streams_scores() -> None:
    """RGB-HHA: each stream scores with its own layers; the output is the 0.5/0.5 average, which, with
    the reference's fixed bilinear upsampling, is the average of the score maps before upsampling."""
    torch.manual_seed(0)
    model = randomize_scores(
        get_model("fcn16s_rgbhha_vgg16", width=WIDTH, num_classes=5, learnable_upsampling=False)
    ).eval()
    assert list(model.streams) == ["rgb", "hha"] and list(model.heads["semantic"]) == ["rgb", "hha"]
    x = torch.randn(1, 6, 45, 51)
    with torch.no_grad():
        fused = model(x)["semantic"]
        rgb = model.heads["semantic"]["rgb"](model.streams["rgb"].features(x[:, :3]), x.shape[-2:])
        hha = model.heads["semantic"]["hha"](model.streams["hha"].features(x[:, 3:]), x.shape[-2:])
        # the same average taken before upsampling: one head's layers applied to the averaged scores
        head_rgb, head_hha = model.heads["semantic"]["rgb"], model.heads["semantic"]["hha"]
        f_rgb, f_hha = model.streams["rgb"].features(x[:, :3]), model.streams["hha"].features(x[:, 3:])
        coarse = (head_rgb.score_fr(f_rgb["fc7"]) + head_hha.score_fr(f_hha["fc7"])) / 2
        skip = (head_rgb.score_pool4(f_rgb["pool4"]) + head_hha.score_pool4(f_hha["pool4"])) / 2
        from fcn.models._common import crop_to, fuse

        early = crop_to(
            head_rgb.upscore16(fuse(head_rgb.upscore2(coarse), skip, head_rgb.crops["score_pool4c"])),
            head_rgb.crops["score"],
            x.shape[-2:],
        )
    assert not torch.allclose(rgb, hha)
    torch.testing.assert_close(fused, (rgb + hha) / 2)
    torch.testing.assert_close(fused, early, rtol=1e-4, atol=1e-5)


def test_siftflow_heads_have_their_own_skips_and_losses_add() -> None:
    model = randomize_scores(get_model("fcn8s_siftflow_vgg16", width=WIDTH)).train()
    semantic, geometric = model.heads["semantic"]["rgb"], model.heads["geometric"]["rgb"]
    assert semantic.skips == geometric.skips == ("pool4", "pool3")
    assert semantic.score_pool3 is not geometric.score_pool3
    out = model(torch.randn(2, 3, 40, 40))
    loss = nn.functional.cross_entropy(
        out["semantic"], torch.randint(0, 33, (2, 40, 40))
    ) + nn.functional.cross_entropy(out["geometric"], torch.randint(0, 3, (2, 40, 40)))
    loss.backward()
    assert semantic.score_pool3.weight.grad.abs().sum() > 0 and geometric.score_pool3.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("name", "skips", "last"), [("fcn4s_vgg16", 3, "upscore4"), ("fcn2s_vgg16", 4, "upscore_pool1")]
)
def test_finer_skips_continue_the_pattern(name: str, skips: int, last: str) -> None:
    """FCN-4s/2s: the same head with pool2 (and pool1) skips; every upsampling bilinear, x2 between
    fusions; crops from the coordinate maps; the finest skip changes the output."""
    with torch.device("meta"):
        full = get_model(name)
    head = full.head
    assert head.skips == ("pool4", "pool3", "pool2", "pool1")[:skips]
    assert head.upsamplings[-1] == last
    for up in head.upsamplings[:-1]:
        assert getattr(head, up).kernel_size == (4, 4) and getattr(head, up).stride == (2, 2)
    final = 32 >> skips
    assert getattr(head, last).stride == (final, final)
    assert head.crops["score_pool2c"] == 17  # pool2's grid against the 8s fused map (reference geometry)
    model = randomize_scores(get_model(name, width=WIDTH, num_classes=3)).eval()
    x = torch.randn(1, 3, 37, 43)
    finest = getattr(model.head, f"score_{head.skips[-1]}")
    with torch.no_grad():
        before = model(x)["semantic"]
        finest.weight.mul_(2)
        after = model(x)["semantic"]
    assert before.shape == (1, 3, 37, 43) and not torch.allclose(before, after)


def test_skip_head_rejects_skips_out_of_order() -> None:
    from fcn.models import SkipHead
    from fcn.models.vgg import VGG16Trunk

    trunk = VGG16Trunk(geometry="aligned", width=WIDTH, output_stride=32)
    with pytest.raises(ValueError, match="prefix of"):
        SkipHead(trunk, 3, skips=("pool3",))


def _torchvision_shaped(trunk_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision-named VGG16 state_dict shaped like ``trunk_state`` (fc layers flattened), RGB input."""
    convs = [k.split(".")[0] for k in trunk_state if k.startswith("conv") and k.endswith("weight")]
    indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    out = {}
    for index, name in zip(indices, convs, strict=True):
        weight = trunk_state[f"{name}.weight"]
        out[f"features.{index}.weight"] = weight[:, :3] if name == "conv1_1" else weight
        out[f"features.{index}.bias"] = trunk_state[f"{name}.bias"]
    out["classifier.0.weight"] = trunk_state["fc6.weight"].flatten(1)
    out["classifier.0.bias"] = trunk_state["fc6.bias"]
    out["classifier.3.weight"] = trunk_state["fc7.weight"].flatten(1)
    out["classifier.3.bias"] = trunk_state["fc7.bias"]
    return out
