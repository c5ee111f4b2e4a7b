"""Beyond one machine: each job on a real multi-node Ray cluster (a head and worker nodes on this
machine), with a worker node hard-killed in the middle of the run.

The clusters live in a subprocess (``multinode_scenarios.py``), never beside the session's single-node
``ray_cluster``; it writes what happened to ``result.json`` and the assertions here read it and the
job's outputs.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
from multinode_scenarios import SEGMENT_IMAGES, TIMEOUT_S, TRAIN_EPOCHS, WAIT_S, Driver
from PIL import Image

HERE = Path(__file__).resolve().parent


def _scenario(*args: str) -> dict[str, Any]:
    """Run ``multinode_scenarios.py *args`` (``args[1]`` is its workdir); return its result."""
    written = Path(args[1]) / "result.json"
    try:
        run = subprocess.run(
            [sys.executable, str(HERE / "multinode_scenarios.py"), *args],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:  # its own waits end earlier: the cluster's shutdown hung
        found = written.read_text()[:4000] if written.exists() else "not written"
        raise AssertionError(f"scenario not done in {TIMEOUT_S} s; result.json: {found}") from None
    assert written.exists(), run.stderr[-4000:]
    result = json.loads(written.read_text())  # first: a hang's message is here, whatever the exit status
    assert result.get("kill_error") is None and result["error"] is None, (result, run.stderr[-4000:])
    assert run.returncode == 0, run.stderr[-4000:]
    return result


def test_a_hung_job_ends_the_scenario_by_its_deadline_with_its_own_message() -> None:
    """Every wait of a scenario ends by one deadline, WAIT_S from its start, well before the test's
    TIMEOUT_S: a job that never ends is reported as timed out instead of being killed from outside."""
    assert WAIT_S < TIMEOUT_S - 60
    release = threading.Event()
    started = time.monotonic()
    driver = Driver(release.wait, deadline=started + 1.0)  # a job that hangs until released
    try:
        assert driver.wait_for(lambda: False) is None  # the moment to kill a node never comes
        assert driver.missed("a node was killed").startswith(f"timed out: {WAIT_S} s into the scenario")
        ended = driver.finish()
        assert time.monotonic() - started < 3.0
        assert ended["error"] == f"timed out: {WAIT_S} s into the scenario, before the job ended"
    finally:
        release.set()


def _killed_pids(result: dict[str, Any]) -> set[int]:
    names = {p["name"] for p in result["killed_processes"]}
    assert "raylet" in names, names  # the node itself, not only a worker process
    return {p["pid"] for p in result["killed_processes"]}


def test_segmentation_spreads_over_nodes_and_survives_losing_one(tmp_path: Path) -> None:
    result = _scenario("segment", str(tmp_path))
    nodes = result["nodes"]
    workers = {nodes["worker1"], nodes["worker2"]}

    # FCN actors ran on at least two nodes, and the killed worker node hosted one when it died: its
    # process was among those SIGKILLed with the raylet.
    at_kill = result["actors_at_kill"]
    assert len({a["node_id"] for a in at_kill.values()}) >= 2, at_kill
    killed = result["killed_node"]
    assert killed in workers and result["killed_actors"], result["killed_actors"]
    assert {at_kill[a]["pid"] for a in result["killed_actors"]} <= _killed_pids(result)
    # Mid-run: some, not all, Parquet parts were written when the node died.
    assert 1 <= result["parts_at_kill"] < result["expected_parts"], result["parts_at_kill"]
    assert 0 < len(result["keys_at_kill"]) < SEGMENT_IMAGES
    # Ray restarted each lost FCN actor (same actor, max_restarts=-1) on a node that is still there.
    alive_on = result["actors"]["alive_on"]
    for actor in result["killed_actors"]:
        nodes_seen = [seen["node_id"] for seen in alive_on[actor]]
        assert nodes_seen[0] == killed and nodes_seen[-1] != killed, nodes_seen
    # The progress count (an actor without restarts) stayed on the driver's node, out of harm's way.
    tallies = [a for a, record in result["actors"]["latest"].items() if record["class"] == "Tally"]
    assert len(tallies) == 1 and [seen["node_id"] for seen in alive_on[tallies[0]]] == [nodes["head"]]

    # Every image exactly once, all ok, some of them processed after the kill; a mask for every ok row.
    keys = result["keys"]
    assert len(keys) == SEGMENT_IMAGES and result["summary"]["ok"] == SEGMENT_IMAGES
    stats = pq.read_table(tmp_path / "output" / "stats")
    rows = stats.to_pylist()
    assert sorted(r["key"] for r in rows) == keys  # sorted, so a duplicate or a gap shows
    assert {r["status"] for r in rows} == {"ok"}
    killed_at = datetime.fromtimestamp(result["killed_at"], UTC)
    assert sum(r["processed_at"] > killed_at for r in rows) > 0
    for row in rows:
        with fsspec.open(row["mask_uri"], "rb") as f:
            mask = Image.open(io.BytesIO(f.read()))
        assert mask.mode == "P" and mask.size == (row["width"], row["height"]), row["key"]
    assert (tmp_path / "output" / "_SUCCESS").is_file()


def test_training_on_two_nodes_resumes_on_a_replacement_node_and_registers(tmp_path: Path, s3_bucket: str) -> None:
    result = _scenario("train", str(tmp_path), s3_bucket)  # the S3 endpoint reaches it in the environment
    nodes = result["nodes"]

    # The 2 Ray Train workers ran on the 2 worker nodes (one each); one of them died with its node.
    at_kill = result["workers_at_kill"]
    assert sorted(w["node_id"] for w in at_kill.values()) == sorted([nodes["worker1"], nodes["worker2"]]), at_kill
    killed = result["killed_node"]
    lost = [w["pid"] for w in at_kill.values() if w["node_id"] == killed]
    assert len(lost) == 1 and set(lost) <= _killed_pids(result)
    # The last worker group (the 2 workers started last): on the surviving node and the replacement node.
    survivor = ({nodes["worker1"], nodes["worker2"]} - {killed}).pop()
    started = sorted(
        (seen[0]["since"], seen[0]["node_id"]) for a, seen in result["actors"]["alive_on"].items() if a not in at_kill
    )
    assert sorted(node for _, node in started[-2:]) == sorted([survivor, result["replacement_node"]]), started

    # Killed during an epoch: after epoch k's checkpoint was registered, before the last one's. The run
    # resumed from the latest checkpoint (k, or k + 1 if Ray Train registered one more as the node
    # died), reran the epochs after it, and finished every epoch once with both workers.
    summary = result["summary"]
    at = max(result["epochs_at_kill"])
    assert 1 <= at < TRAIN_EPOCHS
    history = summary["history"]
    assert [h["epoch"] for h in history] == list(range(1, TRAIN_EPOCHS + 1)) and summary["epochs"] == TRAIN_EPOCHS
    resumed = history[-1]["resumed_from_epoch"]
    assert resumed in (at, at + 1) and resumed < TRAIN_EPOCHS, history
    assert [h["resumed_from_epoch"] for h in history] == [None] * resumed + [resumed] * (TRAIN_EPOCHS - resumed)
    assert {h["world_size"] for h in history} == {2}

    # Registered and promoted: the registry (on S3) names it champion and its checkpoint is there.
    assert (summary["version"], summary["promoted"]) == ("v0001", True) and result["versions"] == ["v0001"]
    champion = result["champion"]
    assert champion["version"] == "v0001" and champion["checkpoint"].startswith(f"{s3_bucket}/registry/")
    fs, path = fsspec.core.url_to_fs(champion["checkpoint"])
    assert fs.exists(path)
