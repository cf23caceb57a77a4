"""The live projection follower against real Redis."""

from __future__ import annotations

import gc
from datetime import UTC, datetime

import redis.asyncio as aioredis

from cefmp4.adapters.eventlog import EventLog
from cefmp4.domain.events import BytesAvailable, FileSeen
from projections.live import LiveProjection
from projections.streams import replay


async def test_paged_replay_folds_everything_and_turns_gc_back_on(
    redis_url: str, key_prefix: str
) -> None:
    """Pages of 2 over 7 entries: the replay path (GC off while pages are
    full) must fold every entry and leave the collector as it found it."""
    redis = aioredis.from_url(redis_url)
    log = EventLog(redis, f"{key_prefix}:events", "test")
    now = datetime.now(UTC)
    events = [
        FileSeen(
            stream_id="s",
            at=now,
            path="/w/a.mp4",
            rel_path="a.mp4",
            bucket="b",
            key="streams/s/a.mp4",
            size=0,
            mtime_ns=0,
            inode=1,
        ),
        *(BytesAvailable(stream_id="s", at=now, size=i, mtime_ns=i) for i in range(1, 7)),
    ]
    ids = [await log.append(e) for e in events]
    try:
        assert gc.isenabled()
        projection = await LiveProjection(log, batch=2).catch_up()
        assert gc.isenabled()
        assert projection == replay(list(zip(ids, events, strict=True)))
        assert projection.streams["s"].size == 6
    finally:
        await redis.aclose()
