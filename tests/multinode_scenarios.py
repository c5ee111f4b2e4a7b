"""Multi-node scenarios for ``test_multinode.py``, each run in its own process (so that its Ray cluster
never meets the test session's single-node one)::

    python tests/multinode_scenarios.py segment <workdir>
    python tests/multinode_scenarios.py train <workdir> <s3://bucket>   # S3 endpoint from the environment

Each builds a real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and
worker nodes, each its own raylet, object store and workers), runs a job through the project's public
API with ``ray_address`` set to the cluster, hard-kills a worker node that hosts the job's actors in
the middle of the run (SIGKILL to its raylet and every process under it: agents and workers), and
writes ``<workdir>/result.json`` with what happened, for the test to assert on. The recovery is
Ray's own (Ray Data's task retries and actor restarts; Ray Train's FailureConfig): nothing here
reschedules work.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import ray
from ray._private import state as ray_state
from ray._private.services import get_node_ip_address
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))  # segment_cases
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # pipelines, fcn (run as a script)

SEGMENT_IMAGES = 120
SEGMENT_BATCH = 2
SEGMENT_ROWS_PER_FILE = 4
TRAIN_EPOCHS = 4
TRAIN_IMAGES = 24
WAIT_S = 330
"""The scenario's waits on its job, all together (for the moment to kill a node, then for the job to end),
counted from the scenario's start: a job that hangs ends the scenario with its own "timed out" message
in ``result.json``, which is written before the cluster is shut down."""
TEARDOWN_S = 90
"""Beyond ``WAIT_S``: for writing the result and shutting the cluster down (a hung driver's included)."""
TIMEOUT_S = WAIT_S + TEARDOWN_S
"""The test's limit on the scenario's process (``test_multinode.py``)."""
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
"""The GCS declares a silent node dead after ~3 s instead of Ray's default ~15-30 s (checks every 3 s,
dead after 5 failures): the lost actors and tasks are rescheduled sooner, and the tests take less time."""


def start_cluster(head_cpus: float, workers: list[float]) -> tuple[Cluster, list[Any]]:
    """A head (``head_cpus`` CPUs, no dashboard) and one worker node per entry of ``workers`` (its CPUs).

    ``RAY_ADDRESS`` names this cluster for every process started after it: Ray Train's placement group
    cleaner asks the state API whether its controller lives, and without an address it picks the newest
    cluster on the machine; if that were another one (another test session's, infra/local's) with a
    dashboard, it would find no controller there and remove this run's placement group."""
    port = free_port()
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": head_cpus,
            "include_dashboard": False,
            "gcs_server_port": port,
            "_system_config": FAST_NODE_DEATH,
        },
    )
    assert cluster.address == os.environ["RAY_ADDRESS"], (cluster.address, os.environ["RAY_ADDRESS"])
    nodes = [add_worker(cluster, cpus) for cpus in workers]
    cluster.wait_for_nodes()
    return cluster, nodes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def add_worker(cluster: Cluster, cpus: float) -> Any:
    return cluster.add_node(num_cpus=cpus)


def hard_kill(cluster: Cluster, node: Any) -> list[dict[str, Any]]:
    """SIGKILL the node's raylet and every process under it (its agents and Ray workers: the actors
    it hosts) in one sweep, then let ``Cluster`` forget the node. ``remove_node(allow_graceful=False)``
    alone SIGKILLs only the raylet (``Node._kill_process_impl``: ``process.kill()``) and leaves the
    workers to notice their raylet is gone; here they get the SIGKILL too, as on a machine that dies."""
    from pipelines.common.processes import descendants

    raylet = node.all_processes["raylet"][0].process.pid
    killed = []
    for pid in [raylet, *descendants(raylet)]:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            os.kill(pid, signal.SIGKILL)
        except OSError:  # gone already
            continue
        killed.append({"pid": pid, "name": name})
    cluster.remove_node(node, allow_graceful=False)  # reaps the raylet; nothing graceful is left to do
    return killed


class ActorWatcher(threading.Thread):
    """Polls the GCS actor table (no dashboard needed) for actors whose class name contains one of
    ``names``; keeps each actor's latest record and every node it was seen ALIVE on."""

    def __init__(self, names: tuple[str, ...], period_s: float = 0.2):
        super().__init__(name="actor-watcher", daemon=True)
        self.names, self.period_s = names, period_s
        self.latest: dict[str, dict[str, Any]] = {}
        self.alive_on: dict[str, list[dict[str, Any]]] = {}  # actor id -> [{node_id, since}] it was ALIVE on
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def poll(self) -> None:
        if not ray.is_initialized():
            return
        for actor_id, info in ray_state.actors().items():
            name = info.get("ActorClassName") or ""
            if not any(n in name for n in self.names):
                continue
            record = {
                "class": name,
                "state": info["State"],
                "node_id": info["Address"]["NodeID"],
                "pid": info.get("Pid"),
                "restarts": info.get("NumRestarts"),
            }
            with self.lock:
                self.latest[actor_id] = record
                seen = self.alive_on.setdefault(actor_id, [])
                moved = not seen or seen[-1]["node_id"] != record["node_id"]
                if record["state"] == "ALIVE" and record["node_id"] and moved:
                    seen.append({"node_id": record["node_id"], "since": time.time()})

    def run(self) -> None:
        while not self.stop.wait(self.period_s):
            try:
                self.poll()
            except Exception as error:
                logging.getLogger(__name__).debug("actor poll failed: %s", error)

    def alive(self, name: str) -> dict[str, dict[str, Any]]:
        """The ALIVE actors whose class name contains ``name``, by actor id (polled now)."""
        self.poll()
        with self.lock:
            return {a: dict(r) for a, r in self.latest.items() if name in r["class"] and r["state"] == "ALIVE"}

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"latest": dict(self.latest), "alive_on": {a: list(n) for a, n in self.alive_on.items()}}


class Driver(threading.Thread):
    """The job's driver on a thread of its own: the main thread keeps the cluster's controls (adding a
    node installs signal handlers, which only the main thread may do). Every wait on it ends by
    ``deadline`` (``time.monotonic()``), the scenario's."""

    def __init__(self, job: Any, deadline: float):
        super().__init__(name="driver", daemon=True)
        self.job, self.deadline, self.result, self.error, self.ended_at = job, deadline, None, None, None
        self.started, self.started_at = time.monotonic(), time.time()
        self.start()

    def run(self) -> None:
        try:
            self.result = self.job()
        except Exception as error:
            self.error = f"{type(error).__name__}: {error}"
        self.ended_at = time.time()

    def wait_for(self, condition: Any, period_s: float = 0.05) -> Any:
        """``condition()``'s first truthy value, polled while the job runs; None if it ends or the deadline
        passes first."""
        while self.is_alive() and time.monotonic() < self.deadline:
            value = condition()
            if value:
                return value
            time.sleep(period_s)
        return None

    def missed(self, what: str) -> str:
        """Why ``what`` (awaited with :meth:`wait_for`) did not happen."""
        if self.is_alive():
            return f"timed out: {WAIT_S} s into the scenario, before {what}"
        return f"the run ended before {what}"

    def finish(self) -> dict[str, Any]:
        self.join(max(0.0, self.deadline - time.monotonic()))
        return {
            "summary": self.result,
            "error": self.missed("the job ended") if self.is_alive() else self.error,
            "run_s": round(time.monotonic() - self.started, 1),
            "finished_at": self.ended_at,
        }


def _node_ids(cluster: Cluster, nodes: list[Any]) -> dict[str, str]:
    return {"head": cluster.head_node.node_id, **{f"worker{i + 1}": node.node_id for i, node in enumerate(nodes)}}


def _by_node(actors: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    nodes: dict[str, list[str]] = {}
    for actor_id, record in actors.items():
        nodes.setdefault(record["node_id"], []).append(actor_id)
    return nodes


def segment(workdir: Path, deadline: float) -> tuple[dict[str, Any], Cluster]:
    """120 small images through ``run_segmentation`` on a head (2 CPUs) and two worker nodes (1 CPU
    each): 3 one-CPU FCN actors, which Ray Data spreads over the nodes. Once some (not all) Parquet
    parts are written, a worker node hosting an FCN actor is killed; Ray restarts the lost actors where
    a CPU is free (one is spare) and reruns the lost tasks. Returns what happened and the cluster."""
    from segment_cases import good_images, tiny_checkpoint, upload

    from pipelines.segment import SegmentConfig, run_segmentation

    files = {}
    for seed in range(SEGMENT_IMAGES // 6):
        files.update(good_images(seed=seed, count=6))
    upload(str(workdir / "input"), files)
    model = tiny_checkpoint(str(workdir / "model.pt"), num_classes=4)
    output = workdir / "output"
    stats = output / "stats"

    def parts() -> int:
        return len(list(stats.glob("part-*.parquet"))) if stats.exists() else 0

    started = time.monotonic()
    cluster, nodes = start_cluster(head_cpus=2, workers=[1, 1])
    outcome: dict[str, Any] = {"cluster_s": round(time.monotonic() - started, 1), "nodes": _node_ids(cluster, nodes)}
    watcher = ActorWatcher(("Segmenter", "Tally"))
    watcher.start()
    config = SegmentConfig(
        input=str(workdir / "input"),
        output=str(output),
        model=model,
        ray_address=cluster.address,
        actors=3,
        cpus_per_actor=1,
        batch_size=SEGMENT_BATCH,
        rows_per_file=SEGMENT_ROWS_PER_FILE,
        progress=False,
    )

    def job() -> dict[str, Any]:
        summary = run_segmentation(config)
        return {k: getattr(summary, k) for k in ("run_id", "listed", "ok", "error", "skipped", "duration_s")}

    driver = Driver(job, deadline)

    def mid_run() -> tuple[Any, dict[str, Any]] | None:
        """(a worker node hosting an FCN actor, the live FCN actors), once some Parquet parts are written
        and FCN actors run on two nodes or more."""
        alive = watcher.alive("Segmenter")
        hosts = _by_node(alive)
        victim = next((n for n in nodes if n.node_id in hosts), None)
        return (victim, alive) if parts() >= 1 and len(hosts) >= 2 and victim else None

    found = driver.wait_for(mid_run)
    if found is None:
        outcome["kill_error"] = driver.missed(f"FCN actors ran on two nodes with parts written: {parts()}")
    else:
        victim, alive = found
        written = sorted(stats.glob("part-*.parquet"))  # written atomically: whole files only
        keys = [key for part in written for key in pq.read_table(part, columns=["key"])["key"].to_pylist()]
        outcome.update(
            actors_at_kill=alive,
            killed_node=victim.node_id,
            killed_actors=_by_node(alive)[victim.node_id],
            parts_at_kill=len(written),
            keys_at_kill=sorted(keys),
            run_started_at=driver.started_at,
            killed_at=time.time(),
            killed_processes=hard_kill(cluster, victim),
        )
    outcome.update(driver.finish())
    watcher.stop.set()
    watcher.join(timeout=5)
    expected_parts = -(-len(files) // SEGMENT_ROWS_PER_FILE)
    outcome.update(keys=sorted(files), expected_parts=expected_parts, actors=watcher.snapshot())
    return outcome, cluster


def train(workdir: Path, bucket: str, deadline: float) -> tuple[dict[str, Any], Cluster]:
    """``run_training`` with 2 one-CPU workers on a head without CPUs and two one-CPU worker nodes:
    one worker per node. Once epoch 1's checkpoint is registered (in Ray Train's snapshot on S3), the
    node of one worker is killed and a replacement node joins (as an autoscaler would add one); Ray
    Train restarts the worker group from the latest checkpoint and the run finishes and is registered.
    Returns what happened and the cluster."""
    from fcn import registry
    from pipelines.synthetic import write_synthetic_voc
    from pipelines.train import TrainConfig, run_training

    data = workdir / "data"
    write_synthetic_voc(str(data), num_images=TRAIN_IMAGES, seed=3, min_size=48, max_size=64)
    reg = f"{bucket}/registry"
    run_name = "multinode"
    snapshot = f"{reg}/runs/{run_name}/checkpoint_manager_snapshot.json"
    seen: dict[int, float] = {}  # epoch -> when its checkpoint first showed in the snapshot (time.time())

    def checkpointed() -> list[int]:
        fs, path = fsspec.core.url_to_fs(snapshot)
        fs.invalidate_cache()
        try:
            text = fs.cat_file(path).decode()
        except FileNotFoundError:
            return []
        epochs = [e for e in range(1, TRAIN_EPOCHS + 1) if f"epoch-{e:04d}" in text]
        for epoch in epochs:
            seen.setdefault(epoch, time.time())
        return epochs

    started = time.monotonic()
    cluster, nodes = start_cluster(head_cpus=0, workers=[1, 1])
    outcome: dict[str, Any] = {"cluster_s": round(time.monotonic() - started, 1), "nodes": _node_ids(cluster, nodes)}
    watcher = ActorWatcher(("RayTrainWorker",))
    watcher.start()
    config = TrainConfig(
        data=str(data),
        registry=reg,
        model="fcn8s_vgg16",
        width=1 / 16,
        geometry="aligned",
        workers=2,
        cpus_per_worker=1,
        epochs=TRAIN_EPOCHS,
        lr=3e-3,
        run_name=run_name,
        max_failures=2,
        ray_address=cluster.address,
    )

    def job() -> dict[str, Any]:
        summary = run_training(config)
        return {
            "version": summary.version,
            "promoted": summary.promoted,
            "epochs": summary.epochs,
            "history": [
                {k: h[k] for k in ("epoch", "resumed_from_epoch", "world_size", "train_loss", "mean_iu")}
                for h in summary.history
            ],
        }

    driver = Driver(job, deadline)
    if not driver.wait_for(checkpointed, period_s=0.1):
        outcome["kill_error"] = driver.missed("epoch 1's checkpoint was registered")
    else:
        alive = watcher.alive("RayTrainWorker")
        victim = next((n for n in nodes if n.node_id in _by_node(alive)), None)
        outcome.update(workers_at_kill=alive, epochs_at_kill=checkpointed())
        if victim is None:
            outcome["kill_error"] = f"no worker node hosts a train worker: {alive}"
        else:
            outcome.update(killed_node=victim.node_id, killed_at=time.time())
            outcome["killed_processes"] = hard_kill(cluster, victim)
            outcome["replacement_node"] = add_worker(cluster, 1).node_id
            outcome["replacement_at"] = time.time()
    driver.wait_for(lambda: len(checkpointed()) == TRAIN_EPOCHS, period_s=0.5)
    outcome.update(driver.finish())
    watcher.stop.set()
    watcher.join(timeout=5)
    outcome.update(
        checkpoint_seen_at=seen,
        champion=registry.get_champion(reg),
        versions=registry.list_versions(reg),
        actors=watcher.snapshot(),
    )
    return outcome, cluster


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    scenario, workdir = argv[0], Path(argv[1])
    deadline = time.monotonic() + WAIT_S
    workdir.mkdir(parents=True, exist_ok=True)
    result, cluster = segment(workdir, deadline) if scenario == "segment" else train(workdir, argv[2], deadline)
    (workdir / "result.json").write_text(json.dumps(result, indent=1, default=str))
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
