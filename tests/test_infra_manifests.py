"""infra/ and prefect.yaml: every YAML/JSON file parses, and every entrypoint they name exists."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
CONFIG_FILES = sorted(
    [p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml", ".json"}] + [ROOT / "prefect.yaml"]
)


def _load(path: Path) -> list[Any]:
    text = path.read_text()
    return [json.loads(text)] if path.suffix == ".json" else [d for d in yaml.safe_load_all(text) if d is not None]


def _k8s(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted((INFRA / "k8s").glob("*.yaml")) for d in _load(p) if d.get("kind") == kind]


def _module_flags(entrypoint: str) -> tuple[str, list[str]]:
    """('pkg.mod', ['--flag', ...]) of a 'python -m pkg.mod --flag value ...' command line."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], f"entrypoint should be 'python -m <module> ...': {entrypoint!r}"
    return argv[2], [a for a in argv[3:] if a.startswith("--")]


def _assert_cli_accepts(module: str, flags: list[str]) -> None:
    """The module exists and its --help lists every flag."""
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for flag in flags:
        assert re.search(rf"{re.escape(flag)}\b", result.stdout), f"{module} --help does not list {flag}"


def test_config_files_exist_and_parse() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in CONFIG_FILES}
    assert {"prefect.yaml", "infra/ray/cluster.yaml", "infra/ray/runtime_env.yaml", "infra/k8s/raycluster.yaml",
            "infra/k8s/rayjob-segment.yaml", "infra/k8s/rayjob-train.yaml"} <= names  # fmt: skip
    for path in CONFIG_FILES:
        documents = _load(path)
        assert documents and all(isinstance(d, dict) for d in documents), path


def test_ray_cluster_launcher_config_validates_with_cpu_head_and_gpu_workers() -> None:
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((INFRA / "ray/cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert "GPU" not in types[config["head_node_type"]]["resources"]
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)


def test_runtime_env_is_accepted_by_ray() -> None:
    from ray.runtime_env import RuntimeEnv

    config = yaml.safe_load((INFRA / "ray/runtime_env.yaml").read_text())
    env = RuntimeEnv(**config)
    assert env["working_dir"] == "."
    assert ".venv" in env["excludes"]


def test_kuberay_cluster_has_gpu_workers_and_s3_secret() -> None:
    [(_, cluster)] = _k8s("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    [(_, secret)] = _k8s("Secret")
    secret_name = secret["metadata"]["name"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    pods = [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            assert secret_name in refs, f"{container['name']} does not get S3 credentials from {secret_name}"
    gpu_limits = [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for g in cluster["spec"]["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    ]
    assert any(limit and int(limit) >= 1 for limit in gpu_limits)
    assert cluster["spec"]["rayVersion"] == importlib.import_module("ray").__version__


def test_kuberay_jobs_target_the_cluster_and_name_real_entrypoints() -> None:
    [(_, cluster)] = _k8s("RayCluster")
    jobs = _k8s("RayJob")
    modules = set()
    for path, job in jobs:
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"], path
        module, flags = _module_flags(job["spec"]["entrypoint"])
        _assert_cli_accepts(module, flags)
        modules.add(module)
    assert modules == {"pipelines.segment", "pipelines.train"}


def test_prefect_yaml_deployments_name_flows_that_exist() -> None:
    from prefect import Flow

    from flows.serve import load_flow

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"segment-bucket", "nightly-retrain"}
    for name, deployment in deployments.items():
        path = deployment["entrypoint"].partition(":")[0]
        assert (ROOT / path).is_file(), path
        flow_obj = load_flow(deployment["entrypoint"])
        assert isinstance(flow_obj, Flow) and flow_obj.name == name
        flow_obj.validate_parameters(deployment["parameters"])  # defaults satisfy the flow's types
        assert deployment["work_pool"]["name"]
    assert deployments["nightly-retrain"]["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC"}]


def test_serve_builds_runner_deployments_from_prefect_yaml() -> None:
    from flows.serve import load_deployments

    deployments = {d.name: d for d in load_deployments()}
    assert set(deployments) == {"segment-bucket", "nightly-retrain"}
    [schedule] = deployments["nightly-retrain"].schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "UTC")
    assert deployments["segment-bucket"].schedules == []
    nightly = deployments["nightly-retrain"]  # one registry writer at a time: a second run is queued
    assert (nightly.concurrency_limit, nightly.concurrency_options.collision_strategy) == (1, "ENQUEUE")
    assert deployments["segment-bucket"].concurrency_limit is None
    assert deployments["segment-bucket"].parameters["output"].startswith("s3://")
    assert deployments["segment-bucket"].entrypoint == "flows.segment_bucket.segment_bucket"


def test_dockerfile_copies_existing_paths_and_checks_imports() -> None:
    text = (INFRA / "docker/Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\w.-]+-runtime-", text, flags=re.M)
    copies = re.findall(r"^COPY (.+)$", text, flags=re.M)
    assert copies
    for line in copies:
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    imported = re.search(r'python -c "import ([^"]+)"', text).group(1)
    for module in (m.strip() for m in imported.split(",")):
        assert importlib.util.find_spec(module) is not None, module


@pytest.mark.parametrize("script", ["start.sh", "stop.sh"])
def test_local_stack_scripts_are_valid_bash_bound_to_loopback(script: str) -> None:
    path = INFRA / "local" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    text = path.read_text()
    if script == "start.sh":
        assert "0.0.0.0" not in text
        for service in (r"moto_server\S* -H 127\.0\.0\.1", r"--node-ip-address=127\.0\.0\.1",
                        r"--dashboard-host=127\.0\.0\.1", r"prefect\S* server start --host 127\.0\.0\.1",
                        r"-m flows\.serve"):  # fmt: skip
            assert re.search(service, text), service
