"""The operator's HTTP endpoint on ``PROM_PORT``: metrics, liveness, readiness.

* ``/metrics``: the registry in Prometheus' text format.
* ``/healthz``: 200 while the event loop answers (``cefmp4.runtime.health``), else 503.
* ``/readyz``: 200 while Redis and S3 answered recently and the deployment is
  not blocked, else 503.
* anything else: 404.

The server is ``http.server.ThreadingHTTPServer`` in a daemon thread, like
prometheus_client's own, and deliberately *not* in the event loop: it has to
answer ``/healthz`` with a failure when the loop is wedged. What it serves is
decided by ``Endpoints.respond``, a function of the path and of the shared
``Health`` values, testable without sockets.

``PROM_PORT`` (``port_choices``): unset means 8000, or a free port when 8000 is
taken (a second replica on the same host works without configuration, and
says which port it got); a number means that port, and a taken one stops the
start with one line; ``0`` picks a free port; ``off`` serves nothing. The
port actually bound is logged (``metrics endpoint ... port=N``).
"""

from __future__ import annotations

import errno
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal, NamedTuple
from urllib.parse import urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from cefmp4.domain.errors import ConfigError
from cefmp4.runtime.health import Health, Verdict

log = structlog.get_logger(__name__)

DEFAULT_PORT = 8000
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
PATHS = ("/metrics", "/healthz", "/readyz")


class Response(NamedTuple):
    status: int
    content_type: str
    body: bytes


class PortInUse(ConfigError):
    """PROM_PORT names a port something else (another replica?) listens on."""


class Endpoints:
    """Path in, response out: the whole behaviour of the HTTP endpoint."""

    def __init__(self, registry: CollectorRegistry, health: Health) -> None:
        self._registry = registry
        self._health = health

    def respond(self, target: str) -> Response:
        path = urlsplit(target).path
        if path == "/metrics":
            return Response(200, CONTENT_TYPE_LATEST, generate_latest(self._registry))
        if path == "/healthz":
            return _verdict(self._health.liveness())
        if path == "/readyz":
            return _verdict(self._health.readiness())
        return Response(404, TEXT, f"not found; try {', '.join(PATHS)}\n".encode())


def _verdict(verdict: Verdict) -> Response:
    return Response(200 if verdict.ok else 503, JSON, verdict.body() + b"\n")


def port_choices(prom_port: int | Literal["off"] | None) -> tuple[int, ...]:
    """Pure: the ports to try in order (``0``: the kernel picks a free one)."""
    if prom_port == "off":
        return ()
    if prom_port is None:
        return (DEFAULT_PORT, 0)
    return (prom_port,)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, *, with_body: bool) -> None:
        response = self.server.endpoints.respond(self.path)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if with_body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: object) -> None:
        # A scrape every few seconds is not news; the stdlib would print each.
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never holds up the exit

    def __init__(self, address: tuple[str, int], family: int, endpoints: Endpoints) -> None:
        self.address_family = family
        self.endpoints = endpoints
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a DNS round trip at
        # start, for a name nobody reads); bind only.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class OpsServer:
    """The endpoint, bound at construction, serving from ``start`` to ``close``."""

    def __init__(self, endpoints: Endpoints, addr: str, port: int) -> None:
        family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]
        self._server = _Server((addr, port), family, endpoints)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="cefmp4-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> OpsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_server(
    endpoints: Endpoints, addr: str, prom_port: int | Literal["off"] | None
) -> OpsServer | None:
    """Bind the endpoint as ``PROM_PORT`` says (see the module docstring), not
    yet serving; None with ``off``. Raises ``PortInUse`` naming the variable."""
    choices = port_choices(prom_port)
    for i, port in enumerate(choices):
        try:
            server = OpsServer(endpoints, addr, port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if i + 1 < len(choices):
                log.warning(
                    "metrics port in use (another replica?); taking a free port instead",
                    addr=addr,
                    port=port,
                )
                continue
            raise PortInUse(
                f"PROM_PORT={port}: the port is in use on {addr} (another replica?); "
                "set PROM_PORT=0 for a free port, another port, or leave it unset"
            ) from None
        return server
    return None
