"""The PASCAL VOC layout: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette or grey PNG with
class indices, 255 = ignore), ``ImageSets/Segmentation/{train,val}.txt``. A mask missing from
``SegmentationClass`` makes its sample bad, not the dataset. :func:`is_pascal_voc` tells PASCAL VOC itself
from other data in its folders.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import fsspec

from pipelines.train.datasets.base import Layout, Sample, Splits, listed_ids

VOC_IMAGE_ID = re.compile(r"20(0[7-9]|1[0-2])_\d{6}")  # VOC2008-2012 (and SBD): 2007_000032
VOC2007_IMAGE_ID = re.compile(r"\d{6}")  # VOC2007's own release: 000032
VOC2007_FOLDER = "VOC2007"


def is_pascal_voc(uri: str, samples: Sequence[Sample]) -> bool:
    """Whether VOC-layout ``samples`` are PASCAL VOC itself: every image id has the form of VOC2008-2012's
    (``2007_000032``), or the root is VOC2007's release folder (``VOCdevkit/VOC2007``) and every id has
    its form (``000032``). A root folder name alone is not enough: tools ask for custom data in
    ``VOCdevkit/VOC2012``."""
    ids = [sample.id for sample in samples]
    if not ids:
        return False
    if all(VOC_IMAGE_ID.fullmatch(i) for i in ids):
        return True
    return uri.rstrip("/").rsplit("/", 1)[-1] == VOC2007_FOLDER and all(VOC2007_IMAGE_ID.fullmatch(i) for i in ids)


def voc_splits(fs: fsspec.AbstractFileSystem, root: str) -> Splits:
    masks = {p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/SegmentationClass/*.png")}

    def sample(i: str) -> Sample:
        mask = fs.unstrip_protocol(f"{root}/SegmentationClass/{i}.png") if f"{i}.png" in masks else None
        return Sample(i, fs.unstrip_protocol(f"{root}/JPEGImages/{i}.jpg"), mask, "voc")

    train, val = (listed_ids(fs, root, f"ImageSets/Segmentation/{name}.txt", "voc") for name in ("train", "val"))
    return [sample(i) for i in train], [sample(i) for i in val]


LAYOUT = Layout(("JPEGImages", "ImageSets/Segmentation"), voc_splits)
