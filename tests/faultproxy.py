"""A fault-injecting TCP proxy for the HTTP/1.1 traffic between the service and S3.

``FaultProxy(host, port)`` listens on 127.0.0.1 (``.url``) and forwards to the
real store. Every *new client connection* draws one fate from a seeded plan
(``random.Random(seed)``; the sequence of fates is deterministic, which
request meets which fate depends on the client's scheduling):

* ``reset_rate``: forward ``cut`` bytes of the client's requests (0, i.e. at
  once, for a quarter of them; otherwise up to ``reset_max_bytes``), then
  reset both sides (``SO_LINGER`` 0, so the client sees ECONNRESET, not a
  clean close): a connection torn down mid-request or mid-upload. The fault
  is counted when the reset happens; a connection that closes before it has
  carried ``cut`` bytes never meets it.
* ``slowdown_rate``: upstream is not contacted; once the request head is in,
  the client gets ``503 Slow Down`` with S3's XML error body and
  ``Connection: close``. A body the client is still sending is read and
  dropped: closing with unread input would turn our FIN into an RST that can
  destroy the answer before the client reads it.
* ``lost_response_rate``: the request goes through, and the connection is
  reset as S3's (final, non-1xx) answer comes back: S3 did the work, the
  client cannot know (the ambiguous failure a timeout also produces).
* ``stall_rate``: nothing is forwarded or answered for ``stall_seconds``
  (meant to exceed the client's per-request timeout), then the connection
  closes.
* otherwise: transparent, one pump per direction, half-closes passed on.

Faults are per connection, not per request, because botocore (and aiohttp
under aiobotocore) keeps connections alive: a fault hits whatever request
happens to be on that connection, e.g. the third UploadPart sent over it.

A healthy keep-alive connection would otherwise carry every later request
and no new fate would be drawn: with ``idle_close_seconds`` set, a connection
whose last request was answered and that has been quiet that long is closed
(FIN), as S3's front ends close idle connections; the client's next request
then opens a new connection and meets a new fate.

``max_faults`` bounds how many connections are given a fault, so a run is
guaranteed to get through eventually; ``enabled = False`` makes new
connections transparent; ``down = True`` is an outage: live connections are
reset and every new one is reset at once (counted as ``refused``, not as a
fault) until ``down`` is cleared. ``deny = True`` is a blocked deployment
(revoked keys, a broken bucket policy): live connections are reset and every
request on a new one is answered ``403 AccessDenied`` with S3's XML body,
without reaching S3 (counted as ``denied``), until ``deny`` is cleared.
``injected`` counts what actually happened, so a test can prove its faults
fired.

Two faults look inside the requests (HTTP/1.1 with ``Content-Length`` bodies,
as botocore sends them), on every connection the plan leaves transparent:

* ``reject_headers``: a request carrying a header whose name starts with one
  of these (lower case, e.g. ``b"x-amz-checksum-"``) is answered
  ``400 InvalidRequest`` without reaching S3 (counted as ``rejected``): a
  store that does not support what the header asks for.
* ``corrupt_bodies``: the next that many request bodies of at least
  ``corrupt_min_bytes`` reach S3 with one byte flipped in the middle
  (counted as ``corrupted``): damage in transit that only a checksum catches.
* ``inspect``: read requests one by one even with no fault to inject, so that
  ``signed`` counts the bodies sent with a signed SHA-256 (``corrupt_min_bytes``
  or more).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import urlsplit

Fault = Literal["reset", "slowdown", "stall", "lost_response"]

LOOPBACK = "127.0.0.1"
_READ_SIZE = 64 * 1024
_IMMEDIATE_RESET_SHARE = 0.25
# How long a slowdown answer waits for the client to finish sending and close.
_SLOWDOWN_DRAIN_SECONDS = 10.0

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)
INVALID_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>InvalidRequest</Code><Message>Unsupported header</Message></Error>"
)
DENIED_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
)


def _head(status: bytes, body: bytes) -> bytes:
    """An error answer's head; ``Connection: close`` so no request follows it."""
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Content-Type: application/xml\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )


SLOWDOWN_HEAD = _head(b"503 Slow Down", SLOWDOWN_BODY)
DENIED_HEAD = _head(b"403 Forbidden", DENIED_BODY)
INVALID_HEAD = _head(b"400 Bad Request", INVALID_BODY)


@dataclass
class Injected:
    """What the proxy actually did (not what it planned)."""

    reset: int = 0
    slowdown: int = 0
    stall: int = 0
    lost_response: int = 0
    refused: int = 0  # connections reset while ``down``; an outage, not a fault
    denied: int = 0  # requests answered AccessDenied while ``deny``; not a fault
    idle_closed: int = 0  # quiet connections closed (``idle_close_seconds``); not a fault
    rejected: int = 0  # requests answered InvalidRequest for a header (``reject_headers``)
    corrupted: int = 0  # request bodies forwarded with a flipped byte (``corrupt_bodies``)
    signed: int = 0  # inspected bodies of >= corrupt_min_bytes whose SHA-256 was signed

    @property
    def faults(self) -> int:
        return self.reset + self.slowdown + self.stall + self.lost_response


class _CutReached(Exception):
    """A pump forwarded its ``cut`` bytes: time to reset."""


class _Idle(Exception):
    """The connection's last request was answered long enough ago."""


class _Rejected(Exception):
    """A request was answered in place of S3: the connection ends."""


@dataclass
class _Traffic:
    """When bytes last moved on a connection, and whether the answer came last."""

    at: float
    answered: bool = False


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        seed: int = 0,
        reset_rate: float = 0.0,
        slowdown_rate: float = 0.0,
        stall_rate: float = 0.0,
        lost_response_rate: float = 0.0,
        stall_seconds: float = 5.0,
        reset_max_bytes: int = 6 * 1024 * 1024,
        max_faults: int | None = None,
        idle_close_seconds: float | None = None,
        reject_headers: tuple[bytes, ...] = (),
        corrupt_bodies: int = 0,
        corrupt_min_bytes: int = 1024 * 1024,
        inspect: bool = False,
    ) -> None:
        if reset_rate + slowdown_rate + stall_rate + lost_response_rate > 1.0:
            raise ValueError("the fault rates add up to more than 1")
        self.upstream = (upstream_host, upstream_port)
        self.reset_rate = reset_rate
        self.slowdown_rate = slowdown_rate
        self.stall_rate = stall_rate
        self.lost_response_rate = lost_response_rate
        self.stall_seconds = stall_seconds
        self.reset_max_bytes = reset_max_bytes
        self.max_faults = max_faults
        self.idle_close_seconds = idle_close_seconds
        self.reject_headers = reject_headers
        self.corrupt_bodies = corrupt_bodies
        self.corrupt_min_bytes = corrupt_min_bytes
        self.inspect = inspect
        self.enabled = True
        self.injected = Injected()
        self.connections = 0
        self._rng = random.Random(seed)
        self._planned = 0
        self._down = False
        self._deny = False
        self._server: asyncio.Server | None = None
        self._port = 0
        self._clients: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def to(cls, url: str, **options: Any) -> FaultProxy:
        """A proxy in front of ``http://host:port``."""
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"{url!r} has no host:port")
        return cls(parts.hostname, parts.port, **options)

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return f"http://{LOOPBACK}:{self._port}"

    @property
    def down(self) -> bool:
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        self._down = value
        if value:
            for writer in list(self._clients):
                _abort(writer)

    @property
    def deny(self) -> bool:
        return self._deny

    @deny.setter
    def deny(self, value: bool) -> None:
        self._deny = value
        if value:  # a kept-alive connection would carry the next request past the denial
            for writer in list(self._clients):
                _abort(writer)

    # -- life cycle -------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- one connection ---------------------------------------------------

    def _plan(self) -> tuple[Fault | None, int]:
        """The next fate from the seeded sequence, and the reset's cut."""
        if not self.enabled or (self.max_faults is not None and self._planned >= self.max_faults):
            return None, 0
        rates: tuple[tuple[Fault, float], ...] = (
            ("reset", self.reset_rate),
            ("slowdown", self.slowdown_rate),
            ("stall", self.stall_rate),
            ("lost_response", self.lost_response_rate),
        )
        roll = self._rng.random()
        fault: Fault | None = None
        for kind, rate in rates:
            if roll < rate:
                fault = kind
                break
            roll -= rate
        if fault is None:
            return None, 0
        self._planned += 1
        if fault != "reset" or self._rng.random() < _IMMEDIATE_RESET_SHARE:
            return fault, 0
        return fault, self._rng.randint(1, self.reset_max_bytes)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._clients.add(writer)
        self.connections += 1
        try:
            fault, cut = (None, 0) if self._down or self._deny else self._plan()
            if self._down:
                self.injected.refused += 1
                _abort(writer)
            elif self._deny:
                await self._deny_request(reader, writer)
            elif fault == "reset" and cut == 0:
                self.injected.reset += 1
                _abort(writer)
            elif fault == "slowdown":
                await self._slow_down(reader, writer)
            elif fault == "stall":
                await self._stall(reader)
            elif fault == "lost_response":
                await self._forward(reader, writer, None, lose_response=True)
            else:
                await self._forward(reader, writer, cut if fault == "reset" else None)
        except (OSError, asyncio.IncompleteReadError):
            _abort(writer)
        except asyncio.CancelledError:
            # Only __aexit__ cancels; ending quietly keeps asyncio's
            # start_server callback from logging the cancellation as an error.
            _abort(writer)
        finally:
            writer.close()
            self._clients.discard(writer)
            self._tasks.discard(task)

    async def _slow_down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._answer(reader, writer, SLOWDOWN_HEAD, SLOWDOWN_BODY)
        self.injected.slowdown += 1
        await self._drop_the_rest(reader, writer)

    async def _deny_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self._answer(reader, writer, DENIED_HEAD, DENIED_BODY)
        self.injected.denied += 1
        await self._drop_the_rest(reader, writer)

    @staticmethod
    async def _answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, body: bytes
    ) -> None:
        """Answer the request in place of S3 once its head is in."""
        request = b""
        with contextlib.suppress(asyncio.LimitOverrunError):  # a huge head is a head too
            request = await reader.readuntil(b"\r\n\r\n")
        # The answer to HEAD has no body (a client would read it as the next answer).
        writer.write(head if request.startswith(b"HEAD ") else head + body)
        await writer.drain()

    @staticmethod
    async def _drop_the_rest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Close our side, then read and drop a body still on its way."""
        writer.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_SLOWDOWN_DRAIN_SECONDS):
                while await reader.read(_READ_SIZE):
                    pass

    async def _stall(self, reader: asyncio.StreamReader) -> None:
        self.injected.stall += 1
        # Swallow what the client sends, so it is left waiting for an answer
        # rather than blocked in a write; it may give up first.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.stall_seconds):
                while await reader.read(_READ_SIZE):
                    pass

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cut: int | None,
        *,
        lose_response: bool = False,
    ) -> None:
        """Both pumps; reset after ``cut`` request bytes or at the answer."""
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        traffic = _Traffic(asyncio.get_running_loop().time())
        answers = (
            self._pump_until_answer(up_reader, writer)
            if lose_response
            else self._pump(up_reader, writer, None, traffic, answer=True)
        )
        inspect = (self.reject_headers or self.corrupt_bodies or self.inspect) and cut is None
        try:
            async with asyncio.TaskGroup() as pumps:
                if inspect and not lose_response:
                    pumps.create_task(self._pump_requests(reader, up_writer, writer, traffic))
                else:
                    pumps.create_task(self._pump(reader, up_writer, cut, traffic, answer=False))
                pumps.create_task(answers)
                if self.idle_close_seconds is not None:
                    pumps.create_task(self._close_when_idle(traffic, self.idle_close_seconds))
        except* _Idle:
            self.injected.idle_closed += 1
        except* _Rejected:
            _abort(up_writer)
        except* _CutReached:
            if lose_response:
                self.injected.lost_response += 1
            else:
                self.injected.reset += 1
            _abort(writer)
            _abort(up_writer)
        except* (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            _abort(writer)
            _abort(up_writer)
        finally:
            up_writer.close()

    @staticmethod
    async def _pump(
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        cut: int | None,
        traffic: _Traffic,
        *,
        answer: bool,
    ) -> None:
        sent = 0
        while data := await src.read(_READ_SIZE):
            traffic.at, traffic.answered = asyncio.get_running_loop().time(), answer
            if cut is not None and sent + len(data) >= cut:
                dst.write(data[: cut - sent])
                await dst.drain()
                raise _CutReached
            dst.write(data)
            await dst.drain()
            sent += len(data)
        if dst.can_write_eof() and not dst.is_closing():
            dst.write_eof()

    async def _pump_requests(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
        traffic: _Traffic,
    ) -> None:
        """The client's requests one by one: head, then ``Content-Length``
        bytes of body, rejected or damaged as configured."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                head = await src.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
                break  # the client closed between requests
            traffic.at, traffic.answered = loop.time(), False
            names = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                names[name.strip().lower()] = value.strip()
            if any(n.startswith(p) for n in names for p in self.reject_headers):
                self.injected.rejected += 1
                # The answer to HEAD has no body (it would read as the next answer).
                client.write(
                    INVALID_HEAD if head.startswith(b"HEAD ") else INVALID_HEAD + INVALID_BODY
                )
                await client.drain()
                await self._drop_the_rest(src, client)
                raise _Rejected
            length = int(names.get(b"content-length", b"0") or 0)
            dst.write(head)
            await dst.drain()
            if length == 0:
                continue
            signed = names.get(b"x-amz-content-sha256", b"UNSIGNED-PAYLOAD")
            if length >= self.corrupt_min_bytes and len(signed) == 64:
                self.injected.signed += 1
            damage = self.corrupt_bodies > 0 and length >= self.corrupt_min_bytes
            if damage:
                self.corrupt_bodies -= 1
                self.injected.corrupted += 1
            at, left = 0, length
            while left:
                data = await src.read(min(left, _READ_SIZE))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                if damage and at <= length // 2 < at + len(data):
                    i = length // 2 - at
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                dst.write(data)
                await dst.drain()
                at, left = at + len(data), left - len(data)
                traffic.at = loop.time()
        if dst.can_write_eof() and not dst.is_closing():
            dst.write_eof()

    @staticmethod
    async def _close_when_idle(traffic: _Traffic, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            quiet = loop.time() - traffic.at
            if traffic.answered and quiet >= seconds:
                raise _Idle
            await asyncio.sleep(max(seconds - quiet, seconds / 4))

    @staticmethod
    async def _pump_until_answer(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Pass interim answers (the "100 Continue" that lets an upload's body
        go, or S3 would never do the work); cut at the final one."""
        while (head := await src.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 1"):
            dst.write(head)
            await dst.drain()
        raise _CutReached
