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
- ``loop``: the Ray Train worker loop, validation and evaluation per head;
- ``driver``: ``run_training`` (checks, Ray Train, registration, promotion) and ``run_evaluation``;
- ``cli``: ``python -m pipelines.train`` / ``fcn-train``.
"""

from pipelines.options import ConfigError
from pipelines.train.cli import main
from pipelines.train.config import TrainConfig
from pipelines.train.driver import (
    TrainingDiverged,
    TrainSummary,
    best_epoch,
    default_run_name,
    read_run_history,
    run_evaluation,
    run_training,
)
from pipelines.train.loop import SCORES, copy_matching_weights, run_folder
from pipelines.train.recipes import PAPER_LR, RECIPES, Recipe

__all__ = [
    "PAPER_LR", "RECIPES", "SCORES", "ConfigError", "Recipe", "TrainConfig", "TrainSummary", "TrainingDiverged",
    "best_epoch", "copy_matching_weights", "default_run_name", "main", "read_run_history", "run_evaluation",
    "run_folder", "run_training",
]  # fmt: skip
