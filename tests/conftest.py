"""Shared test fixtures: a real S3 endpoint on loopback (moto's server) and a real local Ray cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

# Distinctive credentials (moto accepts any): tests search outputs and logs for them.
ENV_SECRET = "env-secret-4f9b27c1"
ENV_TOKEN = "env-session-token-8d13e5a0"
OPTION_SECRET = "option-secret-c6a2f471"
SECRETS = (ENV_SECRET, ENV_TOKEN, OPTION_SECRET)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start moto's S3 server on loopback, as s3fs's own test suite does; yield its endpoint URL.

    The endpoint and dummy credentials are exported so that s3fs (via FSSPEC_S3_ENDPOINT_URL),
    pyarrow and Ray workers started afterwards all reach the same server.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": ENV_SECRET,
            "AWS_SESSION_TOKEN": ENV_TOKEN,
            "AWS_DEFAULT_REGION": "us-east-1",
            "FSSPEC_S3_ENDPOINT_URL": endpoint,
            "AWS_ENDPOINT_URL": endpoint,
        }
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_S3_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "FSSPEC_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
)


@pytest.fixture(scope="session")
def private_s3_options(s3_endpoint: str) -> Iterator[dict[str, Any]]:
    """fsspec storage options for a second S3 endpoint that only they reach: moto's server in its own
    process (its own buckets), while the environment keeps pointing at ``s3_endpoint``."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto server on {endpoint} did not start") from None
            time.sleep(0.2)
    try:
        yield {"endpoint_url": endpoint, "key": "private", "secret": OPTION_SECRET}
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty bucket on the loopback S3 endpoint; yields 's3://<bucket>'."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    name = "test-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    name = name.rstrip("-")
    fs.mkdir(name)
    yield f"s3://{name}"
    fs.rm(name, recursive=True)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str) -> Iterator[None]:
    """A real local Ray cluster (2 CPUs) shared by the session; started after the S3 endpoint so
    that Ray workers inherit its environment."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
