"""The primary-head rule in one place: ``fcn.heads`` names a head's outputs, and the segmentation job's stats
columns and mask folders, and training's builder arguments and metrics.json, of a two-head model are what it
says."""

from __future__ import annotations

import numpy as np
import pytest

from fcn.classes import voc_palette
from fcn.heads import classes_argument, head_key, nest_heads, split_heads
from pipelines.segment import schema
from pipelines.segment.write import mask_folder
from pipelines.train.config import TrainConfig
from pipelines.train.epoch import SCORES, scores_by_head

HEADS = ["semantic", "geometric"]
"""SIFT Flow's heads, the primary one first."""


def test_the_primary_head_keeps_the_bare_name_and_a_further_head_carries_its_own() -> None:
    assert split_heads(HEADS) == ("semantic", ["geometric"])
    assert head_key("semantic", HEADS, "mask_uri") == "mask_uri"
    assert head_key("geometric", HEADS, "mask_uri") == "geometric_mask_uri"
    assert head_key("geometric", HEADS, "masks", suffix=True) == "masks_geometric"
    assert head_key("semantic", ["semantic"], "pixel_counts") == "pixel_counts"  # a single-head net
    assert head_key("geometric", ["geometric", "semantic"], "labels") == "labels"  # the first is primary, by order
    assert [classes_argument(head, HEADS) for head in HEADS] == ["num_classes", "geometric_classes"]
    assert nest_heads({"semantic": {"mean_iu": 0.5}, "geometric": {"mean_iu": 0.9}}) == {
        "mean_iu": 0.5,
        "heads": {"geometric": {"mean_iu": 0.9}},
    }
    with pytest.raises(ValueError, match="unknown head 'depth'; the heads are \\['semantic', 'geometric'\\]"):
        head_key("depth", HEADS, "labels")


def test_a_two_head_models_stats_columns_and_mask_folders_follow_the_rule() -> None:
    heads = {head: {"class_names": ["a", "b", "c"], "palette": voc_palette()} for head in HEADS}
    names = schema.stats_schema(["a", "b", "c"], voc_palette(), {}, heads).names
    per_head = [c.name for c in schema.STORED if c.per_head]
    stored = [c.name for c in schema.STORED]
    assert names[: len(stored)] == stored  # the primary head's columns are the plain ones
    further = names[len(stored) :]
    assert sorted(further) == sorted(head_key("geometric", HEADS, name) for name in per_head)
    assert further[0] == "geometric_mask_uri" and "geometric_pixel_counts" in further
    assert [mask_folder(head, HEADS) for head in HEADS] == ["masks", "masks_geometric"]


def test_a_two_head_models_builder_arguments_and_metrics_follow_the_rule() -> None:
    config = TrainConfig(data="d", registry="r", model="fcn8s_siftflow_vgg16")
    kwargs = config.model_kwargs({"semantic": 33, "geometric": 3})
    assert {k: kwargs[k] for k in ("num_classes", "geometric_classes")} == {"num_classes": 33, "geometric_classes": 3}
    hists = {"semantic": np.diag([4, 2, 1]), "geometric": np.array([[3, 1], [0, 4]])}
    metrics = scores_by_head(hists, {"semantic": ["a", "b", "c"], "geometric": ["sky", "ground"]})
    assert metrics["class_names"] == ["a", "b", "c"] and metrics["mean_iu"] == 1.0  # the primary head's, on top
    assert list(metrics["heads"]) == ["geometric"]
    assert metrics["heads"]["geometric"]["class_names"] == ["sky", "ground"]
    assert set(SCORES) <= set(metrics["heads"]["geometric"]) and metrics["heads"]["geometric"]["mean_iu"] < 1.0
