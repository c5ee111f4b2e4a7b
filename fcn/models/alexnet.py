"""FCN-AlexNet (paper Table 1): torchvision's AlexNet convolutionalized, scored and upsampled by 32.

The trunk is rebuilt layer by layer from ``torchvision.models.alexnet``'s definition (read from a
meta-device instance, never downloaded), with channels under ``width`` and the classifier's fc6
(256*6*6 -> 4096) and fc7 turned into 6x6 and 1x1 convolutions. As in Caffe's voc-fcn-alexnet,
pooling rounds up, conv1 is padded by 100 in the reference geometry and the upsampling kernel is 63
(the even 6x6 fc6 puts the score grid on whole pixels, so an odd kernel keeps the crop integral: 18).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fcn.models._common import Trunk, conv1_padding, fc6_padding, scaled
from fcn.models.fcn import FCN, build_fcn
from fcn.models.networks import register_model

ALIGNED_SHIFT = 2
"""Cells "aligned" moves from conv1 to fc6: conv1 keeps 36 pixels, enough for its 11x11 kernel and
three 3x3/2 poolings on a 1x1 input."""


class AlexNetTrunk(Trunk):
    """conv1 ... conv5, pool1/pool2/pool5, fc6 (6x6), fc7; taps fc7."""

    family = "alexnet"
    first_conv = "conv1"
    TAPS = {"drop7": "fc7"}

    def __init__(self, *, geometry: str, width: float, output_stride: int, in_channels: int = 3) -> None:
        super().__init__(in_channels, output_stride)
        from torchvision.models import alexnet  # imported here: torchvision takes seconds

        with torch.device("meta"):
            template = alexnet(weights=None)
        conv = 0
        for layer in template.features:
            if isinstance(layer, nn.Conv2d):
                conv += 1
                out_channels = scaled(layer.out_channels, width)
                padding = conv1_padding(geometry, ALIGNED_SHIFT) if conv == 1 else layer.padding
                self._add(
                    f"conv{conv}",
                    nn.Conv2d(in_channels, out_channels, layer.kernel_size, stride=layer.stride, padding=padding),
                )
                in_channels = out_channels
            elif isinstance(layer, nn.ReLU):
                self._add(f"relu{conv}", nn.ReLU(inplace=True))
            elif isinstance(layer, nn.MaxPool2d):
                self._add(f"pool{conv}", nn.MaxPool2d(layer.kernel_size, stride=layer.stride, ceil_mode=True))
        fc6, fc7 = template.classifier[1], template.classifier[4]
        fc6_kernel = math.isqrt(fc6.in_features // template.features[10].out_channels)
        fc6_channels, fc7_channels = scaled(fc6.out_features, width), scaled(fc7.out_features, width)
        fc6_pad = fc6_padding(geometry, ALIGNED_SHIFT)
        self._add("fc6", nn.Conv2d(in_channels, fc6_channels, fc6_kernel, padding=fc6_pad))
        self._add("relu6", nn.ReLU(inplace=True))
        self._add("drop6", nn.Dropout(0.5))
        self._add("fc7", nn.Conv2d(fc6_channels, fc7_channels, 1))
        self._add("relu7", nn.ReLU(inplace=True))
        self._add("drop7", nn.Dropout(0.5), fc7_channels)
        self._finish()


@register_model()
def fcn32s_alexnet(
    *,
    num_classes: int = 21,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN:
    """FCN-AlexNet; ``backbone_weights``: a torchvision AlexNet state_dict (path or fsspec URI)."""
    return build_fcn(
        "fcn32s_alexnet",
        AlexNetTrunk,
        num_classes=num_classes,
        geometry=geometry,
        width=width,
        output_stride=output_stride,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
    )
