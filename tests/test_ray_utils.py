"""Ending an interrupted driver (``pipelines.common.ray_utils.exit_interrupted``), shown without Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

INTERRUPTED_DRIVER = """
import atexit, sys, threading, time
from pipelines.common.ray_utils import exit_interrupted

atexit.register(print, "finalised", file=sys.stderr)  # as ray.init registers ray.shutdown
threading.Thread(target=time.sleep, args=(600,)).start()  # still busy, as trainer.fit() is on its thread
print("written before the interrupt", end="")  # held in stdout's buffer (a pipe)
exit_interrupted("interrupted: rerun the same command to resume")
"""


def test_exit_interrupted_ends_at_once_with_130_without_finalising_and_loses_no_output() -> None:
    """Exit code 130 at once with a thread still running; the message and the buffered stdout come out;
    the interpreter is not finalised (no atexit hook runs: ray.shutdown is one)."""
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    command = [sys.executable, "-c", INTERRUPTED_DRIVER]
    done = subprocess.run(command, cwd=REPO, env=buffered, capture_output=True, text=True, timeout=60)

    assert done.returncode == 130, done.stderr
    assert done.stdout == "written before the interrupt"
    assert done.stderr == "interrupted: rerun the same command to resume\n"
