"""A loopback HTTP proxy in front of an S3 endpoint that fails the first PUTs (or other requests) of
every object. Each object's failures follow the same order, so a test's outcome does not depend on how
concurrent writes interleave: by default a 500 InternalError, a 503 SlowDown, a connection reset halfway
through reading the body, and again. A "lost" fault lets the store carry the request out and then answers
500, as when a response is lost on the way back."""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

FAULTS = ("500", "503", "reset")
_ERRORS = {
    "500": (500, b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"),
    "lost": (500, b"<Error><Code>InternalError</Code><Message>injected after the store acted</Message></Error>"),
    "503": (503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"),
}


class FaultyProxy:
    """``url`` forwards to ``upstream``; the first ``failures`` requests of each of ``methods`` to each
    object whose path (``/bucket/key``, decoded) satisfies ``faulty`` fail, in the order of ``faults`` (see
    the module docstring). ``faults`` counts what was injected by kind, ``faulted`` lists (method, path)
    of each injected fault, ``puts`` counts every PUT seen."""

    def __init__(
        self,
        upstream: str,
        failures: int = 1,
        *,
        methods: Sequence[str] = ("PUT",),
        faulty: Callable[[str], bool] = lambda path: True,
        faults: Sequence[str] = FAULTS,
    ):
        target = urlsplit(upstream)
        self.faults: dict[str, int] = dict.fromkeys(faults, 0)
        self.faulted: list[tuple[str, str]] = []
        self.puts = 0
        failed: dict[tuple[str, str], int] = {}
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                fault = None
                path = unquote(urlsplit(self.path).path)
                with lock:
                    proxy.puts += self.command == "PUT"
                    attempt = failed.get((self.command, path), 0)
                    if self.command in methods and faulty(path) and attempt < failures:
                        failed[(self.command, path)] = attempt + 1
                        fault = faults[attempt % len(faults)]
                        proxy.faults[fault] += 1
                        proxy.faulted.append((self.command, path))
                if fault == "reset":
                    self.rfile.read(length // 2)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()  # RST mid-body
                    self.close_connection = True
                    return
                body = self.rfile.read(length) if length else None
                if fault and fault != "lost":
                    self._answer_error(fault)
                    return
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("connection", "transfer-encoding")
                }
                upstream_conn.request(self.command, self.path, body=body, headers=headers)
                response = upstream_conn.getresponse()
                payload = response.read()
                upstream_conn.close()
                if fault == "lost":
                    self._answer_error(fault)
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length", "date", "server"):
                        self.send_header(key, value)
                if self.command == "HEAD":  # no body, and the object's length
                    self.send_header("Content-Length", response.getheader("Content-Length", "0"))
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _answer_error(self, fault: str) -> None:
                status, payload = _ERRORS[fault]
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
