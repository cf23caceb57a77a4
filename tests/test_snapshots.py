"""Projection snapshots and log retention (``projections.snapshots``), on a real Redis.

What must hold, whatever the snapshot did:

* snapshot + tail == a replay of the whole log, for snapshots taken at any
  point of arbitrary logs (the property strategy of ``test_projection``);
* a snapshot that cannot be used (garbage, another schema, a cut-off body,
  ahead of the log) is ignored and the log replayed from its first entry;
* an older snapshot never replaces a newer one, with ids compared as numbers;
* retention removes only entries the stored snapshot covers, that are older
  than the retention period and that no consumer group still needs, and the
  projection rebuilt afterwards (snapshot + tail) equals the one before;
* ``SNAPSHOT_EVERY_EVENTS=0`` writes nothing.

Events are real event objects appended through ``EventLog`` (or, where an
entry must be older than the retention period, XADD with an explicit old id
of the same wire encoding).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.typing import EncodableT, FieldT

from cefmp4.adapters.environment import load
from cefmp4.adapters.eventlog import Entry, EventLog
from cefmp4.domain.config import Config
from cefmp4.domain.errors import ConfigError
from cefmp4.domain.events import (
    BytesAvailable,
    Event,
    FileSeen,
    MetadataWritten,
    PartUploaded,
    StreamCompleted,
    StreamFailed,
    StreamIdle,
    UnknownEvent,
    UploadStarted,
    encode,
)
from projections.live import LiveProjection
from projections.snapshots import (
    SCHEMA_VERSION,
    SnapshotStore,
    decode_snapshot,
    encode_snapshot,
    snapshot_key,
    trim_bound,
)
from projections.streams import Projection, replay
from tests.test_projection import logs

T0 = datetime(2024, 1, 1, tzinfo=UTC)
DAY = 86_400.0


class SpyLog(EventLog):
    """An EventLog that remembers where each catch-up read started."""

    def __init__(self, redis: aioredis.Redis, key: str) -> None:
        super().__init__(redis, key, "test")
        self.reads: list[str] = []

    async def read_after(self, last_id: str, count: int = 10_000) -> list[Entry]:
        self.reads.append(last_id)
        return await super().read_after(last_id, count)


class Deployment:
    """One key prefix: its log, its snapshot store, fresh followers on demand."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        self.events_key = f"{prefix}:events"
        self.log = EventLog(redis, self.events_key, "test")
        self.store = SnapshotStore(redis, snapshot_key(prefix), self.events_key)

    def follower(
        self, every: int = 0, retention: float = 0.0, *, snapshots: bool = True
    ) -> tuple[LiveProjection, SpyLog]:
        """A LiveProjection as a freshly started process would build it."""
        spy = SpyLog(self.redis, self.events_key)
        live = LiveProjection(
            spy,
            batch=7,  # small, so tails span several reads
            snapshots=self.store if snapshots else None,
            snapshot_every=every,
            retention_seconds=retention,
        )
        return live, spy

    async def append(self, events: list[Event]) -> list[str]:
        return [await self.log.append(e) for e in events]

    async def append_at(self, events: list[Event], first_ms: int) -> list[str]:
        """Entries with explicit ids from ``first_ms`` ms on: older than any retention."""
        ids = []
        for i, event in enumerate(events):
            fields: dict[FieldT, EncodableT] = {k: v for k, v in encode(event, "test").items()}
            ids.append(
                _text(await self.redis.xadd(self.events_key, fields, id=f"{first_ms + i}-0"))
            )
        return ids

    async def full_replay(self) -> Projection:
        entries = await self.log.read_after("0-0", count=1_000_000)
        return replay([(i, e) for i, e in entries if not isinstance(e, UnknownEvent)])

    async def ids(self) -> list[str]:
        entries: Any = await self.redis.xrange(self.events_key)
        return [_text(i) for i, _ in entries]


def known(p: Projection) -> set[str]:
    """Every stream the projection knows of: open ones and finished files."""
    return set(p.streams) | {r.stream_id for r in p.files.values()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def settled(live: LiveProjection) -> Projection:
    """``catch_up``, then wait for the snapshot write it may have started."""
    projection = await live.catch_up()
    await live.flush()
    return projection


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def deployment(redis: aioredis.Redis, key_prefix: str) -> Deployment:
    return Deployment(redis, key_prefix)


# -- realistic recordings ------------------------------------------------------


def recording(sid: str, path: str, parts: int, *, end: str = "completed") -> list[Event]:
    """What the service writes for one recording, in order."""
    at = T0 + timedelta(minutes=len(sid))
    out: list[Event] = [
        FileSeen(stream_id=sid, at=at, path=path, rel_path=path.rsplit("/", 1)[-1],
                 bucket="b", key=f"k/{sid}", size=0, mtime_ns=1, inode=7),
        UploadStarted(stream_id=sid, at=at, upload_id=f"u-{sid}"),
    ]  # fmt: skip
    for n in range(1, parts + 1):
        out.append(BytesAvailable(stream_id=sid, at=at, size=n * 100, mtime_ns=n))
        out.append(PartUploaded(stream_id=sid, at=at + timedelta(seconds=n), upload_id=f"u-{sid}",
                                part_number=n, offset=(n - 1) * 100, size=100, etag=f"e{n}",
                                md5=f"m{n}"))  # fmt: skip
    if end == "live":
        return out
    out.append(StreamIdle(stream_id=sid, at=at, size=parts * 100, mtime_ns=parts,
                          reason="settled", mp4="complete"))  # fmt: skip
    if end == "failed":
        out.append(StreamFailed(stream_id=sid, at=at, reason="s3_rejected", detail="403"))
        return out
    out.append(StreamCompleted(stream_id=sid, at=at, bucket="b", key=f"k/{sid}",
                               size=parts * 100, etag=f"x-{parts}", sha256="h",
                               mtime_ns=parts, parts=parts, mp4="complete"))  # fmt: skip
    out.append(MetadataWritten(stream_id=sid, at=at, key=f"k/{sid}.metadata.json",
                               duration_seconds=1.5))  # fmt: skip
    return out


def interleave(*recordings: list[Event]) -> list[Event]:
    """Round-robin, as concurrent recordings reach the log."""
    out: list[Event] = []
    queues = [list(r) for r in recordings]
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def mixed_log() -> list[Event]:
    return interleave(
        recording("s1", "/w/a.mp4", 4),
        recording("s2", "/w/b.mp4", 3, end="failed"),
        recording("s3", "/w/c.mp4", 5, end="live"),
        recording("s4", "/w/a.mp4", 2),  # a new recording at a.mp4: by_path moves
    )


# -- snapshot + tail == full replay -------------------------------------------


@pytest.mark.parametrize("cut", [1, 6, 17, 30])
async def test_snapshot_plus_tail_equals_full_replay(deployment: Deployment, cut: int) -> None:
    events = mixed_log()
    ids = await deployment.append(events[:cut])
    writer, _ = deployment.follower(every=cut)
    await settled(writer)  # cut >= every: writes the snapshot at ids[-1]
    stored = await deployment.store.load()
    assert stored is not None and stored.last_id == ids[-1] and stored.events == cut
    await deployment.append(events[cut:])

    restarted, spy = deployment.follower()
    got = await settled(restarted)
    assert spy.reads[0] == ids[-1], "must read only the tail after the snapshot"
    assert got == await deployment.full_replay()
    plain, plain_spy = deployment.follower(snapshots=False)
    assert await settled(plain) == got
    assert plain_spy.reads[0] == "0-0"


def test_snapshot_plus_tail_equals_full_replay_for_arbitrary_logs(redis_url: str) -> None:
    # The property of test_projection, through Redis: real entry ids, the Lua
    # guard, msgpack in a Redis string, reading the tail in batches.
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(log=logs, cut=st.integers(0, 60))
    def prop(log: list[Event], cut: int) -> None:
        asyncio.run(_snapshot_then_restart(redis_url, log, min(cut, len(log))))

    prop()


async def _snapshot_then_restart(redis_url: str, log: list[Event], cut: int) -> None:
    client = aioredis.from_url(redis_url)
    try:
        d = Deployment(client, f"test-{uuid.uuid4().hex}")
        ids = await d.append(log[:cut])
        await settled(d.follower(every=1)[0])
        await d.append(log[cut:])
        restarted, spy = d.follower()
        assert await settled(restarted) == await d.full_replay()
        assert spy.reads[0] == (ids[-1] if ids else "0-0")
    finally:
        await client.aclose()


async def test_snapshot_every_n_folded_events(deployment: Deployment) -> None:
    events = mixed_log()
    live, _ = deployment.follower(every=5)
    await deployment.append(events[:4])
    await settled(live)
    assert await deployment.store.load() is None  # 4 < 5
    ids = await deployment.append(events[4:12])
    await settled(live)
    snap = await deployment.store.load()
    assert snap is not None and snap.last_id == ids[-1]  # at the end of a catch-up, 12 >= 5
    await deployment.append(events[12:15])
    await settled(live)
    assert (await deployment.store.load()) == snap  # only 3 since
    ids = await deployment.append(events[15:17])
    await settled(live)
    snap = await deployment.store.load()
    assert snap is not None and snap.last_id == ids[-1] and snap.events == 17


class GatedStore(SnapshotStore):
    """Writes wait for ``gate``: a slow Redis, on demand."""

    def __init__(self, redis: aioredis.Redis, key: str, events_key: str) -> None:
        super().__init__(redis, key, events_key)
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.writes: list[str] = []

    async def save_encoded(self, last_id: str, value: bytes) -> bool:
        self.writes.append(last_id)
        self.entered.set()
        await self.gate.wait()
        return await super().save_encoded(last_id, value)


async def test_catch_up_does_not_wait_for_the_snapshot_write(deployment: Deployment) -> None:
    store = GatedStore(deployment.redis, deployment.store.key, deployment.events_key)
    live = LiveProjection(deployment.log, snapshots=store, snapshot_every=3)
    events = mixed_log()
    first = await deployment.append(events[:5])
    assert (await live.catch_up()).events == 5  # returns while the write waits
    async with asyncio.timeout(5):
        await store.entered.wait()  # the writer runs, and blocks at the gate
    assert store.writes == [first[-1]] and await deployment.store.load() is None
    more = await deployment.append(events[5:10])
    assert (await live.catch_up()).events == 10  # due again, but one write at a time
    assert store.writes == [first[-1]]
    store.gate.set()
    await live.flush()
    assert (await deployment.store.load()) == replay(list(zip(first, events[:5], strict=True)))
    await settled(live)  # still due: now it is written
    assert store.writes == [first[-1], more[-1]]
    assert await deployment.store.load() == live.state


async def test_every_zero_writes_no_snapshot(deployment: Deployment) -> None:
    await deployment.append(mixed_log())
    live, _ = deployment.follower(every=0, retention=DAY)
    for _ in range(3):
        await settled(live)
    assert not await deployment.redis.exists(deployment.store.key)
    assert len(await deployment.ids()) == len(mixed_log())  # and no trimming without one


def test_config_fields() -> None:
    config = load({"SNAPSHOT_EVERY_EVENTS": "0", "EVENT_RETENTION_DAYS": "1.5"}, env_file=None)
    assert (config.snapshot_every_events, config.event_retention_seconds) == (0, 1.5 * DAY)
    defaults = Config()
    assert (defaults.snapshot_every_events, defaults.event_retention_seconds) == (10_000, 3600)
    assert defaults.snapshot_interval_seconds == 300
    for text, seconds in (("90s", 90), ("24h", DAY), ("7d", 7 * DAY), ("0", 0), ("1h30m", 5400)):
        both = {"EVENT_RETENTION": text, "EVENT_RETENTION_DAYS": "2"}  # the new name wins
        assert load(both, env_file=None).event_retention_seconds == seconds
    bad_values: list[dict[str, str]] = [
        {"SNAPSHOT_EVERY_EVENTS": "-1"},
        {"EVENT_RETENTION_DAYS": "-0.5"},
        {"EVENT_RETENTION": "1 week"},
        {"EVENT_RETENTION": "-1h"},
        {"SNAPSHOT_INTERVAL_SECONDS": "0"},
    ]
    for bad in bad_values:
        with pytest.raises(ConfigError, match=next(iter(bad))):
            load(bad, env_file=None)


# -- unusable snapshots fall back to a full replay -----------------------------


def _other_schema(projection: Projection) -> bytes:
    return msgspec.msgpack.encode([SCHEMA_VERSION + 1, projection.last_id, projection])


def _cut_off(projection: Projection) -> bytes:
    return encode_snapshot(projection)[:-20]


def _wrong_body(projection: Projection) -> bytes:
    return msgspec.msgpack.encode([SCHEMA_VERSION, projection.last_id, {"streams": [1, 2]}])


def _garbage(projection: Projection) -> bytes:
    return b"\x93not msgpack at all"


@pytest.mark.parametrize("spoil", [_garbage, _other_schema, _cut_off, _wrong_body])
async def test_unusable_snapshot_falls_back_to_full_replay(
    deployment: Deployment, spoil: object
) -> None:
    assert callable(spoil)
    events = mixed_log()
    await deployment.append(events)
    good = await deployment.full_replay()
    value: bytes = spoil(replay([(f"{i + 1}-0", e) for i, e in enumerate(events[:5])]))
    await deployment.redis.set(deployment.store.key, value)
    assert await deployment.store.load() is None

    live, spy = deployment.follower(every=3)
    assert await settled(live) == good
    assert spy.reads[0] == "0-0"
    # ... and the follower replaces the unusable value with a good snapshot.
    assert await deployment.store.load() == good


async def test_snapshot_ahead_of_the_log_is_ignored(deployment: Deployment) -> None:
    # The log was deleted and started again: the snapshot describes another log.
    await deployment.append(mixed_log()[:10])
    writer, _ = deployment.follower(every=1)
    await settled(writer)
    await deployment.redis.delete(deployment.events_key)
    events = mixed_log()[:3]
    await deployment.append_at(events, first_ms=1)  # ids far below the snapshot's
    live, spy = deployment.follower()
    assert await settled(live) == await deployment.full_replay()
    assert live.state.events == 3 and spy.reads[0] == "0-0"


def test_decode_reports_why() -> None:
    projection = replay([("5-0", recording("s1", "/w/a.mp4", 1)[0])])
    assert decode_snapshot(encode_snapshot(projection)) == projection
    with pytest.raises(Exception, match="schema"):
        decode_snapshot(_other_schema(projection))
    with pytest.raises(Exception, match="undecodable"):
        decode_snapshot(b"")


# -- monotonic writes -----------------------------------------------------------


def _at(last_id: str, events: int) -> Projection:
    return Projection(last_id=last_id, events=events)


@pytest.mark.parametrize(
    ("older", "newer"),
    [("9-0", "10-0"), ("5-9", "5-10"), ("1712345678901-0", "1712345678901-1"),
     ("99999999999999-99", "100000000000000-0")],
)  # fmt: skip
async def test_older_snapshot_never_overwrites_newer(
    deployment: Deployment, older: str, newer: str
) -> None:
    store = deployment.store
    assert await store.save(_at(newer, 2))
    assert not await store.save(_at(older, 1))
    assert not await store.save(_at(newer, 99))  # same id: the first stands
    assert await store.load() == _at(newer, 2)
    assert await store.save(_at(f"{newer.split('-')[0]}-{int(newer.split('-')[1]) + 1}", 3))


async def test_concurrent_writers_keep_the_newest(deployment: Deployment) -> None:
    # Several replicas snapshotting at once, over several connections: whatever
    # order the writes reach Redis in, the newest is what stays.
    snapshots = [_at(f"{ms}-0", ms) for ms in range(1, 41)]
    order = random.Random(7).sample(range(len(snapshots)), len(snapshots))
    results = await asyncio.gather(*(deployment.store.save(snapshots[i]) for i in order))
    assert results[order.index(len(snapshots) - 1)] is True  # nothing newer can refuse it
    assert await deployment.store.load() == snapshots[-1]


async def test_save_overwrites_a_value_without_a_readable_header(deployment: Deployment) -> None:
    await deployment.redis.set(deployment.store.key, b"junk")
    assert await deployment.store.save(_at("3-0", 1))
    assert await deployment.store.load() == _at("3-0", 1)


# -- retention -----------------------------------------------------------------


def test_trim_bound_is_the_smallest_bound() -> None:
    now = 10_000_000
    assert trim_bound("500-3", now, 1000) == ("500-3", "snapshot")
    assert trim_bound("9999999-0", now, 1000) == ("9999000-0", "retention")
    assert trim_bound("9999999-0", now, 0, [("g1", "42-1"), ("g2", "43-0")]) == ("42-1", "group g1")
    assert trim_bound("0-0", now, 0) == (None, "snapshot")
    assert trim_bound("9-0", 100, 10**9) == (None, "retention")  # retention longer than time


async def test_retention_trims_only_what_the_snapshot_covers(deployment: Deployment) -> None:
    old = interleave(recording("s1", "/w/a.mp4", 3), recording("s2", "/w/b.mp4", 2),
                     recording("s3", "/w/c.mp4", 2, end="live"))  # fmt: skip
    old_ids = await deployment.append_at(old, first_ms=1_000)  # 1970: older than any retention
    recent_ids = await deployment.append(recording("s4", "/w/d.mp4", 1))
    before = await deployment.full_replay()
    assert known(before) == {"s1", "s2", "s3", "s4"}

    # A snapshot covering only part of the old entries bounds the trim, even
    # though every old entry is past the retention period.
    cut = 9
    prefix = replay(list(zip(old_ids[:cut], old[:cut], strict=True)))
    assert await deployment.store.save(prefix)
    result = await deployment.store.trim(prefix.last_id, retention_seconds=DAY)
    assert (result.minid, result.removed, result.limited_by) == (old_ids[cut - 1], cut - 1,
                                                                 "snapshot")  # fmt: skip
    assert await deployment.ids() == old_ids[cut - 1 :] + recent_ids

    # A restarted follower: snapshot + tail, then a new snapshot covering
    # everything; now the retention period bounds the trim, the recent entries stay.
    live, spy = deployment.follower(every=5, retention=DAY)
    assert await settled(live) == before
    assert spy.reads[0] == old_ids[cut - 1]
    assert await deployment.ids() == recent_ids

    rebuilt, _ = deployment.follower()
    assert await settled(rebuilt) == before  # s1..s3 come from the snapshot alone
    assert (await deployment.store.log_info()).trimmed
    # Which is why a replay from scratch is only complete while the log is whole.
    partial, _ = deployment.follower(snapshots=False)
    assert known(await settled(partial)) == {"s4"}


async def test_retention_keeps_what_a_consumer_group_still_needs(deployment: Deployment) -> None:
    events = mixed_log()
    ids = await deployment.append_at(events, first_ms=1_000)
    redis, key = deployment.redis, deployment.events_key
    await deployment.log.ensure_group("g")
    await redis.xreadgroup("g", "c1", {key: ">"}, count=3)  # delivered, not acknowledged
    assert await deployment.store.save(replay(list(zip(ids, events, strict=True))))

    result = await deployment.store.trim(ids[-1], retention_seconds=DAY)
    assert (result.removed, result.limited_by) == (0, "group g")
    await deployment.log.ack("g", *ids[:3])
    result = await deployment.store.trim(ids[-1], retention_seconds=DAY)
    assert (result.minid, result.removed) == (ids[2], 2)  # last delivered id itself stays
    assert await deployment.ids() == ids[2:]
