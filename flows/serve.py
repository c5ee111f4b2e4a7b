"""Serve the deployments declared in prefect.yaml from one long-lived process, without a work pool.

    prefect server start --host 127.0.0.1          # or any Prefect API
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve                          # serves segment-bucket and nightly-retrain
    prefect deployment run segment-bucket/segment-bucket --param input=... --param output=...

Names, parameters and schedules come from prefect.yaml, the one place they are declared; each flow
run executes in a subprocess of this process with its environment (RAY_ADDRESS, AWS_*...).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from prefect import Flow, serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"


def load_flow(entrypoint: str) -> Flow[..., Any]:
    """Import the flow named by a prefect.yaml entrypoint such as ``flows/segment_bucket.py:segment_bucket``."""
    path, _, name = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow_obj = getattr(module, name, None)
    if not isinstance(flow_obj, Flow):
        raise ValueError(f"entrypoint {entrypoint!r} does not name a Prefect flow")
    return flow_obj


def load_deployments(prefect_yaml: Path = PREFECT_YAML) -> list[RunnerDeployment]:
    """Runner deployments for every entry of ``prefect.yaml`` (work pools are dropped: served runs
    execute in this process's subprocesses)."""
    spec = yaml.safe_load(prefect_yaml.read_text())
    deployments = []
    for entry in spec["deployments"]:
        schedules = [Cron(s["cron"], timezone=s.get("timezone")) for s in entry.get("schedules") or []]
        limit = entry.get(
            "concurrency_limit"
        )  # an int, or {limit, collision_strategy, ...} as `prefect deploy` reads it
        deployments.append(
            load_flow(entry["entrypoint"]).to_deployment(
                name=entry["name"],
                description=entry.get("description"),
                tags=entry.get("tags"),
                parameters=entry.get("parameters") or {},
                schedules=schedules,
                concurrency_limit=ConcurrencyLimitConfig(**limit) if isinstance(limit, dict) else limit,
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefect-yaml", type=Path, default=PREFECT_YAML, help="deployments file")
    parser.add_argument("--limit", type=int, default=None, help="maximum concurrent flow runs")
    args = parser.parse_args(argv)
    if not PREFECT_API_URL.value():
        print(
            "PREFECT_API_URL is not set: serving needs a running Prefect server, e.g.\n"
            "  prefect server start --host 127.0.0.1 &\n"
            "  export PREFECT_API_URL=http://127.0.0.1:4200/api",
            file=sys.stderr,
        )
        return 2
    serve(*load_deployments(args.prefect_yaml), limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
