"""The training recipes: the paper's (summed loss, SGD with momentum 0.99, the reference solvers' fixed
learning rates, registered with each network as ``paper_lr``) and a modern one (mean loss, AdamW, poly
decay, flips and rescaling)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from fcn.models import NETWORKS
from pipelines.common.options import ConfigError, flag


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings of a training recipe."""

    name: str
    optimizer: str  # "sgd" or "adamw"
    momentum: float  # SGD only
    weight_decay: float
    loss_reduction: str  # "sum" (reference solvers) or "mean"
    poly_power: float | None  # None: fixed learning rate
    hflip: bool
    scale_range: tuple[float, float] | None
    lr: float | None = None  # None: the network's paper_lr (fcn.models.NETWORKS)

    def learning_rate(self, model: str, override: float | None) -> float:
        """``override`` if given, else the recipe's rate, else the paper's rate for ``model``;
        ConfigError naming ``--lr`` when there is none."""
        if override is not None:
            return override
        if self.lr is not None:
            return self.lr
        network = NETWORKS.get(model)
        if network is None or network.paper_lr is None:
            raise ConfigError(flag("lr"), f"the {self.name} recipe has no learning rate for {model!r}; pass --lr")
        return network.paper_lr

    def lr_factor(self, total_steps: int) -> Callable[[int], float]:
        """The learning-rate multiplier as a function of the step: poly decay, or constant."""
        power, total = self.poly_power or 0.0, max(total_steps, 1)
        return lambda step: (1 - min(step, total) / total) ** power

    def make_optimizer(self, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """The recipe's optimizer over ``params`` at learning rate ``lr``."""
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)


RECIPES = {
    "paper": Recipe(
        "paper",
        "sgd",
        momentum=0.99,
        weight_decay=5e-4,
        loss_reduction="sum",
        poly_power=None,
        hflip=False,
        scale_range=None,
    ),
    "modern": Recipe(
        "modern",
        "adamw",
        momentum=0.0,
        weight_decay=1e-4,
        loss_reduction="mean",
        poly_power=0.9,
        hflip=True,
        scale_range=(0.75, 1.25),
        lr=1e-3,
    ),
}
