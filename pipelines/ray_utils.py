"""Connecting the pipelines' drivers to Ray, and ending an interrupted driver, in one place."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


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
    if address:
        ray.init(address=address)
    else:  # an embedded cluster for this run: no dashboard (seconds of start-up and a share of a core)
        ray.init(address="local", include_dashboard=False)


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
