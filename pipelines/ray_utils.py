"""Connecting the pipelines' drivers to Ray, in one place."""

from __future__ import annotations

import os


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
