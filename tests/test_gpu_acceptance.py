"""The GPU acceptance check (bench/gpu_acceptance.py) runs as the GPU machines run it, without Ray, Prefect or
s3fs: on a CPU its CUDA parts are reported skipped and every part a CPU can run passes with real figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU_MACHINES = ("ray", "prefect", "s3fs")
SITECUSTOMIZE = f"""
import sys


class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {ABSENT_ON_GPU_MACHINES!r}:
            raise ImportError(f"{{name}} is not installed on the GPU machines")
        return None


sys.meta_path.insert(0, Absent())
"""


def gpu_machine_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a CPU-only machine where Ray, Prefect and s3fs cannot be imported (in every
    process started with it: a ``sitecustomize`` on ``PYTHONPATH``)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
        "CUDA_VISIBLE_DEVICES": "",
    }


def test_acceptance_check_runs_on_a_cpu_without_ray_prefect_or_s3fs(
    tmp_path: Path,
) -> None:
    env = gpu_machine_env(tmp_path)
    for module in ABSENT_ON_GPU_MACHINES:  # the premise: these imports fail in that environment
        probe = subprocess.run(
            [sys.executable, "-c", f"import {module}"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert probe.returncode == 1 and "not installed on the GPU machines" in probe.stderr, probe.stderr

    out = tmp_path / "results.json"
    command = [
        sys.executable,
        "-m",
        "bench.gpu_acceptance",
        "--smoke",
        "--out",
        str(out),
    ]
    done = subprocess.run(
        command,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["cuda"] is False and "no CUDA" in results["device"]
    sections = results["sections"]
    assert list(sections) == ["faults", "segmenting", "tiling", "training"]
    for name, section in sections.items():
        assert section["status"] == "passed", (
            name,
            section.get("error"),
            section.get("failed_targets"),
        )
        assert section["targets"] and all(target["passed"] for target in section["targets"].values())
    assert results["passed"] is True
    assert "| faults | 'CUDA error: an illegal memory access was encountered' ends the actor call |" in done.stdout

    # the CUDA-only parts are reported skipped, not silently left out
    for name in ("segmenting", "tiling", "training"):
        assert "no CUDA" in sections[name]["skipped"].values(), (
            name,
            sections[name]["skipped"],
        )

    # real figures from the parts a CPU runs
    faults = sections["faults"]["figures"]
    for message in (
        "an illegal memory access was encountered",
        "device-side assert triggered",
    ):
        assert faults[f"simulated 'CUDA error: {message}'"] == f"raised RuntimeError: CUDA error: {message}"
    assert faults["simulated ordinary RuntimeError"].startswith("2 of 2 rows became error rows")
    assert faults["exit_on_fatal_error: the actor's process"] == "exit status 1, returned nothing"
    segmenting = sections["segmenting"]
    assert segmenting["figures"]["CPU fp32 reference images"] >= 1
    assert segmenting["figures"]["actor images/s (batch 16)"] > 0
    assert 0.995 <= segmenting["targets"]["label agreement with CPU fp32"]["value"] <= 1.0
    assert segmenting["targets"]["largest mean_confidence difference"]["value"] <= 0.005
    tiling = sections["tiling"]
    assert isinstance(tiling["figures"]["differing labels (pixels)"], int)
    training = sections["training"]
    assert training["figures"]["process group"] == "gloo, world size 1"
    assert training["figures"]["epoch 2: train images/s"] > 0
    assert training["targets"]["resumed from epoch 1, trained epoch 2 only"]["passed"]
