"""The NYUDv2 layout, as the FCN reference code's ``data/nyud``: ``data/images/img_<id>.png`` colour,
``data/depth/img_<id>.png`` depth (16-bit PNG in millimetres, 0 = no reading), ``segmentation/img_<id>.mat``
(variable ``segmentation``: 1-40 the 40 classes, 0 void), optional ``data/hha/img_<id>.png`` (HHA is
computed from depth where it is missing); ``train.txt`` and ``val.txt`` list the ids (``test.txt`` is not
read). Its modalities are ``rgb``, ``depth`` and ``hha``.
"""

from __future__ import annotations

import fsspec

from fcn.classes import NYUD40_CLASSES
from pipelines.train.datasets.base import SEMANTIC, Layout, Sample, Splits, listed_ids


def nyud_splits(fs: fsspec.AbstractFileSystem, root: str) -> Splits:
    hha = {p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/data/hha/img_*.png")}

    def sample(i: str) -> Sample:
        return Sample(
            i,
            fs.unstrip_protocol(f"{root}/data/images/img_{i}.png"),
            fs.unstrip_protocol(f"{root}/segmentation/img_{i}.mat"),
            "nyud",
            depth=fs.unstrip_protocol(f"{root}/data/depth/img_{i}.png"),
            hha=fs.unstrip_protocol(f"{root}/data/hha/img_{i}.png") if f"img_{i}.png" in hha else None,
        )

    train, val = (listed_ids(fs, root, name, "nyud") for name in ("train.txt", "val.txt"))
    return [sample(i) for i in train], [sample(i) for i in val]


LAYOUT = Layout(
    ("data/images", "data/depth", "segmentation"),
    nyud_splits,
    modalities=("rgb", "depth", "hha"),
    classes=NYUD40_CLASSES,
    mat_labels={SEMANTIC: ("segmentation", None)},
)
