"""A trimmed log plus its archive is the whole log.

Redis keeps a short window (``EVENT_RETENTION``); everything older is first
archived to the bucket (``cefmp4.adapters.archive``) and then trimmed. What must hold:

* for arbitrary event sequences, trimmed at arbitrary points, a process that
  starts with no usable snapshot rebuilds from archive + Redis exactly the
  projection a follower that saw every entry holds (and a replay of the
  untrimmed log gives);
* nothing the archive does not hold is ever trimmed;
* the trim runs on the service's timer with the configured retention, and
  the archive holds the same JSON the log carried.

Real Redis, real SeaweedFS, real entry ids.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cefmp4.adapters.archive import EventArchive, archive_through
from cefmp4.adapters.eventlog import EventLog
from cefmp4.dev.localservers import S3Endpoint
from cefmp4.domain.events import Event, UnknownEvent
from cefmp4.runtime.service import connect
from projections.live import LiveProjection
from projections.snapshots import SnapshotStore, snapshot_key
from projections.streams import replay
from tests.harness import service_config
from tests.test_projection import logs, realistic
from tests.test_snapshots import mixed_log


def test_trimmed_log_plus_archive_replays_to_the_live_projection(
    tmp_path: Path, redis_url: str, bucket: str, s3_endpoint: S3Endpoint
) -> None:
    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(log=logs.map(realistic), cuts=st.lists(st.integers(0, 80), max_size=4))
    def prop(log: list[Event], cuts: list[int]) -> None:
        cut_at = sorted({min(c, len(log)) for c in cuts})
        asyncio.run(_trim_at(tmp_path, redis_url, bucket, s3_endpoint, log, cut_at))

    prop()


async def _trim_at(
    tmp_path: Path,
    redis_url: str,
    bucket: str,
    s3: S3Endpoint,
    log: list[Event],
    cuts: list[int],
) -> None:
    prefix = f"test-{uuid.uuid4().hex}"
    config = service_config(tmp_path, redis_url, prefix, bucket, s3,
                            event_archive_prefix=f"{prefix}-archive/")  # fmt: skip
    async with connect(config) as (redis, store):
        events = EventLog(redis, config.events_key, "test")
        archive = EventArchive(store, config.event_archive_prefix)
        snapshots = SnapshotStore(redis, snapshot_key(prefix), config.events_key)

        def follower() -> LiveProjection:
            return LiveProjection(
                events,
                batch=7,
                snapshots=snapshots,
                snapshot_every=1,
                history=EventArchive(store, config.event_archive_prefix).events,
            )

        live = follower()
        ids: list[str] = []
        done = 0
        for cut in [*cuts, len(log)]:
            ids += [await events.append(e) for e in log[done:cut]]
            done = cut
            await live.catch_up()
            await live.flush()
            # Retention 0: everything the snapshot covers may go, once archived.
            await snapshots.trim(
                live.state.last_id, 0.0, functools.partial(archive_through, events, archive)
            )
        await live.catch_up()
        whole = replay(list(zip(ids, log, strict=True)))
        assert live.state == whole

        # Archived + still in Redis = every entry, each once, in order.
        archived = [e.id async for e in archive.read()]
        in_redis = [i for i, _ in await events.read_after("0-0", 1_000_000)]
        assert archived + [i for i in in_redis if i not in set(archived)] == ids
        assert not set(in_redis) - set(ids)

        # No usable snapshot: archive first, then the Redis tail.
        await redis.delete(snapshots.key)
        rebuilt = follower()
        assert await rebuilt.catch_up() == whole
        # And from the snapshot, as a normal restart does.
        await live.flush()
        if ids:
            await snapshots.save(live.state)
        assert await follower().catch_up() == whole


async def test_the_archive_holds_what_the_log_carried(
    tmp_path: Path, redis_url: str, bucket: str, s3_endpoint: S3Endpoint, s3_client: Any
) -> None:
    prefix = f"test-{uuid.uuid4().hex}"
    config = service_config(tmp_path, redis_url, prefix, bucket, s3_endpoint)
    async with connect(config) as (redis, store):
        events = EventLog(redis, config.events_key, "test")
        log = mixed_log()
        ids = [await events.append(e) for e in log]
        raw: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(config.events_key)  # type: ignore[assignment]
        archive = EventArchive(store, config.event_archive_prefix)
        through = await archive_through(events, archive, "99999999999999-0")
        assert through == (ids[-1] if ids else "0-0")
        got = [e async for e in archive.read()]
        assert [e.id for e in got] == ids
        for entry, (entry_id, fields) in zip(got, raw, strict=True):
            assert entry.id == entry_id.decode()
            assert entry.type == fields[b"type"].decode()
            assert entry.replica == fields[b"replica"].decode()
            assert bytes(entry.data) == fields[b"data"]
        decoded = [e async for e in archive.events()]
        assert [e for _, e in decoded if not isinstance(e, UnknownEvent)] == log


async def test_a_quiet_system_is_trimmed_by_the_timer(
    tmp_path: Path, redis_url: str, bucket: str, s3_endpoint: S3Endpoint
) -> None:
    """No new entry after the last snapshot: time alone moves the old ones out
    of the retention window, and the timer trims them (after archiving)."""
    prefix = f"test-{uuid.uuid4().hex}"
    config = service_config(tmp_path, redis_url, prefix, bucket, s3_endpoint)
    async with connect(config) as (redis, store):
        events = EventLog(redis, config.events_key, "test")
        archive = EventArchive(store, config.event_archive_prefix)
        live = LiveProjection(
            events,
            snapshots=SnapshotStore(redis, snapshot_key(prefix), config.events_key),
            snapshot_every=1,
            snapshot_interval=0.2,
            retention_seconds=1.0,
            archive=functools.partial(archive_through, events, archive),
        )
        log = mixed_log()
        ids = [await events.append(event) for event in log]
        await live.catch_up()
        await live.flush()
        assert await redis.xlen(config.events_key) == len(log)  # all younger than 1 s
        stop = asyncio.Event()
        timer = asyncio.create_task(live.run(stop))
        try:
            async with asyncio.timeout(30):
                while await redis.xlen(config.events_key) > 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
        finally:
            stop.set()
            await timer
        # Everything trimmed was archived first, in order; the one entry left
        # in Redis is the snapshot's own (MINID keeps its bound).
        archived = [e.id async for e in archive.read()]
        assert archived == ids[: len(archived)] and len(archived) >= len(ids) - 1
        assert live.state == replay(list(zip(ids, log, strict=True)))  # trimming changes no state
