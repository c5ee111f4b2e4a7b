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

from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from fcn import registry as model_registry
from flows.common import failure_artifact, io_task
from flows.params import NightlyRetrainParams, takes
from flows.segment_bucket import segment_bucket
from pipelines.train import SCORES, TrainSummary, run_evaluation, run_training

ARTIFACT_KEY = "nightly-retrain"
SCORE = model_registry.SCORE_METRIC


@dataclass(frozen=True)
class Decision:
    """Whether the candidate becomes champion, and why."""

    promote: bool
    reason: str
    champion_metrics: dict[str, Any] | None


@io_task("read-champion")
def read_champion(registry_uri: str) -> dict[str, Any] | None:
    """The registry's current ``champion.json``, or None."""
    champion = model_registry.get_champion(registry_uri)
    get_run_logger().info("champion before training: %s", champion and champion["version"])
    return champion


@task(name="train", cache_policy=NO_CACHE)
def train(params: NightlyRetrainParams, warm_start_from: str | None) -> TrainSummary:
    """Train on Ray Train; the best epoch is registered as a new model version (promotion is left to
    the ``promote`` task)."""
    summary = run_training(params.train_config(init=warm_start_from))
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
    rescored = None
    if champion is not None and candidate.version is not None:  # a candidate without a score is not registered
        rescored = run_evaluation(
            params.data,
            champion["checkpoint"],
            workers=params.workers,
            gpus_per_worker=params.gpus_per_worker,
            ray_address=params.ray_address,
        )
    decision = model_registry.decide_promotion(
        score,
        None if rescored is None else rescored[SCORE],
        params.promote_margin,
        champion_name=f"champion {champion and champion['version']}",
    )
    get_run_logger().info(decision.reason)
    return Decision(decision.promote, decision.reason, rescored)


@io_task("promote")
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
@takes(NightlyRetrainParams)
def nightly_retrain(**parameters: Any) -> dict[str, Any]:
    """Train on ``data``, promote the result in ``registry`` only if better, and re-segment
    ``resegment_input`` into ``resegment_output`` with the new champion."""
    try:
        params = NightlyRetrainParams(**parameters)
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
        failure_artifact(ARTIFACT_KEY, parameters, error)
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
