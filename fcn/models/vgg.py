"""VGG16 convolutionalized (paper 3.1): the trunk of the VGG FCNs.

Layers keep the paper's / pytorch-fcn's names (conv1_1 ... conv5_3, pool1 ... pool5, fc6, fc7).
"""

from __future__ import annotations

from torch import nn

from fcn.models._common import Trunk, conv1_padding, fc6_padding, scaled

VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
"""(channels, convolutions) of VGG16's five blocks, each followed by a 2x2 stride-2 max pool."""
FC_CHANNELS = 4096


class VGG16Trunk(Trunk):
    """VGG16 with fc6 as a 7x7 convolution and fc7 as a 1x1 one; taps pool1 ... pool4 and fc7.

    ``geometry="reference"``: conv1_1 padding 100, fc6 padding 0 (Caffe voc-fcn*s).
    ``geometry="aligned"``: conv1_1 padding 4, fc6 padding 3 -- the same score grid, without carrying
    96 zero pixels per side through every convolution. Pooling rounds up (ceil mode) in both.
    """

    family = "vgg16"
    first_conv = "conv1_1"
    TAPS = {"pool1": "pool1", "pool2": "pool2", "pool3": "pool3", "pool4": "pool4", "drop7": "fc7"}

    def __init__(self, *, geometry: str, width: float, output_stride: int, in_channels: int = 3) -> None:
        super().__init__(in_channels, output_stride)
        channels_in = in_channels
        for block, (channels, convs) in enumerate(VGG16_BLOCKS, start=1):
            out_channels = scaled(channels, width)
            for i in range(1, convs + 1):
                padding = conv1_padding(geometry) if (block, i) == (1, 1) else 1
                self._add(f"conv{block}_{i}", nn.Conv2d(channels_in, out_channels, 3, padding=padding))
                self._add(f"relu{block}_{i}", nn.ReLU(inplace=True))
                channels_in = out_channels
            self._add(f"pool{block}", nn.MaxPool2d(2, stride=2, ceil_mode=True), out_channels)
        fc_channels = scaled(FC_CHANNELS, width)
        self._add("fc6", nn.Conv2d(channels_in, fc_channels, 7, padding=fc6_padding(geometry)))
        self._add("relu6", nn.ReLU(inplace=True))
        self._add("drop6", nn.Dropout(0.5))
        self._add("fc7", nn.Conv2d(fc_channels, fc_channels, 1))
        self._add("relu7", nn.ReLU(inplace=True))
        self._add("drop7", nn.Dropout(0.5), fc_channels)
        self._finish()
        for name in self.layer_names:
            m = getattr(self, name)
            if isinstance(m, nn.Conv2d):
                if m.kernel_size == (3, 3):  # torchvision's VGG init
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:  # fc6, fc7: torchvision's Linear init
                    nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
