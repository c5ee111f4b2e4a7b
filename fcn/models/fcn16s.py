"""FCN-16s (paper 4.2): FCN-32s's score map fused with a pool4 prediction, upsampled by 16."""

from __future__ import annotations

import torch
from torch import nn

from fcn.geometry import CoordMap, crop_offset, layer_map
from fcn.models._common import crop_to, fuse, fused_map, init_score, make_upsample
from fcn.models.vgg import VGG16FCN
from fcn.weights import load_backbone


class FCN16s(VGG16FCN):
    """score_fr -> upscore2 (k4/s2) + score_pool4 (crop 5) -> upscore16 (k32/s16) -> crop 27."""

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
            "fcn16s_vgg16",
            num_classes=num_classes,
            geometry=geometry,
            width=width,
            output_stride=output_stride,
            learnable_upsampling=learnable_upsampling,
        )
        self.score_fr = init_score(nn.Conv2d(self.fc7_channels, num_classes, 1))
        self.score_pool4 = init_score(nn.Conv2d(self.pool4_channels, num_classes, 1))
        maps = self.tap_maps()
        self.upscore2, pool4_offset = make_upsample(
            num_classes, maps["fc7"], maps["pool4"], learnable=learnable_upsampling
        )
        fuse_pool4 = fused_map(maps["fc7"].then(layer_map(self.upscore2)), maps["pool4"], pool4_offset)
        self.upscore16, _ = make_upsample(num_classes, fuse_pool4, CoordMap(), learnable=learnable_upsampling)
        self.crops = {
            "score_pool4c": pool4_offset,
            "score": crop_offset(fuse_pool4.then(layer_map(self.upscore16))),
        }

    def head(self, feats: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Score, fuse, upsample and crop the trunk's ``features`` to an image of ``size``."""
        upscore2 = self.upscore2(self.score_fr(feats["fc7"]))
        score_pool4 = self.score_pool4(feats["pool4"])
        fuse_pool4 = fuse(upscore2, score_pool4, self.crops["score_pool4c"])
        return crop_to(self.upscore16(fuse_pool4), self.crops["score"], size)


def fcn16s_vgg16(
    *,
    num_classes: int = 21,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN16s:
    """FCN-16s on VGG16; ``backbone_weights``: a torchvision VGG16 state_dict (path or fsspec URI)."""
    model = FCN16s(num_classes=num_classes, geometry=geometry, width=width, output_stride=output_stride,
                   learnable_upsampling=learnable_upsampling)
    return model if backbone_weights is None else load_backbone(model, backbone_weights)
