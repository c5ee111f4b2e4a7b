"""FCN-GoogLeNet (paper Table 1): torchvision's GoogLeNet trunk scored at inception5b, upsampled by 32.

The trunk is rebuilt block by block from ``torchvision.models.googlenet``'s definition (read from a
meta-device instance, never downloaded) with torchvision's own ``BasicConv2d`` and ``Inception``
blocks and channels under ``width``. As in the paper, the final average pooling is discarded and
the classifier becomes a 1x1 score layer on inception5b; the auxiliary classifiers are dropped.
torchvision's GoogLeNet uses 3x3 convolutions in its "5x5" branches (torchvision issue 906), so the
receptive field is smaller than the paper's 907 pixels (which also counts the average pooling).
"""

from __future__ import annotations

import torch
from torch import nn

from fcn.models._common import Trunk, conv1_padding, scaled
from fcn.models.fcn import FCN, build_fcn
from fcn.models.networks import register_model

ALIGNED_SHIFT = 2
"""Cells of the pad-100 that "aligned" drops (there is no fc6 to move them to): conv1 keeps 36
pixels, enough for four 3x3/2 and 2x2/2 poolings on a 1x1 input."""


class GoogLeNetTrunk(Trunk):
    """conv1 ... inception5b (torchvision names); taps inception5b."""

    family = "googlenet"
    first_conv = "conv1.conv"
    TAPS = {"inception5b": "inception5b"}

    def __init__(self, *, geometry: str, width: float, output_stride: int, in_channels: int = 3) -> None:
        super().__init__(in_channels, output_stride)
        from torchvision.models.googlenet import (
            BasicConv2d,
            Inception,
            googlenet,
        )  # imported here: torchvision takes seconds

        with torch.device("meta"):
            template = googlenet(weights=None, aux_logits=False, init_weights=False)
        for name, block in template.named_children():
            if name == "avgpool":
                break
            if isinstance(block, BasicConv2d):
                c = block.conv
                padding = conv1_padding(geometry, ALIGNED_SHIFT) if name == "conv1" else c.padding
                out_channels = scaled(c.out_channels, width)
                block = BasicConv2d(
                    in_channels, out_channels, kernel_size=c.kernel_size, stride=c.stride, padding=padding
                )
            elif isinstance(block, Inception):
                widths = [
                    scaled(conv.out_channels, width)
                    for conv in (
                        block.branch1.conv,
                        block.branch2[0].conv,
                        block.branch2[1].conv,
                        block.branch3[0].conv,
                        block.branch3[1].conv,
                        block.branch4[1].conv,
                    )
                ]
                block = Inception(in_channels, *widths)
                out_channels = widths[0] + widths[2] + widths[4] + widths[5]
            elif isinstance(block, nn.MaxPool2d):
                block = nn.MaxPool2d(block.kernel_size, stride=block.stride, ceil_mode=True)
            else:
                continue
            self._add(name, block, out_channels)
            in_channels = out_channels
        self._finish()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # torchvision's GoogLeNet init
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)

    def _geometry_layers(self, names: list[str]) -> list[nn.Module]:
        """A BasicConv2d acts as its conv; an Inception block as its widest (1x1 then 3x3) branch."""
        from torchvision.models.googlenet import BasicConv2d, Inception

        layers = []
        for name in names:
            block = getattr(self, name)
            if isinstance(block, BasicConv2d):
                layers.append(block.conv)
            elif isinstance(block, Inception):
                layers.append(nn.Sequential(block.branch2[0].conv, block.branch2[1].conv))
            else:
                layers.append(block)
        return layers


@register_model()
def fcn32s_googlenet(
    *,
    num_classes: int = 21,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN:
    """FCN-GoogLeNet; ``backbone_weights``: a torchvision GoogLeNet state_dict (path or fsspec URI)."""
    return build_fcn(
        "fcn32s_googlenet",
        GoogLeNetTrunk,
        num_classes=num_classes,
        geometry=geometry,
        width=width,
        output_stride=output_stride,
        learnable_upsampling=learnable_upsampling,
        score_tap="inception5b",
        backbone_weights=backbone_weights,
    )
