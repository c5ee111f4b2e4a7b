"""Prefect flow ``nightly-retrain``: train on the labelled data, evaluate, promote only if better,
then optionally re-segment a bucket with the new champion. Deployed with cron ``0 2 * * *`` (UTC).

Tasks: read the current champion, train with Ray Train (``pipelines.train.run_training``, which
registers the best epoch as a new model version), evaluate (the champion is re-scored on the same
validation split as the candidate, so both are compared on today's data), promote the candidate only
if its mean IU (of the first, semantic head) beats the champion's by more than ``promote_margin``, and
re-segment with the ``segment-bucket`` flow (as a subflow) when a new champion was promoted. The
training parameters' defaults and descriptions are ``pipelines.train.TrainConfig``'s; the summary shows
every head's four metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fcn import registry as model_registry
from flows.segment_bucket import (
    RETRY_DELAYS,
    TRANSIENT_RETRIES,
    Actors,
    Device,
    Uri,
    failure_artifact,
    is_transient,
    segment_bucket,
)
from pipelines.train import SCORES, TrainConfig, TrainSummary, run_evaluation, run_training

ARTIFACT_KEY = "nightly-retrain"
SCORE = model_registry.SCORE_METRIC

# The training parameters: defaults and descriptions come from TrainConfig, the single source of both.
DEFAULT = TrainConfig.default


def _described(name: str, **constraints: Any) -> Any:
    return Field(description=TrainConfig.metadata(name)["help"], **constraints)


ModelName = Annotated[Literal[TrainConfig.metadata("model")["choices"]], _described("model")]
Width = Annotated[float, _described("width", gt=0)]
Epochs = Annotated[int, _described("epochs", ge=1)]
Workers = Annotated[int, _described("workers", ge=1)]
GpusPerWorker = Annotated[float, _described("gpus_per_worker", ge=0)]
Recipe = Annotated[Literal[TrainConfig.metadata("recipe")["choices"]], _described("recipe")]
Margin = Annotated[float, _described("promote_margin", ge=0)]
ClassWeights = Annotated[str, _described("class_weights", min_length=1)]
RayAddress = Annotated[str | None, _described("ray_address")]


class NightlyRetrainParams(BaseModel):
    """The validated parameters of ``nightly-retrain`` (defaults live in the flow's signature)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Uri
    registry: Uri
    model: ModelName
    width: Width
    epochs: Epochs
    workers: Workers
    gpus_per_worker: GpusPerWorker
    recipe: Recipe
    class_weights: ClassWeights
    warm_start: bool
    promote_margin: Margin
    resegment_input: str | None
    resegment_output: str | None
    ray_address: RayAddress
    actors: Actors
    device: Device

    @model_validator(mode="after")
    def _resegment_pair(self) -> NightlyRetrainParams:
        if bool(self.resegment_input) != bool(self.resegment_output):
            raise ValueError("resegment_input and resegment_output must be given together")
        return self


@dataclass(frozen=True)
class Decision:
    """Whether the candidate becomes champion, and why."""

    promote: bool
    reason: str
    champion_metrics: dict[str, Any] | None


@task(
    name="read-champion",
    retries=TRANSIENT_RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=is_transient,
    cache_policy=NO_CACHE,
)
def read_champion(registry_uri: str) -> dict[str, Any] | None:
    """The registry's current ``champion.json``, or None."""
    champion = model_registry.get_champion(registry_uri)
    get_run_logger().info("champion before training: %s", champion and champion["version"])
    return champion


@task(name="train", cache_policy=NO_CACHE)
def train(params: NightlyRetrainParams, warm_start_from: str | None) -> TrainSummary:
    """Train on Ray Train; the best epoch is registered as a new model version (promotion is left to
    the ``promote`` task)."""
    config = TrainConfig(
        data=params.data,
        registry=params.registry,
        model=params.model,
        init=warm_start_from,
        workers=params.workers,
        gpus_per_worker=params.gpus_per_worker,
        epochs=params.epochs,
        recipe=params.recipe,
        class_weights=params.class_weights,
        width=params.width,
        promote=False,
        ray_address=params.ray_address,
    )
    summary = run_training(config)
    get_run_logger().info(
        "run %s: best epoch %s, mean IU %.4f, registered as %s",
        summary.run_name,
        summary.metrics.get("epoch"),
        summary.metrics[SCORE],
        summary.version,
    )
    return summary


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(params: NightlyRetrainParams, candidate: TrainSummary, champion: dict[str, Any] | None) -> Decision:
    """Compare the candidate with the champion re-scored on the same validation split."""
    score = candidate.metrics[SCORE]
    if candidate.version is None or not math.isfinite(score):
        return Decision(False, "the candidate's validation mean IU is undefined; not registered", None)
    if champion is None:
        return Decision(True, "no champion yet", None)
    rescored = run_evaluation(
        params.data,
        champion["checkpoint"],
        workers=params.workers,
        gpus_per_worker=params.gpus_per_worker,
        ray_address=params.ray_address,
    )
    best = rescored[SCORE] + params.promote_margin
    better = score > best
    reason = (
        f"candidate mean IU {score:.4f} {'>' if better else '<='} champion {champion['version']} "
        f"{rescored[SCORE]:.4f} + margin {params.promote_margin}"
    )
    get_run_logger().info(reason)
    return Decision(better, reason, rescored)


@task(
    name="promote",
    retries=TRANSIENT_RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=is_transient,
    cache_policy=NO_CACHE,
)
def promote(params: NightlyRetrainParams, candidate: TrainSummary, decision: Decision) -> bool:
    """Make the candidate the champion if the decision says so; return whether it is champion now."""
    if not decision.promote:
        return False
    current = model_registry.get_champion(params.registry)
    if current is None or current["version"] != candidate.version:
        model_registry.promote(params.registry, candidate.version)
    get_run_logger().info("promoted %s to champion of %s", candidate.version, params.registry)
    return True


def summary_markdown(
    params: NightlyRetrainParams,
    candidate: TrainSummary,
    decision: Decision,
    promoted: bool,
    resegmented: dict[str, Any] | None,
) -> str:
    """The run's markdown artifact: candidate vs champion metrics, the decision, re-segmentation."""
    champion = decision.champion_metrics or {}

    def cell(metrics: dict[str, Any], name: str) -> str:
        return f"{metrics[name]:.4f}" if name in metrics else "-"

    rows = "".join(f"| {name} | {cell(candidate.metrics, name)} | {cell(champion, name)} |\n" for name in SCORES)
    for head, scores in candidate.metrics.get("heads", {}).items():  # further heads (SIFT Flow: geometric)
        rescored = champion.get("heads", {}).get(head, {})
        rows += "".join(f"| {head} {name} | {cell(scores, name)} | {cell(rescored, name)} |\n" for name in SCORES)
    lines = [
        f"# nightly-retrain: {'promoted ' + str(candidate.version) if promoted else 'champion kept'}",
        "",
        f"**Data:** `{params.data}`  ",
        f"**Registry:** `{params.registry}`  ",
        f"**Run:** `{candidate.run_name}` ({candidate.epochs} epochs, {params.model}, width {params.width})  ",
        f"**Candidate checkpoint:** `{candidate.checkpoint_uri}` (version {candidate.version})  ",
        f"**Decision:** {decision.reason}",
        "",
        "| metric (val) | candidate | champion (re-scored) |",
        "|---|---:|---:|",
        rows,
    ]
    if candidate.skipped:
        lines += [f"**Skipped samples:** {len(candidate.skipped)}", ""]
    if resegmented:
        lines += [
            f"**Re-segmented** `{params.resegment_input}`: {resegmented['ok']} ok, {resegmented['error']} error, "
            f"{resegmented['skipped']} skipped; report [{resegmented['report']}]({resegmented['report']})"
        ]
    return "\n".join(lines) + "\n"


@flow(name="nightly-retrain")
def nightly_retrain(
    data: Uri,
    registry: Uri,
    model: ModelName = DEFAULT("model"),
    width: Width = DEFAULT("width"),
    epochs: Epochs = DEFAULT("epochs"),
    workers: Workers = DEFAULT("workers"),
    gpus_per_worker: GpusPerWorker = DEFAULT("gpus_per_worker"),
    recipe: Recipe = DEFAULT("recipe"),
    class_weights: ClassWeights = DEFAULT("class_weights"),
    warm_start: bool = True,
    promote_margin: Margin = DEFAULT("promote_margin"),
    resegment_input: str | None = None,
    resegment_output: str | None = None,
    ray_address: RayAddress = DEFAULT("ray_address"),
    actors: Actors = None,
    device: Device = "auto",
) -> dict[str, Any]:
    """Train on ``data``, promote the result in ``registry`` only if better, and re-segment
    ``resegment_input`` into ``resegment_output`` with the new champion."""
    arguments = dict(locals())
    try:
        params = NightlyRetrainParams(**arguments)
        champion = read_champion(params.registry)
        candidate = train(params, params.registry if params.warm_start and champion else None)
        decision = evaluate(params, candidate, champion)
        promoted = promote(params, candidate, decision)
        resegmented = None
        if promoted and params.resegment_input:
            resegmented = segment_bucket(
                input=params.resegment_input,
                output=params.resegment_output,
                model=params.registry,
                ray_address=params.ray_address,
                actors=params.actors,
                device=params.device,
            )
        create_markdown_artifact(
            summary_markdown(params, candidate, decision, promoted, resegmented),
            key=ARTIFACT_KEY,
            description="nightly retraining",
        )
    except Exception as error:
        failure_artifact(ARTIFACT_KEY, arguments, error)
        raise
    return {
        "run_name": candidate.run_name,
        "version": candidate.version,
        "metrics": {k: candidate.metrics.get(k) for k in SCORES},
        "promoted": promoted,
        "reason": decision.reason,
        "champion": (model_registry.get_champion(params.registry) or {}).get("version"),
        "resegmented": resegmented,
    }
