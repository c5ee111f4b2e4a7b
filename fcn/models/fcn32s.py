"""FCN-32s (paper 4.1): VGG16 score map upsampled by 32 in one backwards-strided convolution."""

from __future__ import annotations

import torch
from torch import nn

from fcn.geometry import CoordMap, crop_offset, layer_map
from fcn.models._common import crop_to, init_score, make_upsample
from fcn.models.vgg import VGG16FCN
from fcn.weights import load_backbone


class FCN32s(VGG16FCN):
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
        self.score_fr = init_score(nn.Conv2d(self.fc7_channels, num_classes, 1))
        score_fr = self.tap_maps()["fc7"]
        self.upscore, _ = make_upsample(num_classes, score_fr, CoordMap(), learnable=learnable_upsampling)
        self.crops = {"score": crop_offset(score_fr.then(layer_map(self.upscore)))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x), x.shape[-2:])

    def head(self, feats: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Score, upsample and crop the trunk's ``features`` to an image of ``size``."""
        return crop_to(self.upscore(self.score_fr(feats["fc7"])), self.crops["score"], size)


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
    model = FCN32s(
        num_classes=num_classes,
        geometry=geometry,
        width=width,
        output_stride=output_stride,
        learnable_upsampling=learnable_upsampling,
    )
    if backbone_weights is not None:
        load_backbone(model, backbone_weights)
    return model
