"""The training job's configuration: ``TrainConfig`` holds every default, its validation and the help
text that the CLI flags (``cli.py``) and the ``nightly-retrain`` flow's parameters are made from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import torch

import fcn
from fcn.conventions import CONVENTIONS
from fcn.heads import classes_argument
from fcn.models import NETWORKS
from pipelines.common.options import ConfigError, Options, flag, option
from pipelines.train.class_weights import CLASS_WEIGHTS_HELP, MEDIAN_FREQUENCY, NO_WEIGHTS
from pipelines.train.datasets import LAYOUTS
from pipelines.train.recipes import RECIPES


@dataclass
class TrainConfig(Options):
    """A training run; each field is a CLI flag (``--batch-size`` for ``batch_size``). ``registry``
    receives the run's checkpoints and the registered model."""

    data: str = option(
        "",
        "dataset root (any fsspec URI) in the voc, images-masks, nyud (NYUDv2) or siftflow "
        "(SIFT Flow) layout; the network's heads get one output per class of the data (see "
        "--classes)",
        required=True,
    )
    registry: str = option("", "model registry root (any fsspec URI)", required=True)
    model: str = option(
        "fcn8s_vgg16",
        lambda: (
            f"network (its inputs, if not rgb): {_network_list()}. The data must provide its inputs "
            "(nyud: rgb, depth, hha; other layouts: rgb) and its heads (siftflow: semantic, geometric; "
            "others: semantic); a one-head network on SIFT Flow data trains the semantic head only"
        ),
        choices=lambda: tuple(NETWORKS),
        metavar="NAME",
    )
    layout: str | None = option(
        None,
        "dataset layout (default: detected from the folders under --data); the voc "
        "layout is any data in PASCAL VOC's folders, named as PASCAL VOC only when it is "
        "VOC itself (see --classes)",
        choices=LAYOUTS,
    )
    init: str | None = option(
        None, "checkpoint or registry to start from; tensors with matching names and shapes are copied"
    )
    backbone_weights: str | None = option(None, "backbone weights for the builder (see fcn.get_model)")
    workers: int = option(2, "data-parallel Ray Train workers", ge=1)
    gpus_per_worker: float = option(0.0, "GPUs per worker; > 0 trains with NCCL on GPUs", ge=0)
    cpus_per_worker: float = option(1.0, "CPUs per worker", gt=0)
    loader_workers: int | None = option(
        None,
        "data loader processes per worker, decoding and augmenting ahead of the "
        "network (default: min(4, --cpus-per-worker) on a GPU, 0 on the CPU)",
        ge=0,
    )
    epochs: int = option(10, "training epochs", ge=1)
    recipe: str = option(
        "modern",
        "'modern' (mean loss, AdamW, poly lr, flips, scale) or 'paper' (summed loss, "
        "SGD momentum 0.99, the reference solvers' fixed lr, e.g. 1e-10/1e-12/1e-14 for "
        "32s/16s/8s)",
        choices=tuple(RECIPES),
    )
    lr: float | None = option(None, "learning rate (default: the recipe's)", gt=0)
    width: float = option(1.0, "channel width multiplier of the network", gt=0)
    geometry: str = option("reference", "'reference' (pad 100, as the paper) or 'aligned'")
    batch_size: int = option(1, "images per worker step, padded with ignored pixels", ge=1)
    loss_sample_rate: float = option(1.0, "fraction of loss terms kept (paper 3.4)", gt=0, le=1)
    input_convention: str | None = option(
        None, "input normalisation (default: the --init checkpoint's, else torchvision)", choices=tuple(CONVENTIONS)
    )
    classes: str | None = option(
        None,
        "file with one semantic class name per line (default: <data>/class_names.txt, "
        "else the layout's (nyud: 40, siftflow: 33), else VOC's 21 for PASCAL VOC itself "
        "(every image id like 2007_000032, or 000032 under a VOC2007 folder) with label ids "
        "up to 20, else class_0... up to the largest label id of the train split, with a "
        "warning)",
    )
    class_weights: str = option(
        NO_WEIGHTS, f"{CLASS_WEIGHTS_HELP}; they weigh the semantic head's loss (further heads' losses are unweighted)"
    )
    run_name: str | None = option(None, "run folder under <registry>/runs/; an existing run is resumed")
    promote_margin: float = option(
        0.0, "validation mean IU (of the first head) the run must beat the champion by", ge=0
    )
    promote: bool = option(
        True,
        "promote the registered version to champion if its validation mean IU (of the "
        "first, semantic head) beats the champion's by more than --promote-margin; "
        "--no-promote registers it only",
    )
    max_failures: int = option(1, "worker failures to recover from (-1: unlimited)", ge=-1)
    keep_checkpoints: int | None = option(None, "keep only the N best epochs' folders (default: all)", ge=1)
    strict: bool = option(False, "check every sample first; fail on any bad sample")
    seed: int = option(0, "seed of the shuffling, augmentation and loss sampling")
    ray_address: str | None = option(None, "Ray cluster address (default: RAY_ADDRESS or a local cluster)")

    def validate(self) -> None:
        """Raise ConfigError naming the first bad parameter (checks that need no data)."""
        for name in ("data", "registry"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigError(flag(name), "must be a non-empty URI or path")
        for name in ("model", "layout", "recipe", "input_convention"):
            choices, value = self.metadata(name)["choices"], getattr(self, name)
            if value is not None and value not in choices:
                raise ConfigError(flag(name), f"must be one of {', '.join(choices)}, got {value!r}")
        self.check_bounds()
        checks = [
            ("gpus_per_worker", whole_gpus(self.gpus_per_worker), GPUS_PER_WORKER_RULE),
            ("run_name", self.run_name is None or _safe_name(self.run_name), "may only contain letters, digits, . _ -"),
            (
                "class_weights",
                self.class_weights in (NO_WEIGHTS, MEDIAN_FREQUENCY) or _exists(self.class_weights),
                f"must be {NO_WEIGHTS!r}, {MEDIAN_FREQUENCY!r} or an existing file",
            ),
            ("classes", self.classes is None or _exists(self.classes), "no classes file there"),
            ("backbone_weights", self.backbone_weights is None or _exists(self.backbone_weights), "no file there"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise ConfigError(flag(name), f"{message}, got {getattr(self, name)!r}")
        RECIPES[self.recipe].learning_rate(self.model, self.lr)
        try:  # model and width are valid here: a builder error is about the geometry
            with torch.device("meta"):
                fcn.get_model(self.model, width=self.width, geometry=self.geometry)
        except ValueError as error:
            raise ConfigError(flag("geometry"), str(error)) from None

    def model_kwargs(self, head_classes: Mapping[str, int]) -> dict[str, Any]:
        """The builder arguments for heads of ``head_classes`` (head -> classes; ``fcn.heads.classes_argument``
        names each: ``num_classes``, ``geometric_classes``)."""
        return {
            **{classes_argument(head, head_classes): classes for head, classes in head_classes.items()},
            "width": self.width,
            "geometry": self.geometry,
            "backbone_weights": self.backbone_weights,
        }


GPUS_PER_WORKER_RULE = "must be 0 (train on CPUs) or a whole number of GPUs (NCCL refuses two ranks on one GPU)"


def whole_gpus(gpus_per_worker: float) -> bool:
    """Whether a worker's GPU share can run NCCL: 0 (CPU) or a whole number >= 1."""
    return gpus_per_worker >= 0 and float(gpus_per_worker).is_integer()


def _safe_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "._-" for c in name)


def _exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def _network_list() -> str:
    """The registered networks for ``--help``, each with its inputs where they are not RGB alone."""
    return ", ".join(
        name if network.modalities == ("rgb",) else f"{name} ({'+'.join(network.modalities)})"
        for name, network in NETWORKS.items()
    )
