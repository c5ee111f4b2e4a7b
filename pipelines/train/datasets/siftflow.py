"""The SIFT Flow layout, as the FCN reference code's ``data/sift-flow``, with ``S`` = :data:`SIFTFLOW_SET`:
``Images/S/<id>.jpg``, ``SemanticLabels/S/<id>.mat`` (variable ``S``: 1-33 the classes, 0 void) and
``GeoLabels/S/<id>.mat`` (variable ``S``: 1-3 sky, horizontal, vertical; 0 and -1 void); ``trainval.txt`` is
the train split and ``test.txt`` the val split, as the reference trains and tests. Its label heads are
``semantic`` and ``geometric``.
"""

from __future__ import annotations

import fsspec

from fcn.classes import SIFTFLOW_CLASSES, SIFTFLOW_GEOMETRIC_CLASSES
from pipelines.train.datasets.base import SEMANTIC, Layout, Sample, Splits, listed_ids

GEOMETRIC = "geometric"
SIFTFLOW_SET = "spatial_envelope_256x256_static_8outdoorcategories"


def siftflow_splits(fs: fsspec.AbstractFileSystem, root: str) -> Splits:
    def sample(i: str) -> Sample:
        return Sample(
            i,
            fs.unstrip_protocol(f"{root}/Images/{SIFTFLOW_SET}/{i}.jpg"),
            fs.unstrip_protocol(f"{root}/SemanticLabels/{SIFTFLOW_SET}/{i}.mat"),
            "siftflow",
            other_labels=((GEOMETRIC, fs.unstrip_protocol(f"{root}/GeoLabels/{SIFTFLOW_SET}/{i}.mat")),),
        )

    train, val = (listed_ids(fs, root, name, "siftflow") for name in ("trainval.txt", "test.txt"))
    return [sample(i) for i in train], [sample(i) for i in val]


LAYOUT = Layout(
    tuple(f"{folder}/{SIFTFLOW_SET}" for folder in ("Images", "SemanticLabels", "GeoLabels")),
    siftflow_splits,
    classes=SIFTFLOW_CLASSES,
    other_heads={GEOMETRIC: SIFTFLOW_GEOMETRIC_CLASSES},
    mat_labels={SEMANTIC: ("S", None), GEOMETRIC: ("S", -1)},  # siftflow_layers.py: geometric -1 is void too
)
