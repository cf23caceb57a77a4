"""A TCP proxy whose answers can be held at a gate: an S3 call kept in flight
for as long as a test needs.

``GateProxy`` forwards every byte both ways. ``close()`` makes it hold what the
store sends back from then on (requests still reach the store, which does the
work); ``held`` counts connections with an answer waiting at the gate, so a
test knows a call is in flight; ``open()`` lets everything through. Used to
pin a service in the middle of an UploadPart (or any other call) while the
test does something to it: SIGSTOP past its lease, SIGTERM, a second signal.

Unlike ``tests.faultproxy`` it injects no faults and draws no fates: what it
holds is decided by the test, at the moment the test decides.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

LOOPBACK = "127.0.0.1"
_METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")


class GateProxy:
    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"{upstream_url!r} has no host:port")
        self._upstream = (parts.hostname, parts.port)
        self._gate = asyncio.Event()
        self._gate.set()
        self._match = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.held = 0  # connections whose answer waits at the gate now
        self.ever_held = 0  # answers that had to wait at the gate at all
        # Request lines seen ("PUT /bucket/key?partNumber=2&uploadId=... HTTP/1.1"),
        # as far as a chunk starts with one: enough to tell which call is held.
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return f"http://{LOOPBACK}:{self._server.sockets[0].getsockname()[1]}"

    def close(self, match: str = "") -> None:
        """Hold the store's answers from now on: to every request, or only to
        those whose request line contains ``match`` (``"partNumber="``: UploadPart)."""
        self._match = match
        self._gate.clear()

    def open(self) -> None:
        """Let held and later answers through."""
        self._gate.set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.open()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        # The request line last sent on this connection: HTTP/1.1 clients do
        # not pipeline, so the next answer belongs to it.
        last = [""]
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, last=last),
                self._pump(up_reader, writer, last=last, gated=True),
                return_exceptions=True,
            )
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        *,
        last: list[str],
        gated: bool = False,
    ) -> None:
        try:
            while data := await src.read(64 * 1024):
                if not gated and data.startswith(_METHODS):
                    last[0] = data.split(b"\r\n", 1)[0].decode(errors="replace")
                    self.requests.append(last[0])
                if gated and not self._gate.is_set() and self._match in last[0]:
                    self.held += 1
                    self.ever_held += 1
                    try:
                        await self._gate.wait()
                    finally:
                        self.held -= 1
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except (ConnectionError, OSError):
            pass
