"""A loopback HTTP file server for the demo and the tests (exercises the yt-dlp path)."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Route:
    """A canned answer for one path: status, body and headers (e.g. 403, 429, an HTML page)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    endless: bool = False  # stream ``body`` over and over without Content-Length (bounded: 30 s, 256 MiB)


class _Handler(SimpleHTTPRequestHandler):
    routes: dict[str, Route] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        route = self.routes.get(self.path.split("?")[0])
        if route is None:
            super().do_GET()
            return
        self.send_response(route.status)
        headers = dict(route.headers) if route.endless else {"Content-Length": str(len(route.body)), **route.headers}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not route.endless:
            self.wfile.write(route.body)
            return
        deadline, sent = time.monotonic() + 30, 0
        while time.monotonic() < deadline and sent < 256 * 2**20:
            try:
                self.wfile.write(route.body)
            except OSError:
                return
            sent += len(route.body)

    def do_HEAD(self) -> None:  # noqa: N802
        if self.path.split("?")[0] in self.routes:
            route = self.routes[self.path.split("?")[0]]
            self.send_response(route.status)
            self.end_headers()
            return
        super().do_HEAD()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server signature
        log.debug("http %s", format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients such as yt-dlp close connections early; that is not an error here."""
        log.debug("http client %s went away", client_address)


@contextmanager
def serve_directory(
    root: Path, routes: dict[str, Route] | None = None, port: int = 0, host: str = "127.0.0.1"
) -> Iterator[str]:
    """Serve ``root`` on a loopback address in a background thread; yields the base URL."""
    handler = type("Handler", (_Handler,), {"routes": dict(routes or {})})
    server = _Server((host, port), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
