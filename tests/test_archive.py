"""The event archive (``cefmp4.adapters.archive``) on a real Redis and a real S3 store.

What must hold:

* ``archive_through`` archives exactly the entries below the bound that are
  not archived yet, in segments of at most the given size, returns the newest
  archived id exactly, and writes nothing on a second call;
* after Redis trims what was archived, archiving carries on where the archive
  ends, and ``read`` gives the whole log, each entry once, in id order;
* ``archived_through`` comes from the bucket (a fresh archive object agrees),
  lists incrementally, and takes the greatest last id, not the last key;
* ``read`` deduplicates overlapping segments and fetches no segment that
  ends at or before ``after``;
* entries of unknown types or with undecodable data are archived as they are.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from cefmp4.adapters.archive import EventArchive, archive_through
from cefmp4.adapters.eventlog import EventLog
from cefmp4.adapters.storage import ObjectStore
from cefmp4.domain.archive_format import RawEntry, parse_segment_key, segment_key
from cefmp4.domain.config import Config
from cefmp4.domain.events import BytesAvailable
from cefmp4.runtime.service import connect

AT = datetime(2026, 1, 1, tzinfo=UTC)


class SpyStore:
    """The real store, recording which keys were fetched and where listings started."""

    def __init__(self, store: ObjectStore) -> None:
        self.real = store
        self.bucket = store.bucket
        self.fetched: list[str] = []
        self.listed_after: list[str] = []

    async def list_keys(self, prefix: str, start_after: str = "") -> list[str]:
        self.listed_after.append(start_after)
        return await self.real.list_keys(prefix, start_after)

    async def get_object(self, key: str) -> bytes | None:
        self.fetched.append(key)
        return await self.real.get_object(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class Setup:
    def __init__(self, config: Config, redis: aioredis.Redis, store: ObjectStore) -> None:
        self.config = config
        self.redis = redis
        self.store = SpyStore(store)
        self.log = EventLog(redis, config.events_key, "test")
        self.archive = EventArchive(self.store, config.event_archive_prefix)

    async def append(self, n: int, stream: str = "s1") -> list[str]:
        return [
            await self.log.append(BytesAvailable(stream_id=stream, at=AT, size=i, mtime_ns=i))
            for i in range(n)
        ]

    async def redis_entries(self) -> list[RawEntry]:
        return await self.log.read_raw_after("0-0", 1_000_000)

    async def archived(self, after: str = "0-0") -> list[RawEntry]:
        return [e async for e in self.archive.read(after)]


@pytest.fixture
async def setup(make_config: Callable[..., Config]) -> AsyncIterator[Setup]:
    config = make_config()
    async with connect(config) as (redis, store):
        yield Setup(config, redis, store)


async def segment_spans(s: Setup) -> list[tuple[str, str]]:
    keys = await s.store.real.list_keys(s.archive.prefix)
    spans = [parse_segment_key(s.archive.prefix, k) for k in keys]
    assert None not in spans
    return [span for span in spans if span is not None]


async def test_archive_through_archives_below_the_bound_once(setup: Setup) -> None:
    s = setup
    assert await s.archive.archived_through() == "0-0"
    ids = await s.append(25)
    through = await archive_through(s.log, s.archive, ids[20], max_segment_entries=7)
    assert through == ids[19]  # exact: the newest id archived, bound excluded
    assert await segment_spans(s) == [(ids[0], ids[6]), (ids[7], ids[13]), (ids[14], ids[19])]
    assert await s.archived() == (await s.redis_entries())[:20]
    # Idempotent, also for a fresh archive object (the bucket is the truth).
    assert await archive_through(s.log, s.archive, ids[20], max_segment_entries=7) == ids[19]
    again = EventArchive(s.store, s.archive.prefix)
    assert await archive_through(s.log, again, ids[20], max_segment_entries=7) == ids[19]
    assert len(await segment_spans(s)) == 3


async def test_nothing_to_archive(setup: Setup) -> None:
    s = setup
    assert await archive_through(s.log, s.archive, "0-0") == "0-0"
    ids = await s.append(3)
    assert await archive_through(s.log, s.archive, ids[0]) == "0-0"
    assert await segment_spans(s) == []
    assert await s.archived() == []


async def test_trimmed_log_plus_archive_is_the_whole_log(setup: Setup) -> None:
    s = setup
    ids = await s.append(30)
    whole = await s.redis_entries()
    through = await archive_through(s.log, s.archive, ids[12], max_segment_entries=5)
    assert through == ids[11]
    await s.redis.xtrim(s.config.events_key, minid=ids[12], approximate=False)
    ids += await s.append(5)
    whole += (await s.redis_entries())[-5:]
    # The next round starts where the archive ends (Redis no longer has the start).
    assert await archive_through(s.log, s.archive, ids[33], max_segment_entries=5) == ids[32]
    await s.redis.xtrim(s.config.events_key, minid=ids[33], approximate=False)
    assert [e.id for e in await s.redis_entries()] == ids[33:]
    assert await s.archived() == whole[:33]
    spans = await segment_spans(s)
    assert spans[0][0] == ids[0] and spans[-1][1] == ids[32]
    for (_, last), (first, _) in itertools.pairwise(spans):
        assert ids.index(first) == ids.index(last) + 1  # contiguous, no overlap


async def test_archived_through_lists_incrementally_and_takes_the_greatest_last_id(
    setup: Setup,
) -> None:
    s = setup
    ids = await s.append(12)
    entries = await s.redis_entries()
    assert await s.archive.write(entries[:10]) == segment_key(s.archive.prefix, ids[0], ids[9])
    assert await s.archive.archived_through() == ids[9]
    # A racing archiver with an older view wrote a shorter overlapping segment,
    # whose key sorts after the longer one: the answer stays the greatest last id.
    second = await s.archive.write(entries[5:8])
    assert await s.archive.archived_through() == ids[9]
    s.store.listed_after.clear()
    assert await s.archive.archived_through() == ids[9]
    assert s.store.listed_after == [second]  # only the keys after the last one seen
    assert await s.archive.write([]) is None


async def test_read_dedupes_overlaps_and_skips_segments_by_key(setup: Setup) -> None:
    s = setup
    ids = await s.append(20)
    entries = await s.redis_entries()
    for lo, hi in [(0, 10), (5, 15), (14, 20), (0, 10), (14, 16)]:
        await s.archive.write(entries[lo:hi])
    assert await s.archived() == entries
    s.store.fetched.clear()
    assert await s.archived(after=ids[12]) == entries[13:]
    # (0..9) ends before ids[12]: never fetched; the others hold newer ids.
    assert segment_key(s.archive.prefix, ids[0], ids[9]) not in s.store.fetched
    assert len(s.store.fetched) == 3
    assert await s.archived(after=ids[19]) == []


async def test_foreign_objects_under_the_prefix_are_ignored(setup: Setup) -> None:
    s = setup
    ids = await s.append(3)
    await s.archive.write(await s.redis_entries())
    body = b"notes"
    await s.store.put_object(s.archive.prefix + "README", body, _md5(body), "text/plain")
    assert await s.archive.archived_through() == ids[2]
    assert [e.id for e in await s.archived()] == ids


async def test_undecodable_entries_are_archived_as_they_are(setup: Setup) -> None:
    s = setup
    key = s.config.events_key
    good = await s.append(1)
    odd = [
        _text(
            await s.redis.xadd(key, {"type": "FromTheFuture", "v": "9", "data": '{"x": [1, 2]}'})
        ),
        _text(await s.redis.xadd(key, {"type": "FileSeen", "v": "x", "data": "not json"})),
    ]
    through = await archive_through(s.log, s.archive, "99999999999999-0")
    assert through == odd[1]
    archived = await s.archived()
    assert [e.id for e in archived] == [*good, *odd]
    assert (archived[1].type, archived[1].v, bytes(archived[1].data)) == (
        "FromTheFuture",
        9,
        b'{"x": [1, 2]}',
    )
    assert (archived[2].v, bytes(archived[2].data)) == (0, b'"not json"')
    # The object itself: gzip JSON lines, data embedded as JSON.
    (segment,) = await s.store.real.list_keys(s.archive.prefix)
    body = await s.store.real.get_object(segment)
    assert body is not None
    lines = [json.loads(line) for line in gzip.decompress(body).splitlines()]
    assert lines[1]["data"] == {"x": [1, 2]}
    assert lines[0]["data"]["stream_id"] == "s1"


def _md5(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
