"""In-memory stand-ins for the Redis side of a handler: the log and the leases.

``MemoryEventLog`` is the append-and-read part of ``EventLog`` (what the live
projection and ``Deps.emit`` use); it passes ``tests/contracts/eventlog.py``
together with the real one. Consumer groups are not modelled: a fast test
calls a handler's ``handle`` directly, and the loop is tested against Redis.
``MemoryLeases`` gives each stream a lease that stays held unless a test
takes it away (``lose``), so the fencing paths run without Redis.
Entries go through the real codec, so what a handler appends is what Redis
would store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from cefmp4.adapters.eventlog import Entry
from cefmp4.adapters.leases import LeaseLost
from cefmp4.adapters.streamlocks import StreamLocks
from cefmp4.domain.archive_format import RawEntry, raw_entry
from cefmp4.domain.entryids import parse_id
from cefmp4.domain.events import CODEC, Event, encode


class MemoryEventLog:
    def __init__(self, key: str = "events", replica: str = "test") -> None:
        self.key = key
        self.replica = replica
        self._entries: list[tuple[str, Mapping[bytes, bytes]]] = []
        self._seq = 0

    async def append(self, event: Event) -> str:
        return self.append_fields(encode(event, self.replica))

    def append_fields(self, fields: Mapping[str, bytes]) -> str:
        self._seq += 1
        entry_id = f"1-{self._seq}"
        self._entries.append((entry_id, {k.encode(): v for k, v in fields.items()}))
        return entry_id

    def _after(self, last_id: str) -> list[tuple[str, Mapping[bytes, bytes]]]:
        after = parse_id(last_id)
        return [(i, f) for i, f in self._entries if parse_id(i) > after]

    async def read_after(self, last_id: str, count: int = 10_000) -> list[Entry]:
        await asyncio.sleep(0)
        return [(i, CODEC.decode(f)) for i, f in self._after(last_id)[:count]]

    async def read_raw_after(
        self, last_id: str, count: int, until: str | None = None
    ) -> list[RawEntry]:
        await asyncio.sleep(0)
        entries = self._after(last_id)
        if until is not None:
            entries = [(i, f) for i, f in entries if parse_id(i) < parse_id(until)]
        return [raw_entry(i, f) for i, f in entries[:count]]

    @property
    def events(self) -> list[Event]:
        """Every decodable event appended so far, in order (for assertions)."""
        decoded = [CODEC.decode(f) for _, f in self._entries]
        return [e for e in decoded if isinstance(e, Event)]


class MemoryLease:
    def __init__(self, key: str) -> None:
        self.key = key
        self.token: str | None = "memory"

    async def check(self) -> None:
        await asyncio.sleep(0)
        if self.token is None:
            raise LeaseLost(self.key)


class MemoryFence:
    """``leases.Fence`` over a MemoryEventLog: appends only while the lease holds."""

    def __init__(self, log: MemoryEventLog, lease: MemoryLease) -> None:
        self._log = log
        self.lease = lease

    async def append(self, event: Event, replica: str) -> str:
        await asyncio.sleep(0)
        if self.lease.token is None:
            raise LeaseLost(f"{self.lease.key}: append refused, lease moved on")
        return self._log.append_fields(encode(event, replica))


class MemoryLeases:
    """``leases.StreamLeases`` for one process: the local lock, a lease per hold."""

    def __init__(self, log: MemoryEventLog) -> None:
        self.log = log  # where its fences append
        self._local = StreamLocks()
        self.lost: set[str] = set()  # streams whose next lease is lost at once
        self._held: dict[str, MemoryLease] = {}

    def lose(self, stream_id: str) -> None:
        """The next hold of ``stream_id`` finds its lease taken by another replica."""
        self.lost.add(stream_id)

    def expire(self, stream_id: str) -> None:
        """The lease held now on ``stream_id`` expires (a pause past its TTL)."""
        self._held[stream_id].token = None

    @contextlib.asynccontextmanager
    async def hold(self, stream_id: str) -> AsyncIterator[MemoryFence]:
        async with self._local.hold(stream_id):
            lease = MemoryLease(f"lease:stream:{stream_id}")
            if stream_id in self.lost:
                lease.token = None
            self._held[stream_id] = lease
            try:
                yield MemoryFence(self.log, lease)
            finally:
                del self._held[stream_id]
