"""The paper's FCNs: trunks, one skip head, their composition, the registered builders, and ``get_model``."""

from __future__ import annotations

import inspect

from torch import nn

from fcn.models import alexnet, builders, googlenet  # noqa: F401  (their builders register themselves)
from fcn.models.fcn import FCN
from fcn.models.head import SkipHead
from fcn.models.networks import NETWORKS, Network, register_model

__all__ = ["FCN", "NETWORKS", "Network", "SkipHead", "get_model", "register_model"]


def __getattr__(name: str) -> object:
    """A registered network's builder by name (``fcn.models.fcn8s_vgg16``)."""
    if name not in NETWORKS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return NETWORKS[name].builder


def get_model(name: str, **kwargs: object) -> nn.Module:
    """Build the network ``name`` with builder arguments ``kwargs``; ValueError names a bad name or argument."""
    if name not in NETWORKS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(NETWORKS)}")
    builder = NETWORKS[name].builder
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{name}: unknown argument(s) {unknown}; accepted: {sorted(accepted)}")
    return builder(**kwargs)
