"""Deterministic synthetic scenes in the PASCAL VOC, NYUDv2 and SIFT Flow layouts, for demos, tests and benches.

Each scene has a textured background and a few objects of five classes: filled discs, striped boxes,
checkered triangles and two thin structures (rings and wires a few pixels wide), so that the
difference between coarse (FCN-32s) and fine (FCN-8s) predictions shows on boundaries. Image sizes
vary. The same ``seed`` always gives the same files. The VOC layout::

    <uri>/JPEGImages/<id>.jpg
    <uri>/SegmentationClass/<id>.png          palette PNG, 0 = background, 255 = ignore
    <uri>/ImageSets/Segmentation/{train,val,trainval}.txt
    <uri>/class_names.txt                      one class name per line

The NYUDv2 and SIFT Flow layouts (as :mod:`pipelines.train.datasets` reads them) split the background at a
random horizon row: a wall above a floor (NYUDv2), sky above a field (SIFT Flow), and give the objects
classes of those datasets (``NYUD_SCENE_CLASSES``, ``SIFTFLOW_SCENE_CLASSES``). NYUDv2 scenes get a
depth map (a level view of a room: the wall at one distance, the floor receding to it, each object a
flat cut-out nearer than what it covers) and no HHA files; SIFT Flow scenes get geometric labels (sky,
horizontal ground, vertical objects). Labels are written as the datasets write them: ``.mat`` files,
classes from 1, 0 void (and -1 void in SIFT Flow's geometric labels)::

    python -m pipelines.synthetic OUT_URI --num-images 200 --seed 0 [--layout voc|nyud|siftflow]

``scenes`` renders the scenes, ``layouts`` writes them in each layout (``WRITERS``), ``__main__`` is the command.
"""

from pipelines.synthetic.layouts import (
    NYUD_SCENE_CLASSES,
    SIFTFLOW_SCENE_CLASSES,
    SIFTFLOW_SCENE_GEOMETRY,
    WRITERS,
    write_synthetic_nyud,
    write_synthetic_siftflow,
    write_synthetic_voc,
)
from pipelines.synthetic.scenes import SYNTHETIC_CLASSES, render_scene

__all__ = [
    "NYUD_SCENE_CLASSES",
    "SIFTFLOW_SCENE_CLASSES",
    "SIFTFLOW_SCENE_GEOMETRY",
    "SYNTHETIC_CLASSES",
    "WRITERS",
    "render_scene",
    "write_synthetic_nyud",
    "write_synthetic_siftflow",
    "write_synthetic_voc",
]
