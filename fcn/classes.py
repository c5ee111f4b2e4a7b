"""PASCAL VOC class names and the standard VOC colour palette."""

from __future__ import annotations

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def voc_palette() -> list[int]:
    """The VOC colour map as 768 ints (256 RGB triples) for ``PIL.Image.putpalette``.

    Label ``i`` gets its bits spread over the high bits of R, G and B, as in the VOC devkit's
    ``labelcolormap``; the ignore label 255 comes out as (224, 224, 192).
    """
    palette: list[int] = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette
