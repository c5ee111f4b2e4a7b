"""What the driver prepares for the training workers (``make_loop_config``): the network's heads sized
from the data, the class weights, the ``--init`` weights and, with ``--strict``, every sample checked."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

import fcn
from pipelines.common.options import ConfigError, flag
from pipelines.train.class_weights import resolve_class_weights
from pipelines.train.config import TrainConfig
from pipelines.train.context import default_run_name
from pipelines.train.datasets import BadSample, Sample, SegmentationData, read_example

logger = logging.getLogger("pipelines.train")


def make_loop_config(config: TrainConfig, data: SegmentationData) -> dict[str, Any]:
    """The workers' configuration for training ``config`` on the opened ``data``: the heads sized from
    the data, the class weights, the ``--init`` weights and the input convention resolved.

    Raises ConfigError naming the parameter where the model, data, class weights or ``--init`` do not fit
    (``--strict``: where any sample is bad). ``config`` must be valid (``config.validate()``).
    """
    with torch.device("meta"):
        network = fcn.get_model(config.model, width=config.width, geometry=config.geometry)
    heads = fit_to_data(network, data, network_param=flag("model"), data_param=flag("data"))
    if len(heads) < len(data.heads):
        logger.info(
            "%s has the head(s) %s: the data's further head(s) %s are not trained",
            config.model,
            list(heads),
            [head for head in data.heads if head not in heads],
        )
    try:
        class_weights = resolve_class_weights(config.class_weights, data)
    except ValueError as error:
        raise ConfigError(flag("class_weights"), str(error)) from None
    if class_weights is not None:
        logger.info(
            "class weights (%s) of the semantic head: %s", config.class_weights, [round(w, 4) for w in class_weights]
        )
    if config.strict:
        check_all_samples(data.train + data.val, network.modalities, {head: len(n) for head, n in heads.items()})
    init = load_init(config.init) if config.init else None
    return {
        "config": asdict(config),
        "run_name": config.run_name or default_run_name(config.model),
        "heads": {head: list(names) for head, names in heads.items()},
        "layout": data.layout,
        "class_weights": class_weights,
        "train": list(data.train),
        "val": list(data.val),
        "convention": config.input_convention or (init["input_convention"] if init else "torchvision"),
        "init": init,
    }


def fit_to_data(
    network: nn.Module, data: SegmentationData, *, network_param: str, data_param: str
) -> dict[str, tuple[str, ...]]:
    """The class names of each of ``network``'s heads, from ``data``.

    Raises ConfigError (naming ``network_param`` and ``data_param``) when the data lacks an input
    modality or a head of the network. A data head the network lacks is left out (a one-head network
    on SIFT Flow data trains its semantic head only).
    """
    name = network.arch["name"]
    where = f"{data_param} {data.root} ({data.layout} layout)"
    missing = [m for m in network.modalities if m not in data.modalities]
    if missing:
        raise ConfigError(
            network_param,
            f"{name} reads {list(network.modalities)}, but {where} has no {missing}: "
            f"choose a model that reads only {list(data.modalities)}",
        )
    lacking = [head for head in network.head_classes if head not in data.heads]
    if lacking:
        raise ConfigError(
            network_param,
            f"{name} has the heads {list(network.head_classes)}, but {where} has no "
            f"{lacking} labels: choose a model with only {list(data.heads)}",
        )
    return {head: data.heads[head] for head in network.head_classes}


def check_all_samples(samples: Sequence[Sample], modalities: Sequence[str], head_classes: dict[str, int]) -> None:
    """``--strict``: read every sample's ``modalities`` and labels up front; ConfigError listing the bad ones."""

    def check(sample: Sample) -> str | None:
        try:
            read_example(sample, modalities, head_classes)
        except BadSample as bad:
            return str(bad)
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for p in pool.map(check, samples) if p]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise ConfigError(flag("strict"), f"{len(problems)} bad samples: {shown}")


def load_init(uri: str) -> dict[str, Any]:
    """State dict (on the CPU) and input convention of the checkpoint (or registry champion) to start from."""
    try:
        ckpt = fcn.load_checkpoint(uri)
    except fcn.CheckpointError as error:
        raise ConfigError(flag("init"), str(error)) from None
    return {
        "uri": ckpt.uri,
        "state_dict": {k: v.cpu() for k, v in ckpt.model.state_dict().items()},
        "input_convention": ckpt.input_convention,
    }


def copy_matching_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy every tensor whose name and shape match (e.g. FCN-32s -> FCN-16s); return (copied, left)."""
    own = model.state_dict()
    copied = [k for k, v in state_dict.items() if k in own and own[k].shape == v.shape]
    model.load_state_dict({k: state_dict[k] for k in copied}, strict=False)
    return copied, [k for k in own if k not in copied]
