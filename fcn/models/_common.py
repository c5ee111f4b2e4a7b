"""Pieces shared by the FCN networks: argument checks, upsampling layers, crops, fusion, rarefaction."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fcn.geometry import CoordMap, bilinear_kernel, coord_map, fuse_offset, layer_map, receptive_field

GEOMETRIES = ("reference", "aligned")
OUTPUT_STRIDES = (32, 16, 8)
REFERENCE_PAD = 100
"""conv1 padding of the reference nets (Caffe voc-fcn*): guarantees a score map for any input size."""
CELL = 32
"""Stride of the trunks' score grid in pixels."""
ALIGNED_SHIFT = 3
"""Stride-32 cells of the pad-100 that "aligned" moves from conv1 to fc6 (VGG: 100 -> 4, 0 -> 3):
the score grid keeps the reference phase, and the image no longer drags 96 zero pixels per side
through every convolution. Trunks that need more padding for a 1x1 input move fewer cells."""


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


def conv1_padding(geometry: str, shift: int = ALIGNED_SHIFT) -> int:
    """Padding of the first convolution: 100, or 100 less ``shift`` stride-32 cells when aligned."""
    return REFERENCE_PAD if geometry == "reference" else REFERENCE_PAD - CELL * shift


def fc6_padding(geometry: str, shift: int = ALIGNED_SHIFT) -> int:
    """Padding of fc6 (a stride-32 layer): 0, or the ``shift`` cells taken from conv1 when aligned."""
    return 0 if geometry == "reference" else shift


def rarefy(layers: Sequence[nn.Module], output_stride: int, total_stride: int = CELL) -> None:
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
            _dilate(later, factor)
            for parent in list(later.modules()):
                for child_name, child in list(parent.named_children()):
                    replacement = _dilate(child, factor)
                    if replacement is not None:
                        setattr(parent, child_name, replacement)


def _int(value: int | tuple[int, ...]) -> int:
    return value[0] if isinstance(value, tuple) else value


def _dilate(m: nn.Module, factor: int) -> nn.Module | None:
    """Dilate a conv / max pool in place; a padded pool whose padding would exceed what max_pool2d
    accepts (half its kernel) is returned as explicit -inf padding followed by the dilated pool."""
    if isinstance(m, nn.Conv2d) and _int(m.kernel_size) > 1:
        m.dilation = tuple(d * factor for d in m.dilation)
        m.padding = tuple(p * factor for p in m.padding)
    elif isinstance(m, nn.MaxPool2d) and _int(m.kernel_size) > 1:
        m.dilation = _int(m.dilation) * factor
        padding = _int(m.padding) * factor
        if padding <= _int(m.kernel_size) // 2:
            m.padding = padding
        else:
            m.padding = 0
            return nn.Sequential(nn.ConstantPad2d(padding, float("-inf")), m)
    elif isinstance(m, nn.ConstantPad2d):  # one inserted above by an earlier rarefaction
        m.padding = tuple(p * factor for p in m.padding)
    return None


def make_upsample(num_classes: int, source: CoordMap, target: CoordMap, *, learnable: bool) -> tuple[nn.Module, int]:
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
        raise RuntimeError(f"score map {tuple(x.shape[-2:])} does not cover a {h}x{w} input at crop offset {offset}")
    return x[..., offset : offset + h, offset : offset + w]


def check_input(x: torch.Tensor, channels: int = 3) -> None:
    """Raise ValueError unless ``x`` is a batch ``[N, channels, H, W]`` with H, W >= 1."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels or x.shape[-1] < 1 or x.shape[-2] < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"FCN input must be a tensor [N, {channels}, H, W] with H, W >= 1, got {shape}")


def init_score(conv: nn.Conv2d) -> nn.Conv2d:
    """Score layers start at zero, as in the reference surgery (the net predicts nothing until trained)."""
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class Trunk(nn.Module):
    """A classifier's layers, in order and by name (the paper's), run as a fully convolutional trunk.

    Subclasses add their layers with ``_add`` and call ``_finish``; ``features`` returns the outputs
    of the layers named in ``TAPS`` (layer name -> tap name), ``tap_maps`` their coordinate maps and
    ``tap_channels`` their widths. ``family`` names the torchvision classifier whose weights fit it,
    ``first_conv`` the layer that sees the input's ``in_channels``.
    """

    family: str
    first_conv: str
    TAPS: dict[str, str]

    def __init__(self, in_channels: int, output_stride: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.output_stride = output_stride
        self.layer_names: list[str] = []
        self.tap_channels: dict[str, int] = {}

    def _add(self, name: str, module: nn.Module, channels: int | None = None) -> None:
        """Append layer ``name``; ``channels``: its output width, recorded when it is tapped."""
        setattr(self, name, module)
        self.layer_names.append(name)
        if name in self.TAPS and channels is not None:
            self.tap_channels[self.TAPS[name]] = channels

    def _finish(self) -> None:
        """Rarefy to the output stride, then record the receptive field."""
        missing = sorted(set(self.TAPS.values()) - set(self.tap_channels))
        if missing:
            raise AssertionError(f"{type(self).__name__}: no width recorded for taps {missing}")
        rarefy([getattr(self, n) for n in self.layer_names], self.output_stride)
        self.receptive_field = receptive_field(self._geometry_layers(self.layer_names))

    def _geometry_layers(self, names: Sequence[str]) -> list[nn.Module]:
        """Plain layers standing in for ``names`` in coordinate maps (override for composite blocks)."""
        return [getattr(self, n) for n in names]

    def tap_maps(self) -> dict[str, CoordMap]:
        """Coordinate maps (cell -> input pixel) of the tapped outputs."""
        return {
            tap: coord_map(self._geometry_layers(self.layer_names[: self.layer_names.index(layer) + 1]))
            for layer, tap in self.TAPS.items()
        }

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the trunk on a batch ``[N, in_channels, H, W]``; return the tapped outputs by tap name."""
        check_input(x, self.in_channels)
        taps = {}
        for name in self.layer_names:
            x = getattr(self, name)(x)
            if name in self.TAPS:
                taps[self.TAPS[name]] = x
        return taps
