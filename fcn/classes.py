"""Class names of the FCN paper's datasets (PASCAL VOC, NYUDv2, SIFT Flow) and the VOC colour palette."""

from __future__ import annotations

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

# The NYUDv2 40-class task of Gupta et al. (CVPR 2013), in label order 1-40 (0 is void);
# "refridgerator" is spelled as in their class list.
NYUD40_CLASSES: tuple[str, ...] = (
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floor mat",
    "clothes",
    "ceiling",
    "books",
    "refridgerator",
    "television",
    "paper",
    "towel",
    "shower curtain",
    "box",
    "whiteboard",
    "person",
    "night stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
    "otherstructure",
    "otherfurniture",
    "otherprop",
)

# SIFT Flow (Liu, Yuen and Torralba), in label order 1-33 (0 is void), and its 3 geometric classes.
SIFTFLOW_CLASSES: tuple[str, ...] = (
    "awning",
    "balcony",
    "bird",
    "boat",
    "bridge",
    "building",
    "bus",
    "car",
    "cow",
    "crosswalk",
    "desert",
    "door",
    "fence",
    "field",
    "grass",
    "moon",
    "mountain",
    "person",
    "plant",
    "pole",
    "river",
    "road",
    "rock",
    "sand",
    "sea",
    "sidewalk",
    "sign",
    "sky",
    "staircase",
    "streetlight",
    "sun",
    "tree",
    "window",
)
SIFTFLOW_GEOMETRIC_CLASSES: tuple[str, ...] = ("sky", "horizontal", "vertical")


def numbered_class_names(num_classes: int) -> tuple[str, ...]:
    """``("class_0", ..., "class_<num_classes - 1>")``: the names of classes nobody has named."""
    return tuple(f"class_{i}" for i in range(num_classes))


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
