"""Leases in Redis: who may watch the directory, who may act on a stream.

A lease is a key holding the owner's token, set with ``SET NX PX ttl`` and
renewed by its holder while alive; renew and release are compare-and-set Lua
scripts, so a holder whose lease expired cannot extend or drop the new
holder's. A token is the owner's name plus 64 random bits, new at every
acquisition, so no two holders (not even one process before and after a
restart with the same ``REPLICA_ID``) ever share one; the lease key is the
only key a lease leaves in Redis, and it expires with its TTL (a per-stream
counter would have left one key per recording forever). Every event a
stream's holder appends goes through :meth:`Fence.append`, a script that
appends only if the lease still holds that exact token. A replica that lost its lease (a
long pause, a partition) therefore cannot record a completion or a failure,
and before the two S3 calls that end an upload (complete, abort) it checks the
lease once more. The store cannot check tokens itself; the remaining window is
the time between that check and the call (milliseconds, against a TTL of
seconds), and the effects in it are idempotent.

When Redis is unreachable, renewals fail and the holder treats the lease as
lost once its TTL has passed locally: it stops, and another replica (or itself
later) takes over. The files on disk stay the source of truth meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis
import redis.exceptions as rexc
import structlog

from cefmp4.adapters.eventlog import call_redis
from cefmp4.adapters.streamlocks import StreamLocks
from cefmp4.domain.errors import TransientError
from cefmp4.domain.events import Event, encode

log = structlog.get_logger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS: lease, stream. ARGV: token, then field/value pairs for XADD.
_FENCED_XADD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return false
end
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
"""

REDIS_ERRORS = (rexc.ConnectionError, rexc.TimeoutError, OSError)


class LeaseLost(TransientError):
    """This process no longer holds the lease; another replica may act."""

    retry_now = False


class LeaseBusy(TransientError):
    """Another replica holds the lease; the message stays pending for later."""

    retry_now = False


class Lease:
    """One lease key in Redis (see the module docstring).

    :param redis: where the key lives.
    :param key: the lease key, e.g. ``<prefix>:lease:watcher``.
    :param owner: this replica's name, the start of every token.
    :param ttl: seconds the lease lasts unless renewed.
    :param monotonic: the local clock that says when an unrenewed lease is lost.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        key: str,
        owner: str,
        ttl: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self.key = key
        self.owner = owner
        self.ttl = ttl
        self._clock = monotonic
        self.token: str | None = None
        self._valid_until = 0.0

    @property
    def held(self) -> bool:
        """Held as far as this process can tell without asking Redis."""
        return self.token is not None and self._clock() < self._valid_until

    async def acquire(self) -> bool:
        try:
            token = f"{self.owner}:{secrets.token_hex(8)}"
            started = self._clock()
            if await self._redis.set(self.key, token, nx=True, px=int(self.ttl * 1000)):
                self.token = token
                self._valid_until = started + self.ttl
                return True
        except REDIS_ERRORS as exc:
            log.warning("lease acquire failed", key=self.key, error=str(exc))
        return False

    async def renew(self) -> bool:
        if self.token is None:
            return False
        started = self._clock()
        try:
            ok = await self._redis.eval(_RENEW, 1, self.key, self.token, int(self.ttl * 1000))
        except REDIS_ERRORS as exc:
            log.warning("lease renewal failed", key=self.key, error=str(exc))
            return self.held
        if ok:
            self._valid_until = started + self.ttl
            return True
        log.warning("lease lost to another replica", key=self.key)
        self.token = None
        return False

    async def release(self) -> None:
        token, self.token = self.token, None
        if token is None:
            return
        with contextlib.suppress(*REDIS_ERRORS):
            await self._redis.eval(_RELEASE, 1, self.key, token)

    async def check(self) -> None:
        """Raise LeaseLost unless Redis confirms we still hold the lease."""
        token = self.token
        if token is None:
            raise LeaseLost(self.key)
        try:
            current = await self._redis.get(self.key)
        except REDIS_ERRORS as exc:
            raise LeaseLost(f"{self.key}: cannot confirm: {exc}") from exc
        if isinstance(current, bytes):
            current = current.decode()
        # Compare with the token we asked about, not with self.token: the
        # renewer may drop that to None while the GET is in flight, and a key
        # that is gone (None) must not then pass as "still ours".
        if current != token:
            self.token = None
            raise LeaseLost(self.key)

    @contextlib.asynccontextmanager
    async def kept(self) -> AsyncIterator[asyncio.Event]:
        """Renew every TTL/3 while the body runs; the yielded event is set if
        the lease is lost meanwhile. Released on exit."""
        lost = asyncio.Event()
        done = asyncio.Event()

        # Stopped by an event, not by cancel(): redis-py can swallow a
        # cancellation that lands inside a command, which left the renewer
        # running (and its owner waiting for it) forever.
        async def renew_forever() -> None:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.ttl / 3):
                        await done.wait()
                if done.is_set():
                    return
                if not await self.renew():
                    lost.set()
                    return

        renewer = asyncio.create_task(renew_forever())
        try:
            yield lost
        finally:
            done.set()
            await renewer
            await self.release()


class Fence:
    """Appends for one stream, accepted only while ``lease`` is ours."""

    def __init__(self, redis: aioredis.Redis, events_key: str, lease: Lease) -> None:
        self._redis = redis
        self._events_key = events_key
        self.lease = lease

    async def append(self, event: Event, replica: str) -> str:
        """Append while the lease holds; Redis blips are retried (the lease's
        own TTL bounds how long that can go on: then the script refuses)."""
        token = self.lease.token
        if token is None:
            raise LeaseLost(self.lease.key)
        argv: list[bytes | str] = [token]
        for name, value in encode(event, replica).items():
            argv += [name, value]
        entry_id = await call_redis(
            lambda: self._redis.eval(_FENCED_XADD, 2, self.lease.key, self._events_key, *argv),
            attempts=None,
        )
        if entry_id is None:
            self.lease.token = None
            raise LeaseLost(f"{self.lease.key}: append refused, lease moved on")
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


class StreamLeases:
    """One actor per stream: :meth:`hold` takes the stream's lock
    (``StreamLocks``, tasks of this process) and then its Redis lease (other
    replicas), keeps the lease renewed and yields the stream's Fence.

    :param redis: where the leases live.
    :param key_prefix: ``REDIS_KEY_PREFIX``; a stream's lease is
        ``<prefix>:lease:stream:<stream id>``.
    :param events_key: the event stream the Fence appends to.
    :param owner: this replica's name, the start of every token.
    :param ttl: the lease TTL in seconds; also how long ``hold`` waits for a
        lease held elsewhere before it raises ``LeaseBusy``.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        key_prefix: str,
        events_key: str,
        owner: str,
        ttl: float,
    ) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._events_key = events_key
        self._owner = owner
        self._ttl = ttl
        self._locks = StreamLocks()

    @contextlib.asynccontextmanager
    async def hold(self, stream_id: str) -> AsyncIterator[Fence]:
        async with self._locks.hold(stream_id):
            lease = Lease(self._redis, f"{self._prefix}:lease:stream:{stream_id}", self._owner,
                          self._ttl)  # fmt: skip
            # Wait up to one TTL: long enough for the lease of a crashed holder
            # (e.g. this replica before a restart) to expire, short enough not
            # to tie up a consumer slot behind a live holder's long upload.
            deadline = time.monotonic() + self._ttl
            delay = 0.05
            while not await lease.acquire():
                if time.monotonic() > deadline:
                    raise LeaseBusy(f"stream {stream_id} is being worked on elsewhere")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            async with lease.kept():
                yield Fence(self._redis, self._events_key, lease)
