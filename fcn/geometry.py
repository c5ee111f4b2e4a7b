"""Coordinate mapping between layers (as in Caffe's ``coord_map.py``) and the bilinear kernel.

Every spatial layer maps an output coordinate ``y`` to the input coordinate ``x`` at the centre
of its window: ``x = scale * y + offset``. Composing these maps along a network gives where each
score-map cell sits in the image, from which the FCN crop offsets follow instead of being typed in.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

__all__ = [
    "CoordMap",
    "layer_map",
    "coord_map",
    "crop_offset",
    "fuse_offset",
    "receptive_field",
    "bilinear_kernel",
    "conv_flops",
]


@dataclass(frozen=True)
class CoordMap:
    """Affine map from a layer's output coordinates to its input coordinates: ``x = scale*y + offset``."""

    scale: Fraction = Fraction(1)
    offset: Fraction = Fraction(0)

    def then(self, later: CoordMap) -> CoordMap:
        """Map of ``self``'s layer followed by ``later``'s (output of ``later`` -> input of ``self``)."""
        return CoordMap(self.scale * later.scale, self.scale * later.offset + self.offset)

    def __call__(self, y: float | Fraction) -> Fraction:
        return self.scale * Fraction(y) + self.offset


def _pair_first(value: int | tuple[int, ...]) -> int:
    """Spatial hyper-parameters are square in every FCN; take the first of a pair."""
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise ValueError(f"non-square layer parameter {value} is not supported by the coordinate map")
        return value[0]
    return value


def layer_map(module: nn.Module) -> CoordMap:
    """Coordinate map of one layer, read from its kernel size, stride, padding and dilation.

    Convolutions and poolings map ``x = s*y + ((k-1)*d/2 - p)``; a transposed convolution is the
    inverse, ``x = (y - ((k-1)*d/2 - p)) / s``; explicit padding shifts by ``-p``. Point-wise layers
    (ReLU, dropout, 1x1 stride-1 convs...) are the identity. ``nn.Sequential`` composes its children.
    """
    if isinstance(module, nn.Sequential):
        return coord_map(module)
    if isinstance(module, nn.ConvTranspose2d | nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
        k = _pair_first(module.kernel_size)
        s = _pair_first(module.stride)
        p = _pair_first(module.padding)
        d = _pair_first(getattr(module, "dilation", 1))
        half = Fraction((k - 1) * d, 2) - p
        if isinstance(module, nn.ConvTranspose2d):
            return CoordMap(Fraction(1, s), -half / s)
        return CoordMap(Fraction(s), half)
    if isinstance(module, nn.ConstantPad2d):
        return CoordMap(Fraction(1), -Fraction(_pair_first(module.padding)))
    return CoordMap()


def coord_map(layers: Iterable[nn.Module]) -> CoordMap:
    """Compose the maps of consecutive layers: output coordinates of the last -> input of the first."""
    result = CoordMap()
    for layer in layers:
        result = result.then(layer_map(layer))
    return result


def crop_offset(to_input: CoordMap) -> int:
    """Offset at which to crop a stride-1 map (e.g. the last upsampling) so it lines up with the input.

    Caffe's ``crop`` layer rule: the map must have unit scale and lie at an integral, non-positive
    offset from the input, whose negation is the crop.
    """
    if to_input.scale != 1:
        raise ValueError(f"cannot crop a map of scale {to_input.scale} against the input (needs scale 1)")
    if to_input.offset.denominator != 1 or to_input.offset > 0:
        raise ValueError(f"map is misaligned with the input by {to_input.offset} pixels (needs an integer <= 0)")
    return int(-to_input.offset)


def fuse_offset(a: CoordMap, b: CoordMap) -> int:
    """Integer ``d`` such that cell ``i`` of map ``a`` sits where cell ``i + d`` of map ``b`` sits.

    ``d >= 0`` means ``b`` is cropped by ``d`` (the reference ``score_pool4c`` crop); ``d < 0`` means
    ``a`` starts before ``b`` and is the one cropped.
    """
    if a.scale != b.scale:
        raise ValueError(f"cannot fuse maps of different strides {a.scale} and {b.scale}")
    d = (a.offset - b.offset) / a.scale
    if d.denominator != 1:
        raise ValueError(f"maps to fuse are misaligned by a fraction of a cell ({d})")
    return int(d)


def receptive_field(layers: Iterable[nn.Module]) -> int:
    """Receptive field in input pixels of one output cell of the composed layers (widest path)."""
    field, jump = 1, 1
    for layer in layers:
        if isinstance(layer, nn.Sequential):
            sub = list(layer)
            inner = receptive_field(sub)
            field += (inner - 1) * jump
            jump *= int(coord_map(sub).scale)
        elif isinstance(layer, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d) and not isinstance(layer, nn.ConvTranspose2d):
            k = _pair_first(layer.kernel_size)
            d = _pair_first(getattr(layer, "dilation", 1))
            field += (k - 1) * d * jump
            jump *= _pair_first(layer.stride)
    return field


def bilinear_kernel(
    in_channels: int, out_channels: int, kernel_size: int, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """ConvTranspose2d weight ``[in, out, k, k]`` doing bilinear upsampling (reference formula).

    ``factor = (k+1)//2``; ``center = factor-1`` if ``k`` is odd else ``factor-0.5``;
    ``w(x, y) = (1-|x-center|/factor) * (1-|y-center|/factor)``, written on the channel diagonal only.
    """
    if in_channels != out_channels:
        raise ValueError(f"bilinear upsampling maps each channel to itself: in {in_channels} != out {out_channels}")
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64)
    filt1d = 1 - (og - center).abs() / factor
    filt = torch.outer(filt1d, filt1d).to(dtype)
    weight = torch.zeros(in_channels, out_channels, kernel_size, kernel_size, dtype=dtype)
    idx = torch.arange(in_channels)
    weight[idx, idx] = filt
    return weight


def conv_flops(model: nn.Module, height: int, width: int | None = None) -> int:
    """FLOPs (2 x multiply-accumulates) of ``model``'s convolutions and transposed convolutions on
    one ``height`` x ``width`` image, counted from layer shapes on a meta-device copy (no compute)."""
    macs = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        # weight[0] is one output channel's kernel (conv) or one input channel's scatter (transposed)
        if isinstance(module, nn.ConvTranspose2d):
            macs += inputs[0].numel() * module.weight[0].numel()
        else:
            macs += output.numel() * module.weight[0].numel()

    meta = copy.deepcopy(model).to("meta").eval()
    for m in meta.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            m.register_forward_hook(count)
    with torch.no_grad():
        meta(torch.empty(1, 3, height, width or height, device="meta"))
    return 2 * macs
