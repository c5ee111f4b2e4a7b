"""FCNs (Long, Shelhamer, Darrell 2015) in pure PyTorch: models, checkpoints, prediction, metrics.

The public names below are imported on first use, so ``fcn.image`` or ``fcn.classes`` load without
torch (e.g. in the segmentation job's decoding workers). ``fcn.<name>`` is the builder of the registered
network ``name`` (``fcn.models.NETWORKS``).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

_EXPORTS = {
    "fcn.models": ("FCN", "NETWORKS", "SkipHead", "get_model", "register_model"),
    "fcn.checkpoint": ("Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"),
    "fcn.classes": ("VOC_CLASSES", "voc_palette"),
    "fcn.conventions": ("InputConvention", "get_convention"),
    "fcn.image": ("to_rgb_array",),
    "fcn.losses": ("cross_entropy",),
    "fcn.metrics": ("ConfusionMatrix",),
    "fcn.heads": ("PRIMARY_HEAD", "head_key", "split_heads"),
    "fcn.predictor": ("Prediction", "Predictor", "predict"),
    "fcn.scores": ("HeadPrediction",),
    "fcn.device": ("resolve_precision",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(_MODULE_OF[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is None:
        networks = importlib.import_module("fcn.models").NETWORKS
        if name in networks:  # a registered network's builder
            return networks[name].builder
    raise AttributeError(f"module 'fcn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
