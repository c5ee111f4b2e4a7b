"""Pieces shared by the FCN networks: argument checks, upsampling layers, crops, fusion, rarefaction."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fcn.geometry import CoordMap, bilinear_kernel, fuse_offset, layer_map

GEOMETRIES = ("reference", "aligned")
OUTPUT_STRIDES = (32, 16, 8)
REFERENCE_PAD = 100
"""conv1 padding of the reference nets (Caffe voc-fcn*): guarantees a score map for any input size."""
ALIGNED_SHIFT_CELLS = 3
"""Stride-32 cells of the pad-100 that "aligned" moves from conv1 (100 -> 4) to fc6 (0 -> 3): the
score grid keeps the reference phase, and the image no longer drags 96 zero pixels per side through
every convolution."""


def check_args(
    name: str, *, num_classes: int, geometry: str, width: float, output_stride: int, learnable_upsampling: bool
) -> None:
    """Raise ValueError naming the first bad builder argument."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{name}: num_classes must be a positive int, got {num_classes!r}")
    if geometry not in GEOMETRIES:
        raise ValueError(f"{name}: geometry must be one of {GEOMETRIES}, got {geometry!r}")
    if isinstance(width, bool) or not isinstance(width, int | float) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"{name}: width must be a positive finite number, got {width!r}")
    if output_stride not in OUTPUT_STRIDES or isinstance(output_stride, bool):
        raise ValueError(f"{name}: output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    if not isinstance(learnable_upsampling, bool):
        raise ValueError(f"{name}: learnable_upsampling must be a bool, got {learnable_upsampling!r}")


def arch_dict(name: str, **kwargs: object) -> dict:
    """The ``model.arch`` record: builder name and its JSON-serializable arguments."""
    return {"name": name, "kwargs": dict(kwargs)}


def scaled(channels: int, width: float) -> int:
    """Channel count under the ``width`` multiplier (at least 1)."""
    return max(1, round(channels * width))


def conv1_padding(geometry: str, reference_pad: int = REFERENCE_PAD) -> int:
    """Padding of the first convolution for a geometry."""
    return reference_pad if geometry == "reference" else reference_pad - 32 * ALIGNED_SHIFT_CELLS


def fc6_padding(geometry: str) -> int:
    """Padding of fc6 (in stride-32 cells) for a geometry."""
    return 0 if geometry == "reference" else ALIGNED_SHIFT_CELLS


def rarefy(layers: Sequence[nn.Module], output_stride: int, total_stride: int = 32) -> None:
    """Filter rarefaction (paper 3.2), in place: reach ``output_stride`` by removing the stride of the
    last strided pooling layers and dilating every later filter by the removed stride.

    A pooling layer that loses its stride gets padding 1 (-inf), so it still yields a cell for the
    partial window ceil-mode pooling gave at the border.
    """
    strided = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d) and _int(m.stride) > 1]
    stride, removed = total_stride, []
    while stride > output_stride:
        removed.insert(0, strided.pop())
        stride //= _int(layers[removed[0]].stride)
    for index in removed:  # earliest first, so a later pool is dilated before it loses its stride
        pool = layers[index]
        factor = _int(pool.stride)
        pool.stride = 1
        pool.padding = 1
        for later in layers[index + 1 :]:
            for m in later.modules():
                _dilate(m, factor)


def _int(value: int | tuple[int, ...]) -> int:
    return value[0] if isinstance(value, tuple) else value


def _dilate(m: nn.Module, factor: int) -> None:
    if isinstance(m, nn.Conv2d) and _int(m.kernel_size) > 1:
        m.dilation = tuple(d * factor for d in m.dilation)
        m.padding = tuple(p * factor for p in m.padding)
    elif isinstance(m, nn.MaxPool2d) and _int(m.kernel_size) > 1:
        m.dilation = _int(m.dilation) * factor
        m.padding = _int(m.padding) * factor


def make_upsample(
    num_classes: int, source: CoordMap, target: CoordMap, *, learnable: bool
) -> tuple[nn.Module, int]:
    """Backwards-strided convolution (paper 3.3) from the grid of ``source`` to the finer ``target``.

    Stride f = ratio of the two grids; kernel 2f, or 2f-1 when that is what lands the upsampled grid
    on whole cells of the target (FCN-AlexNet's k63). Initialised to bilinear interpolation, no bias;
    ``learnable=False`` freezes it. Returns the layer and its fuse offset against ``target``.
    Between grids of one stride (rarefied nets) this is a k1 identity or a k2 half-cell average.
    """
    factor = source.scale / target.scale
    if factor.denominator != 1 or factor < 1:
        raise ValueError(f"cannot upsample a stride-{source.scale} map onto a stride-{target.scale} grid")
    f = int(factor)
    for kernel in (2 * f, 2 * f - 1):
        up = nn.ConvTranspose2d(num_classes, num_classes, kernel, stride=f, bias=False)
        try:
            offset = fuse_offset(source.then(layer_map(up)), target)
        except ValueError:
            continue
        with torch.no_grad():
            up.weight.copy_(bilinear_kernel(num_classes, num_classes, kernel))
        up.weight.requires_grad_(learnable)
        return up, offset
    raise ValueError(f"no upsampling kernel aligns a map at {source} with one at {target}")


def fused_map(a: CoordMap, b: CoordMap, offset: int) -> CoordMap:
    """Coordinate map of ``fuse(a, b, offset)``'s output: whichever map starts later."""
    return a if offset >= 0 else b


def fuse(a: torch.Tensor, b: torch.Tensor, offset: int) -> torch.Tensor:
    """Element-wise sum of two aligned score maps; cell ``i`` of ``a`` meets cell ``i+offset`` of ``b``.

    The result covers the overlap (for the reference nets: all of ``a`` and ``b`` cropped by
    ``offset``, Caffe's ``score_pool4c``).
    """
    if offset < 0:
        a, b, offset = b, a, -offset
    h = min(a.shape[-2], b.shape[-2] - offset)
    w = min(a.shape[-1], b.shape[-1] - offset)
    return a[..., :h, :w] + b[..., offset : offset + h, offset : offset + w]


def crop_to(x: torch.Tensor, offset: int, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Crop ``x`` at ``offset`` to the input's ``size``; fails loudly if it does not cover it."""
    h, w = size
    if x.shape[-2] < offset + h or x.shape[-1] < offset + w:
        raise RuntimeError(
            f"score map {tuple(x.shape[-2:])} does not cover a {h}x{w} input at crop offset {offset}"
        )
    return x[..., offset : offset + h, offset : offset + w]


def check_input(x: torch.Tensor) -> None:
    """Raise ValueError unless ``x`` is an image batch ``[N, 3, H, W]`` with H, W >= 1."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] < 1 or x.shape[-2] < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"FCN input must be a tensor [N, 3, H, W] with H, W >= 1, got {shape}")


def init_score(conv: nn.Conv2d) -> nn.Conv2d:
    """Score layers start at zero, as in the reference surgery (the net predicts nothing until trained)."""
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv
