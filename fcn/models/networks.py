"""The registry of networks: a builder registers itself, with its paper learning rate and inputs, by one
decorator (as torchvision's ``register_model``). ``fcn.get_model``, ``fcn.<name>``, the training job's
``--model`` choices and the paper recipe's learning rate all read :data:`NETWORKS`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from fcn.models.fcn import MODALITY_CHANNELS

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class Network:
    """A registered network: its builder, ``paper_lr`` (the reference solver's fixed learning rate for the
    unnormalised, summed loss at batch 1 and momentum 0.99, from the ``solver.prototxt`` of voc-fcn*,
    nyud-fcn32s-hha, nyud-fcn32s-color-hha, siftflow-fcn32s/16s; None where there is none) and the
    modalities it reads, in input order."""

    name: str
    builder: Callable[..., nn.Module]
    paper_lr: float | None
    modalities: tuple[str, ...]


NETWORKS: dict[str, Network] = {}
"""Every registered network by name, in registration order."""


def register_model(
    *, paper_lr: float | None = None, modalities: Sequence[str] = ("rgb",), name: str | None = None
) -> Callable[[Builder], Builder]:
    """Register the decorated builder as network ``name`` (default: the builder's name) and return it
    unchanged. ValueError names a name registered twice or an unknown modality."""

    def register(builder: Builder) -> Builder:
        network = name or builder.__name__
        if network in NETWORKS:
            raise ValueError(f"network {network!r} is already registered (by {NETWORKS[network].builder.__module__})")
        unknown = [m for m in modalities if m not in MODALITY_CHANNELS]
        if unknown or not modalities:
            raise ValueError(f"{network}: modalities must be some of {sorted(MODALITY_CHANNELS)}, got {modalities!r}")
        NETWORKS[network] = Network(network, builder, paper_lr, tuple(modalities))
        return builder

    return register
