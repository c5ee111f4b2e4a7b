"""FCNs (Long, Shelhamer, Darrell 2015) in pure PyTorch: models, checkpoints, prediction, metrics.

The public names below are imported on first use, so ``fcn.image`` or ``fcn.classes`` load without
torch (e.g. in the segmentation job's decoding workers).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "fcn.models": (
        "FCN",
        "SkipHead",
        "get_model",
        "fcn2s_vgg16",
        "fcn4s_vgg16",
        "fcn8s_atonce_vgg16",
        "fcn8s_siftflow_vgg16",
        "fcn8s_vgg16",
        "fcn16s_rgbhha_vgg16",
        "fcn16s_siftflow_vgg16",
        "fcn16s_vgg16",
        "fcn32s_alexnet",
        "fcn32s_googlenet",
        "fcn32s_hha_vgg16",
        "fcn32s_rgbd_vgg16",
        "fcn32s_rgbhha_vgg16",
        "fcn32s_siftflow_vgg16",
        "fcn32s_vgg16",
    ),
    "fcn.checkpoint": ("Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"),
    "fcn.classes": ("VOC_CLASSES", "voc_palette"),
    "fcn.conventions": ("InputConvention", "get_convention"),
    "fcn.image": ("to_rgb_array",),
    "fcn.losses": ("cross_entropy",),
    "fcn.metrics": ("ConfusionMatrix",),
    "fcn.predictor": ("Prediction", "Predictor", "predict", "resolve_precision"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'fcn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
