"""`ray job submit` of the segmentation and training entry points to a separate local Ray head (token auth on)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import OPTION_SECRET, free_port
from segment_cases import good_images, tiny_checkpoint, upload

import fcn
from fcn import registry
from pipelines.synthetic import write_synthetic_voc

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180
AGENT_PORT_FLAGS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head on 127.0.0.1 in its own temp dir and process group (``ray start --block``), so
    teardown stops exactly these processes (``ray stop`` would stop every Ray on the machine).
    Yields the dashboard (job API) address and the environment the job CLI needs."""
    temp_dir = tempfile.mkdtemp(prefix="rayjob-")  # short: Ray's socket paths must stay < 108 chars
    port, dashboard_port, *agent_ports = (free_port() for _ in range(6))
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is this venv's
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            f"--port={port}",
            "--dashboard-host",
            "127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--num-cpus",
            "2",
            "--include-dashboard",
            "true",
            f"--temp-dir={temp_dir}",
            # fixed default agent ports would collide with any other Ray on this machine
            *(f"--{flag}={p}" for flag, p in zip(AGENT_PORT_FLAGS, agent_ports, strict=True)),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (
            subprocess.run(
                [str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True
            ).returncode
            != 0
        ):
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        yield address, env
    finally:
        _kill_group(head, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(10)
        _kill_group(head, signal.SIGKILL)  # whatever ignored SIGTERM: gcs_server, raylet, workers
        head.wait(10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)  # the process group that ray start --head leads (start_new_session)


def submit(address: str, env: dict[str, str], *entrypoint: str) -> subprocess.CompletedProcess:
    """``ray job submit`` of ``entrypoint`` with this repository as the working directory; waits for the job."""
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        '{"excludes": [".venv", ".git", "tests", "bench"]}',
        "--",
        *entrypoint,
    ]
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:  # the head's job agent may come up a little after its HTTP API
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(2)


def test_ray_job_submit_segments_a_folder(ray_head: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    """The job runs with its storage options (a secret among them) passed as ``@FILE``: Ray's job table
    records the entrypoint, and with it the file's name, never the secret."""
    address, env = ray_head
    model = tiny_checkpoint(str(tmp_path / "model.pt"))
    files = good_images(seed=21, count=4)
    upload(str(tmp_path / "in"), files)
    output = tmp_path / "out"
    options = tmp_path / "storage-options.json"
    options.write_text(json.dumps({"secret": OPTION_SECRET}))  # local files take (and ignore) any option
    submitted = submit(
        address,
        env,
        "python",
        "-m",
        "pipelines.segment",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(output),
        "--model",
        model,
        "--actors",
        "1",
        "--cpus-per-actor",
        "1",
        "--batch-size",
        "2",
        "--storage-options",
        f"@{options}",
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout
    job_table = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True, text=True, timeout=120
    )
    assert f"@{options}" in job_table.stdout  # the entrypoint is there
    assert OPTION_SECRET not in job_table.stdout + submitted.stdout + submitted.stderr
    assert (output / "_SUCCESS").exists()
    table = pq.read_table(output / "stats")
    assert sorted(table["key"].to_pylist()) == sorted(files) and set(table["status"].to_pylist()) == {"ok"}
    assert all((output / "masks" / f"{key}.png").exists() for key in files)


def test_ray_job_submit_trains_and_registers_a_champion(ray_head: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    address, env = ray_head
    data, registry_dir = tmp_path / "scenes", tmp_path / "registry"
    write_synthetic_voc(str(data), num_images=6, seed=3, min_size=48, max_size=64)
    submitted = submit(
        address,
        env,
        "python",
        "-m",
        "pipelines.train",
        "--data",
        str(data),
        "--registry",
        str(registry_dir),
        "--model",
        "fcn32s_vgg16",
        "--width",
        "0.0625",
        "--geometry",
        "aligned",
        "--workers",
        "1",
        "--epochs",
        "1",
        "--run-name",
        "job",
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout
    assert (registry_dir / "runs" / "job" / "epoch-0001" / registry.CHECKPOINT_FILE).exists()
    champion = registry.get_champion(str(registry_dir))
    assert champion is not None and champion["version"] == "v0001"
    assert fcn.load_checkpoint(str(registry_dir)).arch["name"] == "fcn32s_vgg16"
