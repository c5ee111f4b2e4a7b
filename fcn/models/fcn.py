"""An FCN is one or more trunks (streams) composed with one skip head per stream and head.

- single stream, single head: the paper's VOC nets (FCN-32s/16s/8s, and 4s/2s continuing the skips);
- early fusion: one stream whose first convolution takes RGB plus a depth channel (NYUDv2 RGB-D);
- late fusion: a colour and an HHA stream, each with its own head; their scores are averaged 0.5/0.5
  (NYUDv2 RGB-HHA, the reference ``nyud-fcn32s-color-hha``). The reference averages before its
  upsampling; upsampling and crop are linear and both streams' start as the same bilinear kernel, so
  averaging after them is the same network at initialisation and with ``learnable_upsampling=False``;
  learnable upsampling lets each stream refine its own;
- two heads on one trunk: a semantic and a geometric one, each with its own skips (SIFT Flow).

The input is one tensor: the modalities' channels concatenated in ``modalities`` order (rgb: 3,
depth: 1, hha: 3). The network returns a dict of scores by head name, in head order, whatever the
number of heads (``fcn.heads`` names what each head owns outside the network).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fcn.heads import PRIMARY_HEAD, classes_argument, split_heads
from fcn.models._common import Trunk, check_args, check_input
from fcn.models.head import SkipHead

MODALITY_CHANNELS = {"rgb": 3, "depth": 1, "hha": 3}
"""Input channels of each modality."""


class FCN(nn.Module):
    """``streams[name]``: a :class:`Trunk` reading ``stream_modalities[name]``; ``heads[head][stream]``:
    that stream's :class:`SkipHead` for ``head``. Carries ``arch``, ``head_classes`` (head -> classes),
    ``primary_head`` and its ``num_classes``, ``modalities``, ``in_channels``, ``output_stride``,
    ``receptive_field`` and ``crops`` (the first head's)."""

    def __init__(
        self,
        arch: dict,
        streams: Mapping[str, Trunk],
        stream_modalities: Mapping[str, Sequence[str]],
        heads: Mapping[str, Mapping[str, SkipHead]],
        head_classes: Mapping[str, int],
    ) -> None:
        super().__init__()
        self.arch = arch
        self.streams = nn.ModuleDict(streams)
        self.heads = nn.ModuleDict({head: nn.ModuleDict(by_stream) for head, by_stream in heads.items()})
        self.head_classes = dict(head_classes)
        self.primary_head, _ = split_heads(self.head_classes)
        self.num_classes = self.head_classes[self.primary_head]
        self.modalities = tuple(m for name in streams for m in stream_modalities[name])
        self.in_channels = sum(MODALITY_CHANNELS[m] for m in self.modalities)
        self._slices: dict[str, slice] = {}
        start = 0
        for name, trunk in streams.items():
            width = sum(MODALITY_CHANNELS[m] for m in stream_modalities[name])
            if width != trunk.in_channels:
                raise AssertionError(f"stream {name!r} reads {width} channels but its trunk takes {trunk.in_channels}")
            self._slices[name] = slice(start, start + width)
            start += width
        first = next(iter(streams.values()))
        self.output_stride = first.output_stride
        self.receptive_field = max(trunk.receptive_field for trunk in streams.values())
        self.crops = self.head.crops

    @property
    def backbone(self) -> Trunk:
        """The first stream's trunk (the only one of a single-stream net)."""
        return next(iter(self.streams.values()))

    @property
    def head(self) -> SkipHead:
        """The first head's :class:`SkipHead` on the first stream (the only one of a single-stream, single-head
        net)."""
        return next(iter(self.heads[self.primary_head].values()))

    def features(self, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Every stream's tapped features, by stream name."""
        check_input(x, self.in_channels)
        return {name: trunk.features(x[:, self._slices[name]]) for name, trunk in self.streams.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head's scores [N, classes, H, W] by head name (a late-fusion net's: its streams' mean)."""
        features = self.features(x)
        size = x.shape[-2:]
        scores = {}
        for head, by_stream in self.heads.items():
            outputs = [skip_head(features[stream], size) for stream, skip_head in by_stream.items()]
            scores[head] = outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(0)
        return scores


def build_fcn(
    name: str,
    trunk: type[Trunk],
    *,
    num_classes: int,
    geometry: str,
    width: float,
    output_stride: int,
    learnable_upsampling: bool,
    backbone_weights: str | None,
    skips: Sequence[str] = (),
    score_tap: str = "fc7",
    skip_scales: Mapping[str, float] | None = None,
    streams: Mapping[str, Sequence[str]] | None = None,
    extra_heads: Mapping[str, int] | None = None,
) -> FCN:
    """Check the builder arguments and compose an :class:`FCN`: one ``trunk`` per stream (default:
    one RGB stream), a :class:`SkipHead` with ``skips`` per stream and head (the "semantic" head of
    ``num_classes``, then ``extra_heads``: head -> classes); then load ``backbone_weights`` (a
    torchvision classifier's state_dict, path or fsspec URI) into every stream. ``arch`` records the
    builder arguments, ``<head>_classes`` for each extra head."""
    from fcn.weights import load_backbone

    check_args(
        name,
        num_classes=num_classes,
        geometry=geometry,
        width=width,
        output_stride=output_stride,
        learnable_upsampling=learnable_upsampling,
    )
    head_classes = {PRIMARY_HEAD: num_classes, **(extra_heads or {})}
    for head, classes in head_classes.items():
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
            raise ValueError(f"{name}: {classes_argument(head, head_classes)} must be a positive int, got {classes!r}")
    arch_kwargs = {
        "num_classes": num_classes,
        "geometry": geometry,
        "width": float(width),
        "output_stride": output_stride,
        "learnable_upsampling": learnable_upsampling,
        **{classes_argument(head, head_classes): n for head, n in (extra_heads or {}).items()},
    }
    streams = streams or {"rgb": ("rgb",)}
    trunks = {
        stream: trunk(
            geometry=geometry,
            width=width,
            output_stride=output_stride,
            in_channels=sum(MODALITY_CHANNELS[m] for m in modalities),
        )
        for stream, modalities in streams.items()
    }
    heads = {
        head: {
            stream: SkipHead(
                stream_trunk,
                classes,
                score_tap=score_tap,
                skips=skips,
                learnable_upsampling=learnable_upsampling,
                skip_scales=skip_scales,
            )
            for stream, stream_trunk in trunks.items()
        }
        for head, classes in head_classes.items()
    }
    model = FCN({"name": name, "kwargs": arch_kwargs}, trunks, streams, heads, head_classes)
    return model if backbone_weights is None else load_backbone(model, backbone_weights)
