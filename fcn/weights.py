"""Weight surgery: torchvision classifiers convolutionalized into FCN trunks (paper 3.1), and import
of pytorch-fcn's published (Caffe-converted) FCN state_dicts.

Nothing here downloads: every state_dict comes from a local path or fsspec URI given by the caller.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TypeVar

import fsspec
import torch
from torch import nn

__all__ = ["read_state_dict", "convolutionalize", "load_backbone", "load_pytorch_fcn", "pytorch_fcn_names"]

ModelT = TypeVar("ModelT", bound=nn.Module)

VGG16_CONV_NAMES = (
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
)
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
"""Positions of VGG16's convolutions in torchvision's ``features`` Sequential."""
ALEXNET_CONV_INDICES = (0, 3, 6, 8, 10)
"""Positions of AlexNet's five convolutions in torchvision's ``features`` Sequential."""


def read_state_dict(source: str | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load a state_dict from a path / fsspec URI (``weights_only=True``), or pass a mapping through.

    Raises ValueError naming the file when it is not a torch-saved mapping of names to tensors.
    """
    if isinstance(source, Mapping):
        state = dict(source)
        where = "state_dict"
    else:
        with fsspec.open(source, "rb") as f:
            data = f.read()
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for truncated / foreign files
            raise ValueError(f"{source}: not a readable torch state_dict ({type(exc).__name__}: {exc})") from None
        where = source
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{where}: expected a mapping of parameter names to tensors, got {type(state).__name__}")
    return dict(state)


def convolutionalize(family: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision classifier's state_dict into FCN trunk names.

    vgg16: ``features.<i>`` -> conv1_1 ... conv5_3, ``classifier.0/3`` -> fc6/fc7 (still 2-D; the
    load reshapes them into 7x7 / 1x1 kernels). alexnet: convolutions -> conv1..conv5,
    ``classifier.1/4`` -> fc6/fc7. googlenet: every trunk tensor keeps its name; ``fc`` and the
    auxiliary classifiers are dropped (FCN-GoogLeNet scores inception5b directly).
    The 1000-way last layer is dropped in every family.
    """
    out: dict[str, torch.Tensor] = {}
    if family == "vgg16":
        pairs = [(f"features.{i}", n) for i, n in zip(VGG16_CONV_INDICES, VGG16_CONV_NAMES, strict=True)]
        pairs += [("classifier.0", "fc6"), ("classifier.3", "fc7")]
    elif family == "alexnet":
        pairs = [(f"features.{i}", f"conv{n}") for n, i in enumerate(ALEXNET_CONV_INDICES, start=1)]
        pairs += [("classifier.1", "fc6"), ("classifier.4", "fc7")]
    elif family == "googlenet":
        return {k: v for k, v in state.items() if not k.startswith(("fc.", "aux1.", "aux2."))}
    else:
        raise ValueError(f"no torchvision classifier conversion for backbone family {family!r}")
    for src, dst in pairs:
        for suffix in ("weight", "bias"):
            key = f"{src}.{suffix}"
            if key not in state:
                raise ValueError(f"backbone_weights is not a torchvision {family} state_dict: missing {key!r}")
            out[f"{dst}.{suffix}"] = state[key]
    return out


def _assign(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], what: str, arch: dict, keys: Mapping[str, str] | None = None
) -> None:
    """Copy ``tensors`` into ``module``'s state by name (``keys`` maps a tensor's name to the state_dict
    key when they differ), reshaping fully connected weights into kernels."""
    target = module.state_dict()
    fitted = {}
    for name, value in tensors.items():
        key = keys.get(name, name) if keys else name
        if key not in target:
            raise ValueError(f"{what}: {name!r} has no counterpart in {arch['name']}")
        want = target[key].shape
        if value.shape != want and not (value.dim() == 2 and len(want) == 4 and value.numel() == want.numel()):
            raise ValueError(
                f"{what}: {name!r} has shape {tuple(value.shape)} but {arch['name']} "
                f"(width={arch['kwargs']['width']}) expects {tuple(want)}"
            )
        fitted[key] = value.reshape(want).to(target[key].dtype)
    module.load_state_dict(fitted, strict=False)


def load_backbone(model: ModelT, source: str | Mapping[str, torch.Tensor]) -> ModelT:
    """Load a torchvision classifier state_dict (path, fsspec URI or mapping) into every stream's trunk.

    A trunk whose first convolution takes more than RGB (early-fusion RGB-D) gets the RGB filters and,
    for each further channel, their mean.
    """
    state = read_state_dict(source)
    for trunk in model.streams.values():
        tensors = convolutionalize(trunk.family, state)
        missing = [k for k in trunk.state_dict() if k not in tensors]
        if missing:
            raise ValueError(f"backbone_weights lacks {trunk.family} trunk tensors: {missing[:5]}")
        first = f"{trunk.first_conv}.weight"
        rgb_filters = tensors[first]
        if trunk.in_channels > rgb_filters.shape[1]:
            extra = rgb_filters.mean(1, keepdim=True).expand(-1, trunk.in_channels - rgb_filters.shape[1], -1, -1)
            tensors[first] = torch.cat([rgb_filters, extra], 1)
        _assign(trunk, tensors, "backbone_weights", model.arch)
    return model


def pytorch_fcn_names(model: nn.Module) -> dict[str, str]:
    """{pytorch-fcn name: this model's state_dict key} for a single-stream, single-head FCN, whose
    trunk and head layers carry pytorch-fcn's names (``conv1_1.weight`` -> ``streams.rgb.conv1_1.weight``,
    ``score_fr.weight`` -> ``heads.semantic.rgb.score_fr.weight``). ValueError for other nets."""
    if len(model.streams) != 1 or len(model.heads) != 1:
        raise ValueError(
            f"{model.arch['name']} has {len(model.streams)} streams and {len(model.heads)} heads; "
            "pytorch-fcn's flat names describe one of each"
        )
    (stream,), (head,) = model.streams.keys(), model.heads.keys()
    prefixes = (f"streams.{stream}.", f"heads.{head}.{stream}.")
    return {key.removeprefix(next(p for p in prefixes if key.startswith(p))): key for key in model.state_dict()}


def load_pytorch_fcn(model: nn.Module, source: str | Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a pytorch-fcn FCN-32s/16s/8s state_dict (its names: conv1_1 ... fc7, score_fr, score_pool4,
    score_pool3, upscore2, upscore_pool4, upscore8/upscore16/upscore) into the matching VGG16 FCN.

    Every tensor of the model must be present with the same shape, and nothing else; otherwise a
    ValueError names the first offending key. These weights expect the Caffe input convention.
    """
    state = read_state_dict(source)
    names = pytorch_fcn_names(model)
    missing = [k for k in names if k not in state]
    extra = [k for k in state if k not in names]
    if missing or extra:
        raise ValueError(
            f"pytorch-fcn state_dict does not match {model.arch['name']}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    _assign(model, state, "pytorch-fcn state_dict", model.arch, names)
    return model
