"""Cost follows what is live or on disk, never how much was handled before.

End to end, on real Redis and SeaweedFS:

* finished recordings leave the projection; their files' records go when the
  files go, and the stored snapshot shrinks back to (nearly) empty;
* the log is trimmed by the service's own timer (EVENT_RETENTION and
  SNAPSHOT_INTERVAL_SECONDS from the environment of a real ``cefmp4 run``),
  the trimmed entries are in the archive, and a restart after trimming
  uploads nothing again that is still on disk.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis

from cefmp4.adapters.archive import EventArchive
from cefmp4.domain.events import FileSeen
from cefmp4.runtime.service import connect
from projections.snapshots import decode_snapshot, snapshot_key
from projections.streams import Projection
from tests import mp4gen
from tests.harness import ServiceProcess, objects, running

RECORDINGS = 6
Entries = list[tuple[bytes, dict[bytes, bytes]]]


def recordings(s3_client: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    """The objects under S3_KEY_PREFIX (not the archive's segments)."""
    return {k: v for k, v in objects(s3_client, bucket).items() if k.startswith(prefix)}


async def stored_snapshot(redis: aioredis.Redis, prefix: str) -> tuple[Projection, int] | None:
    raw = cast(bytes | None, await redis.get(snapshot_key(prefix)))
    return None if raw is None else (decode_snapshot(raw), len(raw))


async def wait_snapshot(
    redis: aioredis.Redis, prefix: str, condition: Any, *, timeout: float = 60.0
) -> tuple[Projection, int]:
    async with asyncio.timeout(timeout):
        while True:
            got = await stored_snapshot(redis, prefix)
            if got is not None and condition(got[0]):
                return got
            await asyncio.sleep(0.1)


async def test_deleted_files_leave_the_index_and_the_snapshot_shrinks(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, key_prefix: str
) -> None:
    config = make_config(snapshot_interval_seconds=0.3)
    paths = [watch / f"cam{i}.mp4" for i in range(RECORDINGS)]
    async with running(config) as h:
        for path in paths:
            shutil.copyfile(sources.regular, path)
        for path in paths:
            await h.terminal(path)
        redis = aioredis.from_url(config.redis_url)
        try:
            # Every recording finished: no stream left, one record per file.
            full, full_size = await wait_snapshot(
                redis, key_prefix, lambda p: len(p.files) == RECORDINGS and not p.streams
            )
            assert set(full.files) == {str(p) for p in paths}
            assert full.by_path == {}
            for path in paths:
                path.unlink()
            empty, empty_size = await wait_snapshot(
                redis, key_prefix, lambda p: not p.files and p.events > full.events
            )
        finally:
            await redis.aclose()
    assert empty.streams == {} and empty.by_path == {}
    # Back to the size of an empty deployment: no trace of the six recordings.
    assert empty_size < full_size / 3 and empty_size < 200, (empty_size, full_size)


async def test_restart_after_trimming_uploads_nothing_again(
    make_config: Any,
    watch: Path,
    tmp_path: Path,
    sources: mp4gen.Mp4Sources,
    s3_client: Any,
    bucket: str,
    key_prefix: str,
) -> None:
    # Configured through the environment of a real `cefmp4 run`.
    config = make_config(event_retention="1s", snapshot_interval_seconds=0.5)
    paths = [watch / f"cam{i}.mp4" for i in range(3)]
    for path in paths:
        shutil.copyfile(sources.regular, path)
    redis = aioredis.from_url(config.redis_url)
    try:
        with ServiceProcess(config, tmp_path / "first.log"):
            async with asyncio.timeout(90):
                # Until every recording is done and the log no longer holds
                # any FileSeen: trimmed by the service's own timer.
                while True:
                    keys = [k for k in objects(s3_client, bucket) if k.endswith(".metadata.json")]
                    log = cast(Entries, await redis.xrange(config.events_key))
                    seen = [e for e in log if e[1][b"type"] == b"FileSeen"]
                    if len(keys) == len(paths) and not seen:
                        break
                    await asyncio.sleep(0.2)
        before = recordings(s3_client, bucket, config.s3_key_prefix)
        async with connect(config) as (_redis, store):
            archived = [e async for e in EventArchive(store, config.event_archive_prefix).read()]
        assert sum(e.type == "FileSeen" for e in archived) == len(paths)
        last_before = cast(Entries, await redis.xrevrange(config.events_key, count=1))[0][0]

        # Restart; a new recording proves the watcher scanned the directory.
        fresh = watch / "new.mp4"
        shutil.copyfile(sources.regular, fresh)
        with ServiceProcess(config, tmp_path / "second.log"):
            sidecar = f"/{fresh.name}.metadata.json"
            async with asyncio.timeout(60):
                while not any(k.endswith(sidecar) for k in objects(s3_client, bucket)):  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
            after = cast(
                Entries, await redis.xrange(config.events_key, min=f"({last_before.decode()}")
            )
    finally:
        await redis.aclose()
    seen_after = [FileSeen.__name__ for _, f in after if f[b"type"] == b"FileSeen"]
    assert len(seen_after) == 1, "only the new recording is a new stream"
    stored = recordings(s3_client, bucket, config.s3_key_prefix)
    assert {k: v for k, v in stored.items() if k in before} == before
    assert len(stored) == len(before) + 2  # the new object and its sidecar, nothing else
