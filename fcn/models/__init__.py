"""The paper's FCNs: trunks, one skip head, their composition, a builder per name, and ``get_model``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from fcn.models.alexnet import fcn32s_alexnet
from fcn.models.builders import (
    fcn2s_vgg16,
    fcn4s_vgg16,
    fcn8s_atonce_vgg16,
    fcn8s_siftflow_vgg16,
    fcn8s_vgg16,
    fcn16s_rgbhha_vgg16,
    fcn16s_siftflow_vgg16,
    fcn16s_vgg16,
    fcn32s_hha_vgg16,
    fcn32s_rgbd_vgg16,
    fcn32s_rgbhha_vgg16,
    fcn32s_siftflow_vgg16,
    fcn32s_vgg16,
)
from fcn.models.fcn import FCN
from fcn.models.googlenet import fcn32s_googlenet
from fcn.models.head import SkipHead

BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "fcn32s_vgg16": fcn32s_vgg16,
    "fcn16s_vgg16": fcn16s_vgg16,
    "fcn8s_vgg16": fcn8s_vgg16,
    "fcn8s_atonce_vgg16": fcn8s_atonce_vgg16,
    "fcn4s_vgg16": fcn4s_vgg16,
    "fcn2s_vgg16": fcn2s_vgg16,
    "fcn32s_alexnet": fcn32s_alexnet,
    "fcn32s_googlenet": fcn32s_googlenet,
    "fcn32s_rgbd_vgg16": fcn32s_rgbd_vgg16,
    "fcn32s_hha_vgg16": fcn32s_hha_vgg16,
    "fcn32s_rgbhha_vgg16": fcn32s_rgbhha_vgg16,
    "fcn16s_rgbhha_vgg16": fcn16s_rgbhha_vgg16,
    "fcn32s_siftflow_vgg16": fcn32s_siftflow_vgg16,
    "fcn16s_siftflow_vgg16": fcn16s_siftflow_vgg16,
    "fcn8s_siftflow_vgg16": fcn8s_siftflow_vgg16,
}

__all__ = ["BUILDERS", "FCN", "SkipHead", "get_model", *BUILDERS]


def get_model(name: str, **kwargs: object) -> nn.Module:
    """Build the network ``name`` with builder arguments ``kwargs``; ValueError names a bad name or argument."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(BUILDERS)}")
    builder = BUILDERS[name]
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{name}: unknown argument(s) {unknown}; accepted: {sorted(accepted)}")
    return builder(**kwargs)
