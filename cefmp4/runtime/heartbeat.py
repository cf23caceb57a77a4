"""Per-replica heartbeat: each running replica says who it is and how it is.

Why
---
``cefmp4 status`` answers "which replicas are alive, which one watches, is
anything blocked and why" for an operator who has only Redis to look at. The
log records facts about recordings, not about processes, and the leases say
only who holds what right now; so every replica also publishes a small
record of its own state.

Design
------
* One key per replica, ``<prefix>:replica:<replica_id>``, holding a msgspec
  JSON :class:`ReplicaState`, written every ``LEASE_TTL_SECONDS / 3`` with
  ``PX = 3 x LEASE_TTL``: a replica that dies (kill -9, a partition) vanishes
  from ``status`` within three TTLs without anyone cleaning up; one that stops
  cleanly deletes its key on the way out.
* The writer knows nothing about the service: it is handed ``state()``, a
  callable returning the replica's current :class:`ReplicaState` (a pure
  struct), and stamps it with ``at`` (the injected clock) when it writes. The
  service builds that struct from what it owns: its start time, when it last
  sent bytes to S3, its ``Blocked`` state, whether it holds the watcher lease.
* Best effort by design: a heartbeat that cannot be written (Redis away) is
  skipped with a warning and tried again next period; the key expiring meanwhile
  is the truth ("this replica cannot reach Redis"). It never stops the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog

from cefmp4.adapters.eventlog import call_redis
from cefmp4.domain.config import Config
from cefmp4.domain.errors import CefError
from consumers.deps import utcnow

log = structlog.get_logger(__name__)


class BlockedState(msgspec.Struct, frozen=True, kw_only=True):
    """Why this replica's S3 calls wait (``cefmp4.adapters.blocked.Blocked``)."""

    cause: str  # credentials | permissions | clock_skew | no_bucket | ...
    since: datetime
    message: str  # S3's own words when the cause started


class ReplicaState(msgspec.Struct, frozen=True, kw_only=True):
    replica: str
    version: str
    started_at: datetime
    last_upload_at: datetime | None = None  # the last part or object sent to S3
    blocked: BlockedState | None = None
    watching: bool = False  # holds the watcher lease
    at: datetime | None = None  # when this heartbeat was written (set by the writer)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ReplicaState)


def replica_key(key_prefix: str, replica: str) -> str:
    return f"{key_prefix}:replica:{replica}"


def replica_pattern(key_prefix: str) -> str:
    """SCAN MATCH pattern of every replica's key (the prefix's glob characters escaped)."""
    escaped = "".join(f"\\{c}" if c in "*?[]\\" else c for c in key_prefix)
    return f"{escaped}:replica:*"


def encode_state(state: ReplicaState) -> bytes:
    return _encoder.encode(state)


def decode_state(raw: bytes) -> ReplicaState | None:
    """None for a value this build cannot read (written by a much newer one)."""
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError:
        return None


def package_version() -> str:
    try:
        return importlib.metadata.version("cefmp4")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Heartbeat:
    """Writes ``state()`` to ``<prefix>:replica:<replica>`` every TTL/3 until stopped."""

    def __init__(
        self,
        redis: aioredis.Redis,
        config: Config,
        state: Callable[[], ReplicaState],
        *,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self._redis = redis
        self._state = state
        self._now = now
        self.key = replica_key(config.redis_key_prefix, config.replica)
        self.period = config.lease_ttl_seconds / 3
        self._expire_ms = int(config.lease_ttl_seconds * 3 * 1000)
        self._changed = asyncio.Event()

    def changed(self) -> None:
        """The state changed (the watcher lease was taken or lost): write now,
        not at the next period, so ``status`` is not a period behind."""
        self._changed.set()

    async def beat(self) -> None:
        """Write one heartbeat (one attempt; raises CefError when Redis fails)."""
        value = encode_state(msgspec.structs.replace(self._state(), at=self._now()))
        await call_redis(lambda: self._redis.set(self.key, value, px=self._expire_ms), attempts=1)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.beat()
            except CefError as exc:  # the key expiring is the truth meanwhile
                log.warning("heartbeat not written", key=self.key, error=str(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.period):
                    await _first(stop, self._changed)
            self._changed.clear()
        # A clean stop leaves at once rather than after 3 TTLs.
        with contextlib.suppress(CefError):
            await call_redis(lambda: self._redis.delete(self.key), attempts=1)


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def read_heartbeats(
    redis: aioredis.Redis, key_prefix: str, *, attempts: int = 3
) -> list[ReplicaState]:
    """Every replica's current heartbeat, by replica id (readable ones only)."""

    async def read() -> list[Any]:
        pattern = replica_pattern(key_prefix)
        keys = [k async for k in redis.scan_iter(match=pattern, count=1000)]
        return list(await redis.mget(keys)) if keys else []

    values = await call_redis(read, attempts=attempts)
    states = [decode_state(v if isinstance(v, bytes) else str(v).encode())
              for v in values if v is not None]  # fmt: skip
    return sorted((s for s in states if s is not None), key=lambda s: s.replica)
