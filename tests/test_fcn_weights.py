"""Weight surgery: torchvision classifiers convolutionalized, pytorch-fcn state_dicts imported, bad files named."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import torch
import torchvision
from torch import nn

from fcn.models import get_model
from fcn.weights import load_backbone, load_pytorch_fcn, pytorch_fcn_names, read_state_dict

WIDTH = 1 / 16

PYTORCH_FCN_CONVS = [
    "conv1_1",
    "conv1_2",
    "conv2_1",
    "conv2_2",
    "conv3_1",
    "conv3_2",
    "conv3_3",
    "conv4_1",
    "conv4_2",
    "conv4_3",
    "conv5_1",
    "conv5_2",
    "conv5_3",
    "fc6",
    "fc7",
]
PYTORCH_FCN_HEADS = {
    "fcn32s_vgg16": {"score_fr.weight": (21, 4096, 1, 1), "upscore.weight": (21, 21, 64, 64)},
    "fcn16s_vgg16": {
        "score_fr.weight": (21, 4096, 1, 1),
        "score_pool4.weight": (21, 512, 1, 1),
        "upscore2.weight": (21, 21, 4, 4),
        "upscore16.weight": (21, 21, 32, 32),
    },
    "fcn8s_vgg16": {
        "score_fr.weight": (21, 4096, 1, 1),
        "score_pool4.weight": (21, 512, 1, 1),
        "score_pool3.weight": (21, 256, 1, 1),
        "upscore2.weight": (21, 21, 4, 4),
        "upscore_pool4.weight": (21, 21, 4, 4),
        "upscore8.weight": (21, 21, 16, 16),
    },
}


def pytorch_fcn_keys(name: str) -> set[str]:
    """The state_dict keys of pytorch-fcn's FCN32s/FCN16s/FCN8s (wkentaro/pytorch-fcn models)."""
    keys = {f"{conv}.{p}" for conv in PYTORCH_FCN_CONVS for p in ("weight", "bias")}
    for head in PYTORCH_FCN_HEADS[name]:
        keys.add(head)
        if head.startswith("score"):
            keys.add(head.replace(".weight", ".bias"))
    return keys


@pytest.mark.parametrize("name", sorted(PYTORCH_FCN_HEADS))
def test_full_width_nets_have_pytorch_fcn_names_and_shapes(name: str) -> None:
    with torch.device("meta"):
        model = get_model(name)
    own = model.state_dict()
    state = {flat: own[key] for flat, key in pytorch_fcn_names(model).items()}  # the trunk's and head's own names
    assert set(state) == pytorch_fcn_keys(name)
    assert state["conv1_1.weight"].shape == (64, 3, 3, 3)
    assert state["fc6.weight"].shape == (4096, 512, 7, 7)
    assert state["fc7.weight"].shape == (4096, 4096, 1, 1)
    for key, shape in PYTORCH_FCN_HEADS[name].items():
        assert state[key].shape == shape, key


@pytest.mark.parametrize("name", ["fcn32s_vgg16", "fcn16s_vgg16", "fcn8s_vgg16"])
def test_pytorch_fcn_state_dict_lands_where_it_belongs(name: str, tmp_path: Path) -> None:
    small = get_model(name, width=WIDTH)
    shapes = {flat: small.state_dict()[key].shape for flat, key in pytorch_fcn_names(small).items()}
    assert set(shapes) == pytorch_fcn_keys(name)
    # every tensor gets a distinct value so a swap of any two would show
    source = {k: torch.full(shapes[k], float(i + 1)) for i, k in enumerate(sorted(shapes))}
    path = tmp_path / "fcn.pth"
    torch.save(source, path)
    model = load_pytorch_fcn(get_model(name, width=WIDTH, geometry="aligned"), str(path))
    modules = {**dict(model.backbone.named_modules()), **dict(model.head.named_modules())}
    for key, value in source.items():
        module, param = key.rsplit(".", 1)
        torch.testing.assert_close(getattr(modules[module], param).detach(), value, msg=key)


def test_pytorch_fcn_mismatch_names_the_keys() -> None:
    eight = get_model("fcn8s_vgg16", width=WIDTH)
    state = {flat: eight.state_dict()[key] for flat, key in pytorch_fcn_names(eight).items()}
    with pytest.raises(ValueError, match=r"missing \['score_pool3.weight'"):
        load_pytorch_fcn(get_model("fcn8s_vgg16", width=WIDTH), {k: v for k, v in state.items() if "pool3" not in k})
    with pytest.raises(ValueError, match=r"missing \['upscore16.weight'\], unexpected \['score_pool3.weight'"):
        load_pytorch_fcn(get_model("fcn16s_vgg16", width=WIDTH), state)
    expected = r"'conv1_1.weight' has shape \(4, 3, 3, 3\).*width=0.125\) expects \(8, 3, 3, 3\)"
    with pytest.raises(ValueError, match=expected):
        load_pytorch_fcn(get_model("fcn8s_vgg16", width=0.125), state)


def _randomize_biases(model: nn.Module) -> nn.Module:
    """torchvision initialises biases to zero; random ones make a misplaced bias visible."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def test_vgg16_classifier_fc7_equals_fcn_fc7(tmp_path: Path) -> None:
    """Paper 3.1: the convolutionalized classifier computes the same fc7 on a 224x224 input, at the
    single position of an unpadded net (conv1_1 pad 1 as in VGG, fc6 pad 0)."""
    torch.manual_seed(0)
    classifier = _randomize_biases(torchvision.models.vgg16(weights=None)).eval()
    path = tmp_path / "vgg16.pth"
    torch.save(classifier.state_dict(), path)
    model = get_model("fcn32s_vgg16", geometry="aligned", backbone_weights=str(path)).eval()
    model.backbone.conv1_1.padding = (1, 1)
    model.backbone.fc6.padding = (0, 0)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = classifier.classifier[:5](torch.flatten(classifier.avgpool(classifier.features(x)), 1))
        fc7 = model.backbone.features(x)["fc7"]
    assert fc7.shape == (1, 4096, 1, 1)
    assert expected.abs().max() > 0
    torch.testing.assert_close(fc7[:, :, 0, 0], expected, rtol=1e-4, atol=1e-4)


def test_backbone_weights_from_an_fsspec_uri_and_bad_ones() -> None:
    fs = fsspec.filesystem("memory")
    small = get_model("fcn8s_vgg16", width=WIDTH).backbone.state_dict()
    # a torchvision-named VGG16 state_dict at this width (fc6 flattened as torchvision's Linear is)
    names = [n for n in small if n.startswith(("conv", "fc")) and n.endswith("weight")]
    indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    tv = {}
    for i, name in enumerate(names[:13]):
        for p in ("weight", "bias"):
            tv[f"features.{indices[i]}.{p}"] = torch.randn(small[f"{name.split('.')[0]}.{p}"].shape)
    tv["classifier.0.weight"] = torch.randn(small["fc6.weight"].shape).flatten(1)
    tv["classifier.0.bias"] = torch.randn(small["fc6.bias"].shape)
    tv["classifier.3.weight"] = torch.randn(small["fc7.weight"].shape).flatten(1)
    tv["classifier.3.bias"] = torch.randn(small["fc7.bias"].shape)
    tv["classifier.6.weight"] = torch.randn(1000, small["fc7.bias"].shape[0])
    with fs.open("/weights/vgg16.pth", "wb") as f:
        torch.save(tv, f)
    model = get_model("fcn16s_vgg16", width=WIDTH, backbone_weights="memory://weights/vgg16.pth")
    trunk = model.backbone
    torch.testing.assert_close(trunk.conv3_3.weight.detach(), tv["features.14.weight"])
    torch.testing.assert_close(trunk.conv5_1.bias.detach(), tv["features.24.bias"])
    torch.testing.assert_close(trunk.fc6.weight.detach().flatten(1), tv["classifier.0.weight"])
    torch.testing.assert_close(trunk.fc7.weight.detach()[:, :, 0, 0], tv["classifier.3.weight"])
    assert model.head.score_fr.weight.abs().sum() == 0  # heads are not part of the backbone

    with fs.open("/weights/truncated.pth", "wb") as f:
        f.write(fs.cat_file("/weights/vgg16.pth")[:1000])
    with pytest.raises(ValueError, match="truncated.pth: not a readable torch state_dict"):
        get_model("fcn32s_vgg16", width=WIDTH, backbone_weights="memory://weights/truncated.pth")
    with fs.open("/weights/tensor.pth", "wb") as f:
        torch.save(torch.zeros(3), f)
    with pytest.raises(ValueError, match="expected a mapping of parameter names to tensors"):
        read_state_dict("memory://weights/tensor.pth")
    with pytest.raises(ValueError, match="not a torchvision vgg16 state_dict: missing 'features.0.weight'"):
        load_backbone(get_model("fcn32s_vgg16", width=WIDTH), {"fc.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'conv1_1.weight' has shape \(4, 3, 3, 3\).*width=0.125"):
        get_model("fcn32s_vgg16", width=0.125, backbone_weights="memory://weights/vgg16.pth")
    with pytest.raises(FileNotFoundError):
        get_model("fcn32s_vgg16", width=WIDTH, backbone_weights="memory://weights/absent.pth")


def test_alexnet_classifier_fc7_equals_fcn_fc7() -> None:
    torch.manual_seed(0)
    classifier = _randomize_biases(torchvision.models.alexnet(weights=None)).eval()
    fs = fsspec.filesystem("memory")
    with fs.open("/weights/alexnet.pth", "wb") as f:
        torch.save(classifier.state_dict(), f)
    model = get_model("fcn32s_alexnet", backbone_weights="memory://weights/alexnet.pth").eval()
    model.backbone.conv1.padding = classifier.features[0].padding  # unpadded: the classifier's own padding
    model.backbone.fc6.padding = (0, 0)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = classifier.classifier[:6](torch.flatten(classifier.avgpool(classifier.features(x)), 1))
        fc7 = model.backbone.features(x)["fc7"]
    assert fc7.shape == (1, 4096, 1, 1)
    torch.testing.assert_close(fc7[:, :, 0, 0], expected, rtol=1e-4, atol=1e-4)


def test_googlenet_trunk_equals_torchvision(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    with torch.no_grad():  # non-trivial batch-norm statistics, so a misplaced buffer shows
        for m in classifier.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.normal_(0, 0.1)
    classifier.eval()
    path = tmp_path / "googlenet.pth"
    torch.save(classifier.state_dict(), path)
    model = get_model("fcn32s_googlenet", backbone_weights=str(path)).eval()
    model.backbone.conv1.conv.padding = classifier.conv1.conv.padding
    seen = {}
    classifier.inception5b.register_forward_hook(lambda _m, _i, out: seen.setdefault("out", out))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        classifier(x)
        ours = model.backbone.features(x)["inception5b"]
    assert ours.shape == seen["out"].shape == (1, 1024, 7, 7)
    torch.testing.assert_close(ours, seen["out"], rtol=1e-4, atol=1e-4)


def test_incomplete_googlenet_weights_are_named() -> None:
    state = get_model("fcn32s_googlenet", width=WIDTH).backbone.state_dict()
    del state["inception4c.branch2.1.conv.weight"]
    with pytest.raises(ValueError, match=r"lacks googlenet trunk tensors: \['inception4c.branch2.1.conv.weight'\]"):
        load_backbone(get_model("fcn32s_googlenet", width=WIDTH), state)
