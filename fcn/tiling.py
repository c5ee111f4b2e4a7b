"""The tiles of tiled inference: windows whose starts lie on the network's output-stride grid, each keeping
only its core, a margin (``tile_margin``) inside every side that borders another tile, so that the cores
partition the image (``tile_windows``). Pure arithmetic: no torch.
"""

from __future__ import annotations

import math

DECODER_REACH = 64
"""Pixels an output depends on beyond half the trunk's receptive field: the skip/upsampling layers
(FCN-8s: k4/s2 at stride 32, k4/s2 at stride 16, k16/s8 at stride 8) reach up to 56 px further."""


def tile_margin(receptive_field: int, stride: int) -> int:
    """Input pixels that tiled inference drops on each side of a tile that borders another: half the
    receptive field plus ``DECODER_REACH``, rounded up to the output ``stride``."""
    return _round_up(math.ceil(receptive_field / 2) + DECODER_REACH, stride)


def tile_windows(height: int, width: int, tile_size: int, margin: int) -> list[tuple[int, ...]]:
    """The tiles of a ``height`` x ``width`` image, row by row, as ``(y0, y1, x0, x1, core_y0, core_y1, core_x0,
    core_x1)``: each reads input rows ``y0:y1`` and columns ``x0:x1`` (starts on the stride grid, at most
    ``tile_size`` long) and keeps its core, which lies ``margin`` inside every side bordering another tile; the
    cores partition the image (``tile_size`` and ``margin`` are multiples of the stride, see ``tile_margin``)."""
    return [
        (y0, y1, x0, x1, cy0, cy1, cx0, cx1)
        for y0, y1, cy0, cy1 in _spans(height, tile_size, margin)
        for x0, x1, cx0, cx1 in _spans(width, tile_size, margin)
    ]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _spans(length: int, tile: int, margin: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis as (input start, input end, core start, core end).

    Inputs are at most ``tile`` long and start on multiples of the stride (``tile`` and ``margin``
    are multiples of it); cores partition ``[0, length)`` and stay ``margin`` away from every
    input end that is not an image border.
    """
    if length <= tile:
        return [(0, length, 0, length)]
    spans = []
    core_start = 0
    while core_start < length:
        start = max(0, core_start - margin)
        end = min(length, start + tile)
        core_end = length if end == length else end - margin
        spans.append((start, end, core_start, core_end))
        core_start = core_end
    return spans
