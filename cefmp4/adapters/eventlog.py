"""Redis Streams adapter: the event log and its consumer groups.

The narrow surface the rest of the code uses: append a fact, read facts after
an id (every replica's projection follower), and the consumer-group verbs
(read new, claim stale, ack). Library exceptions are translated here:
connection problems and timeouts are transient and retried until Redis is back
(the facts are not lost meanwhile: the files are still on disk and the
unacknowledged messages stay pending); anything else is permanent.

Contract, for every method below: a Redis connection problem, timeout or AOF
replay is retried until Redis answers (the call waits, it does not raise
``TransientError``, unless the task is cancelled); any other Redis refusal is a
``PermanentError`` with reason ``redis_error`` (e.g. XADD or XREADGROUP on a
key that is not a stream, or XREADGROUP of a group that does not exist).
The plain reads (``read_after``, ``read_raw_after``, ``wait_raw_after``) of a
log that does not exist yet answer as for an empty one. Entry ids
are Redis stream ids (``"<ms>-<seq>"``), strictly increasing in append order.
``tests/contracts/eventlog.py`` pins the append-and-read part; the consumer
group verbs are covered by the consumer loop's tests against Redis.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as rexc

from cefmp4.adapters.retry import transient
from cefmp4.domain.archive_format import RawEntry, raw_entry
from cefmp4.domain.entryids import ZERO_ID
from cefmp4.domain.errors import PermanentError, TransientError
from cefmp4.domain.events import CODEC, Codec, Event, UnknownEvent, encode

T = TypeVar("T")
Entry = tuple[str, Event | UnknownEvent]


async def call_redis(op: Callable[[], Awaitable[T]], attempts: int | None) -> T:
    """Run a Redis operation with the project's error translation and retries
    (``attempts=None``: until Redis answers or the task is cancelled)."""
    async for attempt in transient(attempts=attempts):
        with attempt:
            try:
                return await op()
            except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
                raise TransientError(f"redis: {exc}") from exc
            except rexc.BusyLoadingError as exc:  # restarted Redis replaying its AOF
                raise TransientError(f"redis: {exc}") from exc
            except rexc.RedisError as exc:
                raise PermanentError(f"redis: {exc}", reason="redis_error") from exc
    raise AssertionError("unreachable: tenacity reraises")


def _unparsed(response: Any, **_options: Any) -> Any:
    return response


def _raw_entries(entries: list[tuple[bytes, list[bytes]]]) -> list[RawEntry]:
    return [
        raw_entry(entry_id.decode(), dict(zip(it := iter(flat), it, strict=True)))
        for entry_id, flat in entries
    ]


class EventLog:
    def __init__(
        self, redis: aioredis.Redis, key: str, replica: str, *, codec: Codec = CODEC
    ) -> None:
        self._redis = redis
        self.key = key
        self.replica = replica
        # The event types (and versions) this replica reads; a test injects
        # another to play an older or newer replica against the same log.
        self._decode = codec.decode
        # The replay reads the whole log; redis-py's XREAD post-processing
        # (a dict per entry, in Python) was most of its cost. A second client
        # on the same pool takes the raw reply, leaving the shared one as is.
        self._raw = aioredis.Redis(connection_pool=redis.connection_pool)
        self._raw.set_response_callback("XREAD", _unparsed)
        self._raw.set_response_callback("XRANGE", _unparsed)

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        return await call_redis(op, attempts=None)

    async def append(self, event: Event) -> str:
        """Append ``event`` (stamped with this replica) and return its entry
        id, greater than every id before. Not idempotent: each call is a new
        entry (a retry after a lost answer can append twice). Appends about
        a stream that a process holds go through ``leases.Fence.append``
        instead, which adds the lease check."""
        fields = encode(event, self.replica)
        entry_id = await self._call(lambda: self._redis.xadd(self.key, fields))  # type: ignore[arg-type]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def read_after(self, last_id: str, count: int = 10_000) -> list[Entry]:
        """Up to ``count`` entries with id > ``last_id``, oldest first, decoded
        (an entry this code cannot decode is an ``UnknownEvent``, not an
        error); ``[]`` when there are none (or no log). ``"0-0"`` reads from
        the start; ``last_id`` need not be an id in the log. Never blocks:
        the follower's catch-up read. Reads only."""
        raw: Any = await self._call(
            lambda: self._raw.execute_command(  # type: ignore[no-untyped-call]
                "XREAD", "COUNT", count, "STREAMS", self.key, last_id
            )
        )
        if not raw:
            return []
        # RESP2: [[key, entries]]; RESP3: {key: entries}; an entry is
        # [id, [field, value, ...]].
        entries = next(iter(raw.values())) if isinstance(raw, dict) else raw[0][1]
        return [
            (entry_id.decode(), self._decode(dict(zip(it := iter(flat), it, strict=True))))
            for entry_id, flat in entries
        ]

    async def read_raw_after(
        self, last_id: str, count: int, until: str | None = None
    ) -> list[RawEntry]:
        """Up to ``count`` entries with ``last_id`` < id (< ``until`` if given),
        undecoded (``archive_format.RawEntry``): what the archive stores and
        ``cefmp4 events`` prints, so entries of unknown types come through too.
        Oldest first; ``[]`` when there are none. Never blocks. Reads only."""
        if until == ZERO_ID:
            return []  # nothing is below 0-0, and "(0-0" is not a valid XRANGE end
        end = "+" if until is None else f"({until}"
        raw: Any = await self._call(
            lambda: self._raw.execute_command(  # type: ignore[no-untyped-call]
                "XRANGE", self.key, f"({last_id}", end, "COUNT", count
            )
        )
        return _raw_entries(raw or [])

    async def wait_raw_after(self, last_id: str, count: int, block_ms: int) -> list[RawEntry]:
        """Like :meth:`read_raw_after` without a bound, but waits up to
        ``block_ms`` for a first entry (XREAD BLOCK): a tail that follows.
        ``[]`` when none came within ``block_ms``. Reads only."""
        raw: Any = await self._call(
            lambda: self._raw.execute_command(  # type: ignore[no-untyped-call]
                "XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", self.key, last_id
            )
        )
        if not raw:
            return []
        return _raw_entries(next(iter(raw.values())) if isinstance(raw, dict) else raw[0][1])

    async def ensure_group(self, group: str) -> None:
        """Create ``group`` at the start of the log, so a new deployment acts on
        everything already recorded; an existing group is left as it is
        (idempotent). Creates the log (empty) if there is none yet."""

        async def create() -> None:
            try:
                await self._redis.xgroup_create(self.key, group, id="0", mkstream=True)
            except rexc.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        await self._call(create)

    async def read_group(
        self, group: str, consumer: str, count: int, block_ms: int | None
    ) -> list[Entry]:
        """Up to ``count`` entries never delivered to ``group`` before, oldest
        first; they become pending for ``consumer`` until acknowledged. Waits
        up to ``block_ms`` for one when there are none (``None``: does not
        wait); ``[]`` if none came. Not idempotent: an entry is delivered once
        this way (again only through :meth:`claim_stale`). A group that does
        not exist is a ``PermanentError`` (NOGROUP): call ``ensure_group``."""
        raw: Any = await self._call(
            lambda: self._redis.xreadgroup(
                group, consumer, {self.key: ">"}, count=count, block=block_ms
            )
        )
        return self._entries(raw[0][1]) if raw else []

    async def ack_and_read(
        self,
        group: str,
        consumer: str,
        acks: Sequence[str],
        count: int,
        block_ms: int | None,
    ) -> list[Entry]:
        """XACK ``acks``, then XREADGROUP as :meth:`read_group`, in one round
        trip (a pipeline, not a transaction: an XACK that took effect before a
        failed read is acknowledged for good, and acknowledging it again on
        the retry is a no-op)."""
        if not acks:
            return await self.read_group(group, consumer, count, block_ms)

        async def both() -> Any:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xack(self.key, group, *acks)
                pipe.xreadgroup(group, consumer, {self.key: ">"}, count=count, block=block_ms)
                return await pipe.execute()

        _acked, raw = await self._call(both)
        return self._entries(raw[0][1]) if raw else []

    def _entries(self, raw: list[tuple[bytes, dict[bytes, bytes]]]) -> list[Entry]:
        return [(entry_id.decode(), self._decode(fields)) for entry_id, fields in raw]

    async def claim_stale(
        self, group: str, consumer: str, min_idle_ms: int, count: int, start_id: str = "0-0"
    ) -> tuple[str, list[Entry]]:
        """Take over messages another (dead) consumer left pending too long.

        One page of a pass over the group's pending entries, from ``start_id``:
        returns the cursor to continue from (``"0-0"`` once the pass reached
        the end) and the entries claimed. Redis scans at most ten times
        ``count`` pending entries per call, so a long backlog takes several.
        Claimed entries are pending for ``consumer`` with their idle time
        reset and their delivery count raised; entries trimmed from the log
        while pending are not returned.
        """
        reply = await self._call(
            lambda: self._redis.xautoclaim(
                self.key, group, consumer, min_idle_time=min_idle_ms, start_id=start_id, count=count
            )
        )
        # [next_id, entries, deleted_ids]; entries of trimmed messages are None
        cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        return cursor, self._entries([e for e in reply[1] if e and e[1] is not None])

    async def release(self, group: str, consumer: str, idle_ms: int, *entry_ids: str) -> None:
        """Leave entries pending but claimable at once by any consumer.

        For entries this replica cannot read: it keeps them (XCLAIM to itself,
        delivery count unchanged) with their idle time set to ``idle_ms``, so
        the next claim pass of any replica - a newer one, say - takes them
        rather than waiting for this one's claim to go stale again.
        Idempotent; no entry ids: no call. Ids that are not pending are
        ignored.
        """
        if entry_ids:
            await self._call(
                lambda: self._redis.xclaim(
                    self.key, group, consumer, 0, list(entry_ids), idle=idle_ms, justid=True
                )
            )

    async def ack(self, group: str, *entry_ids: str) -> None:
        """Acknowledge: the entries are no longer pending for ``group`` and
        are never delivered to it again. Idempotent (acknowledging an entry
        that is not pending does nothing); no entry ids: no call."""
        if entry_ids:
            await self._call(lambda: self._redis.xack(self.key, group, *entry_ids))
