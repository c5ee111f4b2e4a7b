"""The console scripts that `pip install` puts next to the interpreter run the same CLIs from any folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    ("script", "flags"),
    [
        ("fcn-segment", ("--input", "--output", "--model", "--storage-options")),
        ("fcn-train", ("--data", "--registry", "--workers", "--recipe")),
    ],
)
def test_console_script_help(script: str, flags: tuple[str, ...], tmp_path: Path) -> None:
    done = subprocess.run([str(BIN / script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(flag in done.stdout for flag in flags), done.stdout


def test_console_script_bad_parameter_exits_2_naming_it(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            str(BIN / "fcn-segment"),
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "out"),
            "--model",
            "model.pt",
            "--batch-size",
            "0",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--batch-size: must be >= 1" in done.stderr and "Traceback" not in done.stderr
