"""Redis round trips per event: a busy consumer group acknowledges many
messages per XACK (sent with its next read), never before their handler
returned; and concurrent ``catch_up`` calls share folds without ever
missing an entry appended before the call.

Counts come from Redis' own ``INFO commandstats`` (the private test server's,
deltas within one test), so they say what reached Redis, not what the client
meant to send.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from cefmp4.adapters.eventlog import Entry, EventLog
from cefmp4.adapters.metrics import Metrics
from cefmp4.domain.events import BytesAvailable, Event, FileSeen
from cefmp4.runtime.consumerloop import GroupConsumer
from projections.live import LiveProjection

AT = datetime(2024, 5, 17, 13, 37, 42, tzinfo=UTC)
GROUP = "testers"


def seen(n: int) -> FileSeen:
    return FileSeen(
        stream_id=f"s{n}",
        at=AT,
        path=f"/w/{n}.mp4",
        rel_path=f"{n}.mp4",
        bucket="b",
        key=f"streams/s{n}/{n}.mp4",
        size=10,
        mtime_ns=5,
        inode=n,
    )


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def calls(redis: aioredis.Redis, command: str) -> int:
    stats: dict[str, Any] = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def pending_ids(redis: aioredis.Redis, key: str) -> list[str]:
    rows = await redis.xpending_range(key, GROUP, min="-", max="+", count=10_000)
    return [_text(r["message_id"]) for r in rows]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Slow:
    """Handles ``FileSeen`` after a pause, so several finish while others wait."""

    group = GROUP
    wants: tuple[type[Event], ...] = (FileSeen,)

    def __init__(self) -> None:
        self.handled: list[str] = []

    async def handle(self, event: Event) -> None:
        await asyncio.sleep(0.01)
        self.handled.append(event.stream_id)


async def _no_failures(stream_id: str, reason: str, detail: str) -> None:
    raise AssertionError(f"unexpected failure of {stream_id}: {reason} {detail}")


def consumer(events: EventLog, handler: Slow, concurrency: int = 4) -> GroupConsumer:
    return GroupConsumer(
        events,
        handler,
        consumer="c1",
        fail=_no_failures,
        metrics=Metrics(CollectorRegistry()),
        concurrency=concurrency,
        claim_idle_seconds=30.0,
    )


async def test_a_busy_group_acknowledges_many_messages_per_xack(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}:events"
    events = EventLog(redis, key, "r1")
    handler = Slow()
    group = consumer(events, handler)
    await group.start()
    for n in range(12):  # as in a backlog: one wanted entry among unwanted ones
        await events.append(seen(n))
        for size in (20, 30, 40):
            await events.append(BytesAvailable(stream_id=f"s{n}", at=AT, size=size, mtime_ns=6))
    xack0, reads0 = await calls(redis, "xack"), await calls(redis, "xreadgroup")

    total = 0
    while handled := await group.run_once():
        total += handled
    assert total == 48

    assert sorted(handler.handled) == sorted(f"s{n}" for n in range(12))
    assert await pending_ids(redis, key) == []  # every message acknowledged in the end
    xacks = await calls(redis, "xack") - xack0
    reads = await calls(redis, "xreadgroup") - reads0
    # One XACK per handled message plus one per read, with reads of one
    # entry per free slot, was 12 + 12 XACKs and 12 reads; now the
    # acknowledgements ride on the reads (and drain sends the rest).
    assert xacks <= reads + 1, (xacks, reads)
    assert xacks + reads < 12, (xacks, reads)


async def test_nothing_is_acknowledged_before_its_handler_returned(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}:events"
    events = EventLog(redis, key, "r1")
    release = asyncio.Event()
    started = asyncio.Event()

    class Held(Slow):
        async def handle(self, event: Event) -> None:
            started.set()
            await release.wait()
            self.handled.append(event.stream_id)

    handler = Held()
    group = consumer(events, handler)
    await group.start()
    wanted = await events.append(seen(1))
    await events.append(BytesAvailable(stream_id="s1", at=AT, size=20, mtime_ns=6))
    stop = asyncio.Event()
    task = asyncio.create_task(group.run(stop, block_ms=50))
    await started.wait()
    # Polls go on (and send acknowledgements) while the handler is held.
    for _ in range(5):
        await asyncio.sleep(0.06)
        assert wanted in await pending_ids(redis, key)
    release.set()
    stop.set()
    await task
    assert handler.handled == ["s1"]
    assert await pending_ids(redis, key) == []


async def test_a_message_handled_while_the_loop_blocks_is_acknowledged_at_once(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}:events"
    events = EventLog(redis, key, "r1")
    handler = Slow()
    group = consumer(events, handler)
    await group.start()
    stop = asyncio.Event()
    # The loop blocks for a minute at a time; the acknowledgement must not
    # wait for the block to end.
    task = asyncio.create_task(group.run(stop, block_ms=60_000))
    try:
        async with asyncio.timeout(20):  # until the loop is in its blocking read
            while not group._blocking:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        await events.append(seen(1))
        async with asyncio.timeout(20):
            while handler.handled != ["s1"] or await pending_ids(redis, key):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await events.append(seen(2))  # ends the block
        await task


class HeldRead(EventLog):
    """``read_after`` reads, then waits for ``go`` before returning: a fold in flight."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold = False
        self.read_done = asyncio.Event()
        self.go = asyncio.Event()

    async def read_after(self, last_id: str, count: int = 10_000) -> list[Entry]:
        entries = await super().read_after(last_id, count)
        if self.hold:
            self.hold = False
            self.read_done.set()
            await self.go.wait()
        return entries


async def test_a_catch_up_is_not_served_by_a_fold_that_began_before_it(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    events = HeldRead(redis, f"{key_prefix}:events", "r1")
    projection = LiveProjection(events)
    await events.append(seen(1))
    events.hold = True
    first = asyncio.create_task(projection.catch_up())
    await events.read_done.wait()  # the first fold has read: without s2
    await events.append(seen(2))
    second = asyncio.create_task(projection.catch_up())
    await asyncio.sleep(0)
    events.go.set()
    await first
    state = await second
    assert set(state.streams) == {"s1", "s2"}


async def test_concurrent_catch_ups_share_folds_and_see_everything_before_them(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    events = EventLog(redis, f"{key_prefix}:events", "r1")
    projection = LiveProjection(events)
    await projection.catch_up()
    for n in range(5):
        await events.append(seen(n))
    xreads0 = await calls(redis, "xread")
    states = await asyncio.gather(*(projection.catch_up() for _ in range(20)))
    assert all(set(s.streams) == {f"s{n}" for n in range(5)} for s in states)
    # The first folds; the 19 that queued behind it share the next one.
    assert await calls(redis, "xread") - xreads0 <= 2
