"""End to end through Prefect: a real server on 127.0.0.1, `python -m flows.serve`, runs triggered with
`prefect deployment run <flow>/<deployment>` through the CLI, the real Ray cluster and S3 endpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import fsspec
import pyarrow.parquet as pq
import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the environment running the tests (prefect CLI beside python)
CLASSES = ("background", "disc", "box", "triangle", "ring", "wire")
STARTUP_TIMEOUT = 240
RUN_TIMEOUT = 300


def _wait_until(
    check: Any, what: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None
) -> Any:
    """Poll ``check()`` until it returns something truthy; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: process exited with {process.returncode}\n{_tail(log)}")
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{_tail(log)}")


def _tail(log: Path | None, lines: int = 60) -> str:
    return "" if log is None or not log.exists() else "\n".join(log.read_text().splitlines()[-lines:])


def _stop(process: subprocess.Popen) -> None:
    """End a process group this module started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _prefect_settings(home: Path) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_CLI_COLORS": "false",
        "PREFECT_CLI_WRAP_LINES": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # the served process picks up a new run within a second
    }


def _without_prefect_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """A real Prefect server (sqlite, temporary PREFECT_HOME) on 127.0.0.1; yields the environment that
    points the CLI and the served flows at it, with the S3 endpoint's variables and Ray's."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    log = home / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=_without_prefect_settings() | _prefect_settings(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        request.getfixturevalue("ray_cluster")  # S3 endpoint and Ray start while the server migrates its db
        api = f"http://127.0.0.1:{port}/api"
        _wait_until(lambda: _healthy(f"{api}/health"), "the Prefect server", STARTUP_TIMEOUT, server, log)
        yield _without_prefect_settings() | _prefect_settings(home) | {"PREFECT_API_URL": api}
    finally:
        _stop(server)


@pytest.fixture(scope="module")
def served(prefect_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`python -m flows.serve` running against the server until both deployments are registered."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.serve"],
            cwd=ROOT,
            env=prefect_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        for name in ("segment-bucket/segment-bucket", "nightly-retrain/nightly-retrain"):
            _wait_until(lambda: _deployment(prefect_env, name), f"deployment {name}", STARTUP_TIMEOUT, process, log)
        yield prefect_env | {"_SERVE_LOG": str(log)}
    finally:
        _stop(process)


def _client(env: dict[str, str]) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Session:
        def __enter__(self) -> Any:
            self._settings = temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc: Any) -> None:
            self._client.__exit__(*exc)
            self._settings.__exit__(*exc)

    return _Session()


def _deployment(env: dict[str, str], name: str) -> Any:
    from prefect.exceptions import ObjectNotFound

    with _client(env) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _run_deployment(env: dict[str, str], name: str, params: dict[str, Any]) -> UUID:
    """`prefect deployment run NAME --param k=v ...`; returns the flow run id it prints."""
    argv = ["deployment", "run", name]
    for key, value in params.items():
        argv += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    result = _cli(env, *argv)
    assert result.returncode == 0, result.stdout + result.stderr
    return UUID(re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1))


def _wait_for_run(env: dict[str, str], flow_run_id: UUID) -> Any:
    """Poll the flow run until it is in a final state; return it."""

    def final() -> Any:
        with _client(env) as client:
            run = client.read_flow_run(flow_run_id)
        return run if run.state is not None and run.state.is_final() else None

    run = _wait_until(final, f"flow run {flow_run_id}", RUN_TIMEOUT, log=Path(env["_SERVE_LOG"]))
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{_tail(Path(env['_SERVE_LOG']))}"
    return run


def _artifact(env: dict[str, str], flow_run_id: UUID, key: str) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with _client(env) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    assert found, f"no artifact {key!r} for flow run {flow_run_id}"
    return found[0].data


def _ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def _registry_with_champion(root: Path) -> str:
    """A registry whose champion is an untrained small FCN-8s for the synthetic classes."""
    import fcn
    from fcn import registry

    model = fcn.get_model("fcn8s_vgg16", num_classes=len(CLASSES), width=1 / 16)
    checkpoint = fcn.save_checkpoint(model, (root / "model.pt").as_uri(), class_names=list(CLASSES))
    uri = (root / "registry").as_uri()
    registry.promote(uri, registry.register_model(uri, checkpoint, {"mean_iu": 0.1}))
    return uri


def test_segment_bucket_deployment_runs_from_the_cli(
    served: dict[str, str], ray_cluster: None, private_s3_options: dict, tmp_path: Path
) -> None:
    """The bucket lives on an S3 endpoint that only the ``storage_options`` parameter reaches (the
    served flow's environment points at another one): listing, segmentation, verification and the
    report all go through it."""
    from pipelines.synthetic import write_synthetic_voc

    fs = fsspec.filesystem("s3", **private_s3_options)
    fs.mkdir("deployed")
    write_synthetic_voc(str(tmp_path / "scenes"), num_images=5, seed=3, min_size=48, max_size=64)
    fs.put(str(tmp_path / "scenes" / "JPEGImages"), "deployed/scenes/", recursive=True)
    images, output = "s3://deployed/scenes/JPEGImages/", "s3://deployed/segmented"
    params = {
        "input": images,
        "output": output,
        "model": _registry_with_champion(tmp_path),
        "ray_address": _ray_address(),
        "actors": 1,
        "device": "cpu",
        "gallery_size": 3,
        "storage_options": private_s3_options,
    }

    run_id = _run_deployment(served, "segment-bucket/segment-bucket", params)
    run = _wait_for_run(served, run_id)

    assert run.parameters["input"] == images and run.parameters["storage_options"] == private_s3_options
    fs.invalidate_cache()
    assert fs.isfile("deployed/segmented/_SUCCESS")
    stats = pq.read_table("deployed/segmented/stats", filesystem=fs)
    assert stats.num_rows == 5 and set(stats["status"].to_pylist()) == {"ok"}
    assert len(fs.find("deployed/segmented/masks")) == 5
    page = fs.cat_file("deployed/segmented/report.html").decode()
    assert page.count('<img src="data:image/png;base64,') == 3 and "<svg" in page
    summary = _artifact(served, run_id, "segment-bucket")
    assert "| ok | 5 |" in summary and "| error | 0 |" in summary
    assert f"{output}/report.html" in summary
    assert not fsspec.filesystem("s3", skip_instance_cache=True).exists("deployed")  # not via the environment
    # Credentials from the environment and from storage_options (which Prefect keeps as a parameter, as
    # the README warns) reach neither the run's logs, its artifacts, the report nor the serving log.
    from conftest import SECRETS
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    with _client(served) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    assert logs and artifacts
    texts = {
        "logs": "\n".join(log.message for log in logs),
        "artifacts": "\n".join(str(a.data) for a in artifacts),
        "report.html": page,
        "serve.log": Path(served["_SERVE_LOG"]).read_text(),
    }
    for secret in SECRETS:
        assert not [name for name, text in texts.items() if secret in text], secret


def test_bad_parameter_is_rejected_by_the_deployment_schema(served: dict[str, str]) -> None:
    result = _cli(served, "deployment", "run", "segment-bucket/segment-bucket", "--param", "actors=0")
    assert result.returncode != 0
    assert "Validation failed for field 'actors'" in result.stdout + result.stderr


def test_nightly_retrain_deployment_promotes_a_champion_and_resegments(
    served: dict[str, str], ray_cluster: None, tmp_path: Path
) -> None:
    from fcn import registry
    from pipelines.synthetic import write_synthetic_voc

    data = tmp_path / "labelled"
    write_synthetic_voc(data.as_uri(), num_images=6, seed=0, min_size=48, max_size=64)
    registry_uri = (tmp_path / "registry").as_uri()
    output = tmp_path / "resegmented"
    params = {
        "data": data.as_uri(),
        "registry": registry_uri,
        "width": 0.0625,
        "epochs": 1,
        "workers": 1,
        "ray_address": _ray_address(),
        "resegment_input": (data / "JPEGImages").as_uri(),
        "resegment_output": output.as_uri(),
        "actors": 1,
        "device": "cpu",
    }
    assert registry.get_champion(registry_uri) is None

    # Two runs requested back to back: the deployment's concurrency limit (prefect.yaml) queues the
    # second until the first has finished, so the registry never has two writers.
    run_id = _run_deployment(served, "nightly-retrain/nightly-retrain", params)
    second_id = _run_deployment(
        served, "nightly-retrain/nightly-retrain", params | {"resegment_input": None, "resegment_output": None}
    )
    first, second = _wait_for_run(served, run_id), _wait_for_run(served, second_id)
    assert first.end_time <= second.start_time, (first.start_time, first.end_time, second.start_time)
    assert registry.list_versions(registry_uri) == ["v0001", "v0002"]

    # The second run must promote v0002 exactly when its mean IU beats v0001's, re-scored on the same
    # validation split, by more than the margin (0): its decision names both numbers.
    second_summary = _artifact(served, second_id, "nightly-retrain")
    decision = re.search(r"candidate mean IU ([0-9.]+) (>|<=) champion v0001 ([0-9.]+) \+ margin 0\.0", second_summary)
    assert decision, second_summary
    candidate_iu, champion_iu = float(decision.group(1)), float(decision.group(3))
    assert candidate_iu == pytest.approx(registry.read_version(registry_uri, "v0002")["metrics"]["mean_iu"], abs=1e-4)
    assert champion_iu == pytest.approx(registry.read_version(registry_uri, "v0001")["metrics"]["mean_iu"], abs=1e-4)
    assert (decision.group(2) == ">") == (candidate_iu > champion_iu)
    expected = "v0002" if decision.group(2) == ">" else "v0001"
    champion = registry.get_champion(registry_uri)
    assert champion is not None and champion["version"] == expected
    assert ("promoted v0002" in second_summary) == (expected == "v0002")
    assert fsspec.open(champion["checkpoint"]).fs.exists(champion["checkpoint"])
    assert (output / "_SUCCESS").is_file()
    assert pq.read_table(output / "stats").num_rows == 6
    summary = _artifact(served, run_id, "nightly-retrain")
    assert "promoted v0001" in summary and "no champion yet" in summary
