"""The EventLog contract, append-and-read part: what the live projection,
``Deps.emit``, the archive and ``cefmp4 events`` rely on.

Subclass :class:`EventLogContract` and give it a ``log`` fixture: an empty
log. ``tests/test_eventlog_contract.py`` runs it against ``EventLog`` on the
session's Redis and against ``tests.contracts.memorylog.MemoryEventLog``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

import pytest

from cefmp4.adapters.eventlog import Entry
from cefmp4.domain.archive_format import RawEntry
from cefmp4.domain.entryids import ZERO_ID, parse_id
from cefmp4.domain.events import Event, StreamIdle, UnknownEvent


class AppendReadLog(Protocol):
    replica: str

    async def append(self, event: Event) -> str: ...

    async def read_after(self, last_id: str, count: int = 10_000) -> list[Entry]: ...

    async def read_raw_after(
        self, last_id: str, count: int, until: str | None = None
    ) -> list[RawEntry]: ...


def idle(n: int) -> StreamIdle:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return StreamIdle(
        stream_id=f"s{n}", at=at, size=n, mtime_ns=n, reason="settled", mp4="complete"
    )


class EventLogContract:
    @pytest.fixture
    def log(self) -> AppendReadLog:
        raise NotImplementedError("an EventLogContract subclass provides the log fixture")

    async def test_an_empty_log_reads_nothing(self, log: AppendReadLog) -> None:
        assert await log.read_after(ZERO_ID) == []
        assert await log.read_raw_after(ZERO_ID, 10) == []

    async def test_append_returns_increasing_ids_and_reads_return_the_events(
        self, log: AppendReadLog
    ) -> None:
        events = [idle(n) for n in range(5)]
        ids = [await log.append(e) for e in events]
        assert [parse_id(i) for i in ids] == sorted({parse_id(i) for i in ids})  # increasing
        read = await log.read_after(ZERO_ID)
        assert read == list(zip(ids, events, strict=True))
        assert not any(isinstance(e, UnknownEvent) for _, e in read)

    async def test_read_after_starts_after_the_id_and_stops_at_count(
        self, log: AppendReadLog
    ) -> None:
        ids = [await log.append(idle(n)) for n in range(6)]
        assert [i for i, _ in await log.read_after(ids[2])] == ids[3:]
        assert [i for i, _ in await log.read_after(ids[0], count=2)] == ids[1:3]
        assert await log.read_after(ids[-1]) == []
        # an id that is not in the log: just before the first entry
        ms, _ = ids[0].split("-")
        assert [i for i, _ in await log.read_after(f"{int(ms) - 1}-999")] == ids

    async def test_read_raw_after_is_bounded_by_until(self, log: AppendReadLog) -> None:
        ids = [await log.append(idle(n)) for n in range(5)]
        raw = await log.read_raw_after(ids[0], 10, until=ids[3])
        assert [r.id for r in raw] == ids[1:3]
        assert [(r.type, r.replica) for r in raw] == [("StreamIdle", log.replica)] * 2
        assert [r.id for r in await log.read_raw_after(ZERO_ID, 2)] == ids[:2]
        assert await log.read_raw_after(ZERO_ID, 10, until=ZERO_ID) == []
        assert [r.id for r in await log.read_raw_after(ids[3], 10)] == ids[4:]
