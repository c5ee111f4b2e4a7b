"""FCN-8s (paper 4.2): FCN-16s's fused map fused again with a pool3 prediction, upsampled by 8.

The at-once variant (trained in one stage rather than from FCN-16s) scales pool4 by 0.01 and pool3
by 1e-4 before their score layers, as in Caffe's voc-fcn8s-atonce.
"""

from __future__ import annotations

import torch
from torch import nn

from fcn.geometry import CoordMap, crop_offset, layer_map
from fcn.models._common import crop_to, fuse, fused_map, init_score, make_upsample
from fcn.models.vgg import VGG16FCN
from fcn.weights import load_backbone

AT_ONCE_SCALES = {"pool4": 0.01, "pool3": 0.0001}


class FCN8s(VGG16FCN):
    """upscore2 (k4/s2) + score_pool4 (crop 5) -> upscore_pool4 (k4/s2) + score_pool3 (crop 9)
    -> upscore8 (k16/s8) -> crop 31."""

    def __init__(
        self,
        *,
        num_classes: int = 21,
        geometry: str = "reference",
        width: float = 1.0,
        output_stride: int = 32,
        learnable_upsampling: bool = True,
        at_once: bool = False,
    ) -> None:
        super().__init__(
            "fcn8s_atonce_vgg16" if at_once else "fcn8s_vgg16",
            num_classes=num_classes,
            geometry=geometry,
            width=width,
            output_stride=output_stride,
            learnable_upsampling=learnable_upsampling,
        )
        self.skip_scales = dict(AT_ONCE_SCALES) if at_once else {}  # staged nets feed the pools unscaled
        self.score_fr = init_score(nn.Conv2d(self.fc7_channels, num_classes, 1))
        self.score_pool4 = init_score(nn.Conv2d(self.pool4_channels, num_classes, 1))
        self.score_pool3 = init_score(nn.Conv2d(self.pool3_channels, num_classes, 1))
        maps = self.tap_maps()
        learnable = learnable_upsampling
        self.upscore2, pool4_offset = make_upsample(num_classes, maps["fc7"], maps["pool4"], learnable=learnable)
        fuse_pool4 = fused_map(maps["fc7"].then(layer_map(self.upscore2)), maps["pool4"], pool4_offset)
        self.upscore_pool4, pool3_offset = make_upsample(num_classes, fuse_pool4, maps["pool3"], learnable=learnable)
        fuse_pool3 = fused_map(fuse_pool4.then(layer_map(self.upscore_pool4)), maps["pool3"], pool3_offset)
        self.upscore8, _ = make_upsample(num_classes, fuse_pool3, CoordMap(), learnable=learnable)
        self.crops = {
            "score_pool4c": pool4_offset,
            "score_pool3c": pool3_offset,
            "score": crop_offset(fuse_pool3.then(layer_map(self.upscore8))),
        }

    def head(self, feats: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Score, fuse, upsample and crop the trunk's ``features`` to an image of ``size``."""
        upscore2 = self.upscore2(self.score_fr(feats["fc7"]))
        score_pool4 = self.score_pool4(self._skip(feats, "pool4"))
        upscore_pool4 = self.upscore_pool4(fuse(upscore2, score_pool4, self.crops["score_pool4c"]))
        score_pool3 = self.score_pool3(self._skip(feats, "pool3"))
        fuse_pool3 = fuse(upscore_pool4, score_pool3, self.crops["score_pool3c"])
        return crop_to(self.upscore8(fuse_pool3), self.crops["score"], size)

    def _skip(self, feats: dict[str, torch.Tensor], pool: str) -> torch.Tensor:
        """A pool's features for its score layer, scaled by the at-once factor if any (no copy otherwise)."""
        scale = self.skip_scales.get(pool)
        return feats[pool] if scale is None else feats[pool] * scale


def fcn8s_vgg16(
    *,
    num_classes: int = 21,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN8s:
    """FCN-8s on VGG16; ``backbone_weights``: a torchvision VGG16 state_dict (path or fsspec URI)."""
    model = FCN8s(num_classes=num_classes, geometry=geometry, width=width, output_stride=output_stride,
                  learnable_upsampling=learnable_upsampling)
    return model if backbone_weights is None else load_backbone(model, backbone_weights)


def fcn8s_atonce_vgg16(
    *,
    num_classes: int = 21,
    geometry: str = "reference",
    width: float = 1.0,
    backbone_weights: str | None = None,
    output_stride: int = 32,
    learnable_upsampling: bool = True,
) -> FCN8s:
    """FCN-8s trained at once (pool4 x 0.01, pool3 x 1e-4 before scoring) on VGG16."""
    model = FCN8s(num_classes=num_classes, geometry=geometry, width=width, output_stride=output_stride,
                  learnable_upsampling=learnable_upsampling, at_once=True)
    return model if backbone_weights is None else load_backbone(model, backbone_weights)
