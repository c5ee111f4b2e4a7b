"""How many actors of each pool, and where: Ray Data's actor pools sized from the cluster's resources and its
autoscaler's node types, and the wait for a GPU node to join."""

from __future__ import annotations

import logging
import sys
from typing import Any

from pipelines.segment.config import ConfigError, flag

logger = logging.getLogger("pipelines.segment")

ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
"""Every pool's environment (Ray's ``runtime_env``): glibc maps blocks of 4 MB and more (windows, activations, score
maps, labels) on their own and unmaps them when freed. By default it raises that threshold to the largest block freed
(up to 32 MB) and keeps such blocks in its heap: a CPU actor running 2048 px windows stayed about 60 MB larger after
each call and peaked 70 MB higher."""
CPU_ACTORS_PER_LIGHT_WORKER = 4
"""On CPU clusters, the FCN actors that one loader (and one writer) serves: on CPUs the network costs over ten times
the decoding and writing, even at the narrowest width (the segmentation benchmark, FCN-8s width 1/16 on 128 px JPEGs:
5.2 ms inference, 0.3 ms decoding, 0.1 ms writing per image), and each idle worker holds about 200 MB."""


def actor_pool(fewest: int, most: int | None) -> Any:
    """Ray Data's pool of ``fewest`` actors, or of ``fewest`` to ``most`` (None: no limit) that grows while
    work queues; each pending actor is a resource demand that Ray's autoscaler meets by adding nodes."""
    import ray.data

    if most == fewest:
        return ray.data.ActorPoolStrategy(size=fewest)
    return ray.data.ActorPoolStrategy(min_size=fewest, max_size=most)


def default_actors(
    use_gpus: bool, resources: dict[str, float], gpus_possible: int | None, cpus_per_actor: float
) -> tuple[int, int | None]:
    """The default pool: on GPUs from the GPUs present to the most the autoscaler's node types hold
    (None: no limit); on CPUs one per ``cpus_per_actor`` CPUs."""
    if not use_gpus:
        fixed = max(1, int(resources.get("CPU", 1) // cpus_per_actor))
        return fixed, fixed
    present = max(1, int(resources.get("GPU", 0)))
    if gpus_possible is None:
        return present, present
    return present, None if gpus_possible >= sys.maxsize else max(present, gpus_possible)


def light_workers(fcn_actors: int) -> int:
    """Loaders (and writers) on a CPU cluster of ``fcn_actors`` FCN actors: one per ``CPU_ACTORS_PER_LIGHT_WORKER``."""
    return -(-fcn_actors // CPU_ACTORS_PER_LIGHT_WORKER)


def pools_fit(use_gpus: bool, fcn_actors: int, cpus_per_actor: float, resources: dict[str, float]) -> bool:
    """Whether the cluster holds the first actors of the three pools: FCN actors on GPUs with a CPU each and a loader
    and a writer of a CPU each, or FCN actors of ``cpus_per_actor`` CPUs beside loaders and writers of none."""
    needs = {"GPU": fcn_actors, "CPU": fcn_actors + 2} if use_gpus else {"CPU": fcn_actors * cpus_per_actor}
    return all(resources.get(name, 0) >= amount for name, amount in needs.items())


def autoscaler_limit(resource: str) -> int | None:
    """The most of ``resource`` the cluster's autoscaler can provide (its node types' maximum counts; sys.maxsize
    without a limit), or None when the cluster reports no autoscaler configuration."""
    try:
        from ray._private.state import state  # what Ray Train and Ray Data read for the same purpose

        limits = state.get_max_resources_from_cluster_config()
    except Exception:
        return None
    return None if limits is None else int(limits.get(resource, 0))


def wait_for_gpu(timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for a GPU in the cluster: a pending one-GPU task is a resource demand
    that Ray's autoscaler meets by adding a GPU node. ConfigError naming --device if none comes."""
    import ray

    logger.info("no GPU in the Ray cluster yet: waiting up to %g s (%s) for one to join", timeout_s, flag("gpu_wait_s"))
    probe = ray.remote(_on_a_gpu).options(num_gpus=1, num_cpus=0).remote()
    ready, _ = ray.wait([probe], timeout=timeout_s)
    if not ready:
        ray.cancel(probe)
        raise ConfigError(
            flag("device"),
            f"no GPU joined the Ray cluster within {timeout_s:g} s ({flag('gpu_wait_s')}): give the cluster GPU nodes "
            "(or an autoscaler with GPU node types), wait longer, or use --device cpu",
        )


def _on_a_gpu() -> None:
    """The task ``wait_for_gpu`` waits for."""
