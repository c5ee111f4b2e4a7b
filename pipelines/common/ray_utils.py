"""Connecting the pipelines' drivers to Ray, their log lines, and ending an interrupted driver, in one place."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""The log lines of the command-line drivers (the jobs' CLIs, the demo)."""
EMBEDDED_CLUSTER_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # nothing drains a node of one machine: no watcher actor
    # the tasks whose events Ray's GCS keeps for the dashboard's state API, which an embedded cluster does not run
    # (default 100,000, about 5 KB each): 4,500 Ray Data calls grew the GCS by 22 MB (3 MB with this limit), and a
    # run makes 3 calls per window of a tiled image
    "RAY_task_events_max_num_task_in_gcs": "1000",
}
"""The environment (where not set already) of a driver that starts its own local cluster, which the
cluster's processes inherit."""
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
TRAIN_REPORT_MODULE = "train/v2/_internal/execution/context.py"  # under ray/: logs on a logger named by its path


def connect(address: str | None) -> None:
    """Connect to the Ray cluster at ``address`` (else ``RAY_ADDRESS``, else start a local cluster).

    A no-op when Ray is already initialised in this process (e.g. inside ``ray job submit`` drivers
    that called ``ray.init`` themselves, or in tests).
    """
    import ray

    if ray.is_initialized():
        return
    # "local" starts a new local cluster; plain ray.init() would attach to any cluster that
    # `ray start` left running on this machine.
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"worker_process_setup_hook": f"{set_up_worker.__module__}.{set_up_worker.__name__}"}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:  # an embedded cluster for this run: no dashboard (seconds of start-up and a share of a core)
        for name, value in EMBEDDED_CLUSTER_ENV.items():
            os.environ.setdefault(name, value)
        token_setup = logging.getLogger("ray._private.authentication.authentication_token_setup")
        if not any(isinstance(f, _DefaultTokenAuthNotice) for f in token_setup.filters):
            token_setup.addFilter(_DefaultTokenAuthNotice())
        ray.init(address="local", include_dashboard=False, runtime_env=runtime_env)
    _spend_the_restartable_actor_error()


class _DefaultTokenAuthNotice(logging.Filter):
    """Drops Ray's warning that a new local cluster has token authentication, its default: the cluster
    is this run's own, and it ends with the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "_warn_token_auth_enabled"


def set_up_worker() -> None:
    """Set up each Ray worker process of a job that :func:`connect` started (``worker_process_setup_hook``).

    ``RAY_ADDRESS`` names the worker's own cluster for Ray's state API: Ray Train's placement group
    cleaner asks it whether the run's controller lives, and without an address it picks the newest
    cluster on the machine, or fails when there are several. The cleaner's warnings that the state API
    is unavailable (an embedded cluster has no dashboard; the run's placement groups end with it) and
    Ray Train's line for each report (a dict of every metric, on a logger named by its file path, which
    ``ray.train.LoggingConfig`` misses) are dropped; errors still show.
    """
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    logging.getLogger(os.path.join(os.path.dirname(ray.__file__), TRAIN_REPORT_MODULE)).setLevel(logging.WARNING)


class _Probe:
    """An actor that does nothing with its argument (see :func:`_spend_the_restartable_actor_error`)."""

    def __init__(self, argument: object) -> None:
        del argument


def _spend_the_restartable_actor_error() -> None:
    """Let Ray's core worker log its once-per-process ERROR "Actor ... has constructor arguments in the
    object store and max_restarts > 0" now, with stderr pointed at /dev/null: it stays in the driver's
    log file (``python-core-driver-*.log``) and never reaches the console.

    Ray Data starts every actor pool's workers with its own context and UDF as object refs, and restarts
    lost workers (ray-project/ray#57733); the driver holds those refs for the dataset's life, so the line
    warns of nothing that a user of these jobs can act on. Any later such actor of this process is
    created silently by Ray too (once per process).
    """
    import ray

    argument = ray.put(None)  # an argument in the object store, as Ray Data's
    sys.stderr.flush()
    console = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            probe = ray.remote(num_cpus=0, max_restarts=1)(_Probe).remote(argument)  # logs here, synchronously
    finally:
        os.dup2(console, 2)
        os.close(console)
    ray.kill(probe)


def exit_interrupted(message: str) -> NoReturn:
    """End an interrupted driver at once with exit code 130, after printing ``message`` to stderr.

    The process ends without finalising the interpreter (``os._exit``): a thread may still be inside
    Ray's native code (``trainer.fit()`` or Ray Data's executor waiting on the cluster), and the
    interpreter's exit would shut Ray down under it, which can end in a segmentation fault. Ray
    handles a vanished driver as it does a killed one: the cluster ends the run's actors, and the
    processes of a local cluster that this driver started end with it. Log handlers, stdout and
    stderr are flushed first.
    """
    print(message, file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(INTERRUPTED_EXIT_CODE)
