"""A loopback HTTP proxy in front of an S3 endpoint that fails the first PUTs of every object. Each
object's failures follow the same order, so a test's outcome does not depend on how concurrent
writes interleave: a 500 InternalError, a 503 SlowDown, a connection reset halfway through reading the
body, and again."""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("500", "503", "reset")
_ERRORS = {
    "500": (500, b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"),
    "503": (503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"),
}


class FaultyProxy:
    """``url`` forwards to ``upstream``; the first ``failures`` PUTs of each path fail (see the module
    docstring). ``faults`` counts what was injected, ``puts`` every PUT seen."""

    def __init__(self, upstream: str, failures: int = 1):
        target = urlsplit(upstream)
        self.faults: dict[str, int] = dict.fromkeys(FAULTS, 0)
        self.puts = 0
        failed: dict[str, int] = {}
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                fault = None
                if self.command == "PUT":
                    with lock:
                        proxy.puts += 1
                        attempt = failed.get(self.path, 0)
                        if attempt < failures:
                            failed[self.path] = attempt + 1
                            fault = FAULTS[attempt % len(FAULTS)]
                            proxy.faults[fault] += 1
                if fault == "reset":
                    self.rfile.read(length // 2)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()  # RST mid-body
                    self.close_connection = True
                    return
                body = self.rfile.read(length) if length else None
                if fault:
                    status, payload = _ERRORS[fault]
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "transfer-encoding")}
                upstream_conn.request(self.command, self.path, body=body, headers=headers)
                response = upstream_conn.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length", "date", "server"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                upstream_conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815 - http.server's naming

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
