"""infra/ and prefect.yaml: every YAML/JSON file parses, and every entrypoint they name exists."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.common.processes import alive, descendants

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
CONFIG_FILES = sorted([p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml", ".json"}] + [ROOT / "prefect.yaml"])


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
    assert {
        "prefect.yaml",
        "infra/ray/cluster.yaml",
        "infra/ray/runtime_env.yaml",
        "infra/k8s/raycluster.yaml",
        "infra/k8s/rayjob-segment.yaml",
        "infra/k8s/rayjob-train.yaml",
    } <= names
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
        for service in (
            r"moto_server\S* -H 127\.0\.0\.1",
            r"--node-ip-address=127\.0\.0\.1",
            r"--dashboard-host=127\.0\.0\.1",
            r"prefect\S* server start --host 127\.0\.0\.1",
            r"-m flows\.serve",
        ):
            assert re.search(service, text), service


def _dry_run(*args: str, **env: str) -> dict[str, list[str]]:
    """``start.sh --dry-run *args``: the services it would start, name -> command (argv)."""
    run = subprocess.run(
        ["bash", str(INFRA / "local/start.sh"), "--dry-run", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    assert int(lines.pop("ray nodes")) == sum(name.startswith("ray") for name in lines if name != "stack dir")
    lines.pop("stack dir")
    return {name: shlex.split(command) for name, command in lines.items()}


def test_local_stack_dry_run_starts_a_head_and_n_worker_nodes_on_loopback(tmp_path: Path) -> None:
    stack = tmp_path / "stack"
    ports = {"RAY_PORT": "6390", "RAY_AGENT_PORT": "52400", "STACK_DIR": str(stack)}
    services = _dry_run("--workers", "2", "--worker-cpus", "3", "--worker-memory-mb", "256", **ports)

    assert set(services) == {"s3", "ray", "ray-worker-1", "ray-worker-2", "prefect", "serve"}
    assert not stack.exists()  # a dry run starts and writes nothing
    head = services["ray"]
    assert head[1:3] == ["start", "--head"] and "--num-cpus=0" in head  # the work goes to the worker nodes
    assert "--port=6390" in head and "--dashboard-agent-listen-port=52400" in head
    for i in (1, 2):
        worker = services[f"ray-worker-{i}"]
        assert worker[1:3] == [str(INFRA / "local/join_node.py"), "start"]  # `ray start` that keeps 127.0.0.1
        options = dict(arg.split("=", 1) for arg in worker[3:] if "=" in arg)
        assert options["--address"] == "127.0.0.1:6390" and options["--node-ip-address"] == "127.0.0.1"
        assert options["--num-cpus"] == "3" and json.loads(options["--resources"]) == {f"worker-{i}": 1}
        assert options["--object-store-memory"] == str(256 * 2**20)
        assert options["--dashboard-agent-listen-port"] == str(52400 + i)  # several agents on 127.0.0.1
        assert (options["--min-worker-port"], options["--max-worker-port"]) == ("0", "0")
        assert "--block" in worker and "--head" not in worker
    assert not any("0.0.0.0" in arg for command in services.values() for arg in command)

    # Without --workers: the single-node stack as before (the head's CPUs detected by Ray).
    single = _dry_run(**ports)
    assert set(single) == {"s3", "ray", "prefect", "serve"}
    assert not any(arg.startswith("--num-cpus") for arg in single["ray"])
    assert "--num-cpus=1" in _dry_run("--workers", "1", "--head-cpus", "1", **ports)["ray"]


@pytest.mark.parametrize(
    "args", [["--workers", "-1"], ["--workers"], ["--worker-cpus", "0"], ["--head-cpus", "x"], ["--bogus"]]
)
def test_local_stack_refuses_bad_arguments(args: list[str], tmp_path: Path) -> None:
    run = subprocess.run(
        ["bash", str(INFRA / "local/start.sh"), *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "STACK_DIR": str(tmp_path / "stack")},
        timeout=30,
    )
    assert run.returncode == 2 and run.stderr and not (tmp_path / "stack").exists()


def test_local_stack_stop_kills_a_worker_node_then_stops_the_rest(tmp_path: Path) -> None:
    """stop.sh by the recorded pids only: --kill-worker SIGKILLs one worker node's process group and every
    process under it (Ray gives its workers process groups of their own); a plain stop ends every
    recorded group, worker nodes included."""
    stop = ["bash", str(INFRA / "local/stop.sh")]
    env = {"PATH": "/usr/bin:/bin", "STACK_DIR": str(tmp_path)}
    nodes = {}
    for service in ("ray", "ray-worker-1", "ray-worker-2"):
        # A process group leader (as `ray start --block`) with a child in its group (a raylet) and one in a
        # group of its own (a Ray worker), detached from this process as start.sh leaves its services, so
        # that ended ones are reaped instead of lingering as zombies of the test.
        leader = subprocess.run(
            ["bash", "-c", 'setsid bash -c "sleep 300 & setsid sleep 300 & wait" >/dev/null 2>&1 & echo $!'],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        (tmp_path / f"{service}.pid").write_text(leader)
        deadline = time.monotonic() + 10
        while len(under := descendants(int(leader))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        nodes[service] = [int(leader), *under]
        assert len(nodes[service]) == 3, nodes

    killed = subprocess.run([*stop, "--kill-worker", "2"], capture_output=True, text=True, env=env, timeout=30)
    assert killed.returncode == 0, killed.stderr
    assert _wait_gone(nodes["ray-worker-2"]) and all(alive(p) for p in nodes["ray"] + nodes["ray-worker-1"])
    assert subprocess.run([*stop, "--kill-worker", "7"], capture_output=True, env=env).returncode == 2

    stopped = subprocess.run(stop, capture_output=True, text=True, env=env, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped ray-worker-1" in stopped.stdout and "stopped ray " in stopped.stdout
    assert _wait_gone([nodes["ray"][0], nodes["ray-worker-1"][0]]) and not list(tmp_path.glob("*.pid"))
    for service in ("ray", "ray-worker-1"):  # the Ray worker stand-ins: a real raylet ends its own workers
        subprocess.run(["kill", "-KILL", *map(str, nodes[service][1:])], capture_output=True)


def _wait_gone(pids: list[int], timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


def test_join_node_lets_a_node_join_and_keeps_the_loopback_head_address() -> None:
    """What infra/local/join_node.py changes in Ray for a worker node's `ray start`, under the stack's
    single-machine mode: nodes may join, and 127.0.0.1 is not rewritten to the machine's IP."""
    code = (
        "import runpy; runpy.run_path('infra/local/join_node.py', run_name='join_node'); "
        "from ray._private import ray_constants, services; "
        "print(ray_constants.ENABLE_RAY_CLUSTER, "
        "services.canonicalize_bootstrap_address('127.0.0.1:6390'))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "127.0.0.1:6390"]
