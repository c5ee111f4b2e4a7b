"""Distributed FCN training on Ray Train (V2): N data-parallel workers, whole-image batches, a
checkpoint and validation every epoch, then registration in the model registry.

    python -m pipelines.train --data s3://bucket/voc --registry s3://bucket/registry \\
        --model fcn8s_vgg16 --workers 2 --epochs 20

Every epoch writes ``<registry>/runs/<run>/epoch-NNNN/{checkpoint.pt,metrics.json,train_state.pt}``
(``checkpoint.pt`` is the model library's format; ``train_state.pt`` holds optimizer and schedule).
A worker failure restarts the workers from the latest checkpoint (``--max-failures``), and starting
the command again with the same ``--run-name`` continues that run. The network's heads are sized from
the data (NYUDv2: 40 classes; SIFT Flow: 33 semantic + 3 geometric), the loss is the sum of the heads'
losses, and the paper's four metrics are reported per head. At the end the best epoch (by the first
head's validation mean IU) is registered as a new model version and promoted to champion if it beats
the current champion by more than ``--promote-margin``.

- ``config``: ``TrainConfig``, the single source of the job's defaults, validation, CLI flags and the
  ``nightly-retrain`` flow's parameters;
- ``recipes``: the paper's and a modern optimisation recipe;
- ``data``: samples as network inputs and label maps per head, augmentation and batching (on workers);
- ``datasets``: the dataset layouts (one module each), their registry and the sample readers;
- ``prepare``: what the driver prepares for the workers (heads sized from the data, ``--init``, ``--strict``);
- ``worker``: the training and evaluation worker with torch alone (model, optimizer, epochs, checkpoints);
- ``epoch``: one training and one validation pass, the reductions across workers, the scores;
- ``context``: the run folder's layout and the worker's context, ``LocalWorkerContext`` to run without Ray;
- ``loop``: the Ray Train adapter of the worker;
- ``driver``: ``run_training`` (checks, Ray Train, registration, promotion) and ``run_evaluation``;
- ``cli``: ``python -m pipelines.train`` / ``fcn-train``.

The names below are imported on first use, so that ``pipelines.train.worker`` (and ``config``, ``data``,
``recipes`` and the rest but ``loop``, ``driver`` and ``cli``) import without Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES = {
    "ConfigError": "pipelines.common.options",
    "main": "pipelines.train.cli",
    "TrainConfig": "pipelines.train.config",
    **dict.fromkeys(
        ["TrainSummary", "best_epoch", "read_run_history", "run_evaluation", "run_training"], "pipelines.train.driver"
    ),
    "SCORES": "pipelines.train.epoch",
    "copy_matching_weights": "pipelines.train.prepare",
    **dict.fromkeys(["TrainingDiverged", "default_run_name", "run_folder"], "pipelines.train.context"),
    **dict.fromkeys(["RECIPES", "Recipe"], "pipelines.train.recipes"),
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_SOURCES[name]), name)
