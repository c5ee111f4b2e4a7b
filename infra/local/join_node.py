"""``ray start --address=127.0.0.1:PORT ...`` for a worker node of the loopback stack (infra/local/start.sh).

The stack keeps Ray in its single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) so that drivers
keep 127.0.0.1 as the head's address. In that mode ``ray start --address`` refuses to add a node; outside
it, Ray rewrites a loopback head address to the machine's IP, where the loopback-bound head does not
listen. This runs Ray's own CLI with both decisions made for a loopback cluster: nodes may join, and
loopback addresses stay as given. The node's processes inherit the stack's environment unchanged.
"""

import sys

import ray._private.ray_constants as ray_constants
from ray._private import services
from ray.scripts.scripts import main

ray_constants.ENABLE_RAY_CLUSTER = True  # read by `ray start` when it adds a node


def _keep_loopback(host: str) -> str:
    return host


services.resolve_ip_for_localhost = _keep_loopback  # 127.0.0.1 stays 127.0.0.1 (the head binds it alone)

if __name__ == "__main__":
    sys.exit(main())
