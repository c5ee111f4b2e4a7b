"""Benchmark: client CPU per object for S3 PUTs and GETs, s3fs against the obstore path
(``pipelines.common.objectstore``), on moto's S3 server on loopback in its own process, in one run.

CPU is the client process's user+system time over all its threads (s3fs's event-loop thread, obstore's
Rust runtime threads); the server's is read from ``/proc/<pid>/stat``. Each client PUTs then GETs the
same ``--objects`` objects of ``--size`` bytes, one at a time and then all in one concurrent call.

    .venv/bin/python -m bench.object_store --objects 300 --size 40000
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from pipelines.common.processes import cpu_seconds


def measure(action: Callable[[], object], count: int, server_pid: int) -> tuple[float, float, float]:
    """(client CPU ms, server CPU ms, wall ms) per object of ``action()``, which handles ``count`` objects."""
    server, client, wall = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    action()
    per_object = 1000 / count
    return (
        (time.process_time() - client) * per_object,
        (cpu_seconds(server_pid) - server) * per_object,
        (time.perf_counter() - wall) * per_object,
    )


def compare_clients(root: str, objects: int, size: int, server_pid: int) -> list[tuple[str, str, tuple]]:
    """PUT then GET ``objects`` objects of ``size`` bytes under ``root`` (``s3://bucket/prefix``) with each
    client; [(client, operation, (client CPU ms, server CPU ms, wall ms) per object)]."""
    import fsspec

    from pipelines.common import objectstore

    data = os.urandom(size)
    fs, base = fsspec.core.url_to_fs(root)
    fs.makedirs(base.split("/", 1)[0], exist_ok=True)
    results = []

    def record(client: str, prefix: str, put: Callable, get: Callable) -> None:
        uris = [f"{root}/{prefix}/object-{i:06d}.bin" for i in range(objects)]
        results.append((client, "PUT", measure(lambda: put(uris), objects, server_pid)))
        results.append((client, "GET", measure(lambda: get(uris), objects, server_pid)))
        assert objectstore.get_bytes(uris[-1], {}) == data

    def strip(uris: list[str]) -> list[str]:
        return [fs._strip_protocol(uri) for uri in uris]

    record(
        "s3fs, one at a time",
        "s3fs-single",
        lambda uris: [fs.pipe_file(path, data) for path in strip(uris)],
        lambda uris: [fs.cat_file(path) for path in strip(uris)],
    )
    record(
        "s3fs, one concurrent pipe()/cat()",
        "s3fs-batch",
        lambda uris: fs.pipe(dict.fromkeys(strip(uris), data)),
        lambda uris: fs.cat(strip(uris)),
    )
    objectstore.get_all([f"{root}/s3fs-single/object-000000.bin"], {})  # the store's start-up, not measured
    record(
        "obstore, one at a time (put_bytes/get_bytes)",
        "obstore-single",
        lambda uris: [objectstore.put_bytes(uri, data, {}) for uri in uris],
        lambda uris: [objectstore.get_bytes(uri, {}) for uri in uris],
    )
    record(
        "obstore, one concurrent put_all()/get_all()",
        "obstore-batch",
        lambda uris: objectstore.put_all(dict.fromkeys(uris, data), {}),
        lambda uris: objectstore.get_all(uris, {}),
    )
    return results


def print_table(results: list[tuple[str, str, tuple]], objects: int, size: int) -> None:
    """The per-object figures as a Markdown table, with client CPU for one GET plus one PUT per client."""
    print(f"{objects} objects of {size} bytes, loopback S3 (moto in its own process)")
    print("| client | op | client CPU ms/object | server CPU ms/object | wall ms/object |")
    print("|---|---|---|---|---|")
    for client, operation, (client_ms, server_ms, wall_ms) in results:
        print(f"| {client} | {operation} | {client_ms:.2f} | {server_ms:.2f} | {wall_ms:.2f} |")
    by_client: dict[str, float] = {}
    for client, _, (client_ms, _, _) in results:
        by_client[client] = by_client.get(client, 0.0) + client_ms
    print("| client | client CPU ms per GET+PUT |")
    print("|---|---|")
    for client, total in by_client.items():
        print(f"| {client} | {total:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=300)
    parser.add_argument("--size", type=int, default=40_000, help="bytes per object")
    args = parser.parse_args()
    from bench.segment_throughput import start_s3

    server, _ = start_s3()
    try:
        results = compare_clients(f"s3://objects-{os.getpid()}/bench", args.objects, args.size, server.pid)
        print_table(results, args.objects, args.size)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
