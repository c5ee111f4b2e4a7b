"""The skip head (paper 4.2): score the trunk's coarsest map, then refine it with finer ones.

One module for FCN-32s, 16s, 8s and beyond, parameterised by its skips: ``()`` is FCN-32s,
``("pool4",)`` FCN-16s, ``("pool4", "pool3")`` FCN-8s, and each further pool (pool2: FCN-4s, pool1:
FCN-2s) continues the same pattern. Layers carry pytorch-fcn's names: ``score_fr``, one
``score_<pool>`` per skip, ``upscore2`` then ``upscore_<pool>`` between fusions, and a last
upsampling ``upscore`` (32s), ``upscore16``, ``upscore8``, ``upscore4`` or ``upscore_pool1`` (2s).
Every upsampling starts as bilinear interpolation; every crop comes from the coordinate maps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import torch
from torch import nn

from fcn.geometry import CoordMap, crop_offset, layer_map
from fcn.models._common import Trunk, crop_to, fuse, fused_map, init_score, make_upsample

SKIP_ORDER = ("pool4", "pool3", "pool2", "pool1")
"""Skips in the order the head takes them: FCN-16s uses the first, FCN-8s two, FCN-4s three, FCN-2s all."""
LAST_UPSAMPLING = {0: "upscore", 1: "upscore16", 2: "upscore8", 3: "upscore4", 4: "upscore_pool1"}
"""Name of the final upsampling by number of skips (pytorch-fcn's; FCN-2s's ``upscore2`` is taken)."""


class SkipHead(nn.Module):
    """Score ``score_tap`` and each skip of a :class:`Trunk`, fuse them coarse to fine, upsample to
    the input and crop. ``skip_scales`` multiplies a skip's features before its score layer (the
    at-once FCN-8s). ``crops`` holds each fusion's offset (``score_<pool>c``) and the final one."""

    def __init__(
        self,
        trunk: Trunk,
        num_classes: int,
        *,
        score_tap: str = "fc7",
        skips: Sequence[str] = (),
        learnable_upsampling: bool = True,
        skip_scales: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        skips = tuple(skips)
        if skips != SKIP_ORDER[: len(skips)]:
            raise ValueError(f"skips must be a prefix of {SKIP_ORDER}, got {skips}")
        unknown = [tap for tap in (score_tap, *skips) if tap not in trunk.tap_channels]
        if unknown:
            raise ValueError(f"{type(trunk).__name__} has no tap {unknown[0]!r}; it taps {sorted(trunk.tap_channels)}")
        self.score_tap, self.skips = score_tap, skips
        self.skip_scales = dict(skip_scales or {})
        self.score_fr = init_score(nn.Conv2d(trunk.tap_channels[score_tap], num_classes, 1))
        maps = trunk.tap_maps()
        current, previous = maps[score_tap], None
        self.crops: dict[str, int] = {}
        self.upsamplings: list[str] = []
        for tap in skips:
            self.add_module(f"score_{tap}", init_score(nn.Conv2d(trunk.tap_channels[tap], num_classes, 1)))
            up, offset = make_upsample(num_classes, current, maps[tap], learnable=learnable_upsampling)
            self._add_upsampling("upscore2" if previous is None else f"upscore_{previous}", up)
            self.crops[f"score_{tap}c"] = offset
            current, previous = fused_map(current.then(layer_map(up)), maps[tap], offset), tap
        up, _ = make_upsample(num_classes, current, CoordMap(), learnable=learnable_upsampling)
        self._add_upsampling(LAST_UPSAMPLING[len(skips)], up)
        self.crops["score"] = crop_offset(current.then(layer_map(up)))

    def _add_upsampling(self, name: str, layer: nn.Module) -> None:
        self.add_module(name, layer)
        self.upsamplings.append(name)

    def forward(self, features: Mapping[str, torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Class scores ``[N, num_classes, *size]`` from a trunk's ``features`` of an input of ``size``.

        The head computes in float32 even under autocast (a trunk run in bf16): scoring, fusion,
        upsampling and crop of 16-bit-rounded logits would move near-ties and the softmax confidence."""
        device = features[self.score_tap].device.type
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            score = self.score_fr(features[self.score_tap].float())
            for tap, upsampling in zip(self.skips, self.upsamplings, strict=False):
                skip = features[tap].float()
                scale = self.skip_scales.get(tap)
                if scale is not None:
                    skip = skip * scale
                skip_score = getattr(self, f"score_{tap}")(skip)
                score = fuse(getattr(self, upsampling)(score), skip_score, self.crops[f"score_{tap}c"])
            return crop_to(getattr(self, self.upsamplings[-1])(score), self.crops["score"], tuple(size))
