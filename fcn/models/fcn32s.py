"""FCN-32s (paper 4.1): VGG16 score map upsampled by 32 in one backwards-strided convolution."""

from __future__ import annotations


from fcn.models._common import SingleStreamHead
from fcn.models.vgg import VGG16FCN
from fcn.weights import load_backbone


class FCN32s(SingleStreamHead, VGG16FCN):
    """score_fr on fc7, ``upscore`` (k64/s32 at output stride 32), crop to the input (offset 19)."""

    def __init__(
        self,
        *,
        num_classes: int = 21,
        geometry: str = "reference",
        width: float = 1.0,
        output_stride: int = 32,
        learnable_upsampling: bool = True,
    ) -> None:
        super().__init__(
            "fcn32s_vgg16",
            num_classes=num_classes,
            geometry=geometry,
            width=width,
            output_stride=output_stride,
            learnable_upsampling=learnable_upsampling,
        )
        self._add_single_stream_head("fc7", self.fc7_channels, learnable_upsampling)


def fcn32s_vgg16(
    *,
    num_classes: int = 21,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN32s:
    """FCN-32s on VGG16; ``backbone_weights``: a torchvision VGG16 state_dict (path or fsspec URI)."""
    model = FCN32s(num_classes=num_classes, geometry=geometry, width=width, output_stride=output_stride,
                   learnable_upsampling=learnable_upsampling)
    return model if backbone_weights is None else load_backbone(model, backbone_weights)
