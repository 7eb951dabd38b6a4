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
    #: send ``body`` one byte every this many seconds (a trickling server; bounded: 60 s)
    trickle_seconds: float | None = None
    #: the Content-Length to announce (e.g. larger than ``body`` for a trickle); None: len(body);
    #: -1: none
    content_length: int | None = None


class _Handler(SimpleHTTPRequestHandler):
    routes: dict[str, Route] = {}
    requests: list[str] | None = None  # paths requested, in order (tests count them)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if self.requests is not None:
            self.requests.append(self.path)
        route = self.routes.get(self.path.split("?")[0])
        if route is None:
            super().do_GET()
            return
        self.send_response(route.status)
        length = len(route.body) if route.content_length is None else route.content_length
        headers = dict(route.headers)
        if not route.endless and length >= 0:
            headers = {"Content-Length": str(length), **headers}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if route.trickle_seconds is not None:
            self._trickle(route)
            return
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

    def _trickle(self, route: Route) -> None:
        deadline = time.monotonic() + 60
        for i in range(len(route.body)):
            if time.monotonic() > deadline:
                return
            try:
                self.wfile.write(route.body[i : i + 1])
                self.wfile.flush()
            except OSError:
                return
            time.sleep(route.trickle_seconds or 0)

    def do_HEAD(self) -> None:  # noqa: N802
        if self.requests is not None:
            self.requests.append(self.path)
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
    root: Path,
    routes: dict[str, Route] | None = None,
    port: int = 0,
    host: str = "127.0.0.1",
    requests: list[str] | None = None,
) -> Iterator[str]:
    """Serve ``root`` on a loopback address in a background thread; yields the base URL.
    If ``requests`` is given, every requested path is appended to it."""
    # the routes dict itself (not a copy): a test may add routes that need the base URL
    handler = type("Handler", (_Handler,), {"routes": routes if routes is not None else {}, "requests": requests})
    server = _Server((host, port), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
