"""Several replicas, kill -9 and SIGTERM, with the real service as child
processes against real Redis and SeaweedFS.

Whatever happens to the processes, every recording ends as exactly one
byte-exact object with its sidecar, and no multipart upload stays open.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from cefmp4.dev.localservers import S3Endpoint
from tests import mp4gen
from tests.harness import MiB, ServiceProcess, log_only, service_config
from tests.test_pipeline import assert_clean, assert_stored


@pytest.fixture
def config(
    tmp_path: Path, redis_url: str, key_prefix: str, bucket: str, s3_endpoint: S3Endpoint
) -> Any:
    watch = tmp_path / "watch"
    watch.mkdir()
    return service_config(
        watch,
        redis_url,
        key_prefix,
        bucket,
        s3_endpoint,
        lease_ttl_seconds=2.0,
        claim_idle_seconds=2.0,
        shutdown_grace_seconds=10.0,
    )


async def write_slowly(
    dst: Path, data: bytes, *, chunk: int = 512 * 1024, delay: float = 0.05
) -> None:
    with dst.open("wb") as f:
        for start in range(0, len(data), chunk):
            f.write(data[start : start + chunk])
            f.flush()
            await asyncio.sleep(delay)


async def test_three_replicas_one_killed_mid_stream(
    config: Any, tmp_path: Path, s3_client: Any, bucket: str
) -> None:
    replicas = [ServiceProcess(config, tmp_path / f"r{i}.log", f"r{i}") for i in range(3)]
    contents = {config.watch_root / f"cam{i}.mp4": os.urandom(14 * MiB + i) for i in range(3)}
    redis: Any = aioredis.from_url(config.redis_url)
    victim: ServiceProcess | None = None
    groups = ("uploaders", "finalizers", "metadata")
    try:
        for r in replicas:
            await asyncio.to_thread(r.start, 30)
        async with log_only(config) as (h, _service):
            writers = [asyncio.create_task(write_slowly(p, d)) for p, d in contents.items()]
            # Kill whichever replica is working on cam0 once it has sent a part.
            cam0 = str(config.watch_root / "cam0.mp4")
            p = await h.until(
                lambda p: (s := p.for_path(cam0)) is not None and len(s.parts) >= 1,
                what="cam0 part 1",
            )
            stream = p.for_path(cam0)
            assert stream is not None
            lease_key = f"{config.redis_key_prefix}:lease:stream:{stream.stream_id}"
            holder = await until_value(lambda: redis.get(lease_key), what="cam0's lease held")
            owner = holder.decode().rsplit(":", 1)[0]
            victim = next(r for r in replicas if r.replica_id == owner)
            victim.kill()
            # What the dead replica had in hand: only XAUTOCLAIM can move it on.
            orphaned = {
                g: [m["message_id"] for m in await redis.xpending_range(
                    config.events_key, g, "-", "+", 1000, consumername=owner)]
                for g in groups
            }  # fmt: skip
            await asyncio.gather(*writers)
            states = {path: await h.terminal(path, timeout=90) for path in contents}
            entries: Any = await redis.xrange(config.events_key)
            still = {
                g: [m["message_id"] for m in await redis.xpending_range(
                    config.events_key, g, "-", "+", 1000)]
                for g in groups
            }  # fmt: skip
    finally:
        await redis.aclose()
        codes = [r.stop() for r in replicas if r is not victim]
    assert codes == [0, 0], [r.log_tail() for r in replicas]
    for path, data in contents.items():
        assert_stored(s3_client, bucket, states[path], data)
    assert_clean(s3_client, bucket, len(contents))
    assert any(orphaned.values()), "the killed replica held no message: nothing to claim"
    for g in groups:
        assert not set(orphaned[g]) & set(still[g]), f"{g}: the dead replica's messages stuck"
    # Work is spread: parts of different recordings sent by different replicas.
    sent = {
        (fields[b"replica"].decode(), json.loads(fields[b"data"])["stream_id"])
        for _, fields in entries
        if fields[b"type"] == b"PartUploaded"
    }
    assert any(r1 != r2 and s1 != s2 for r1, s1 in sent for r2, s2 in sent), sent


async def until_value(get: Any, *, what: str, timeout: float = 30.0) -> Any:
    """Poll ``get()`` until it returns something other than None."""
    async with asyncio.timeout(timeout):
        while True:
            if (value := await get()) is not None:
                return value
            await asyncio.sleep(0.01)


async def test_standby_takes_over_watching_when_the_watcher_dies(
    config: Any, tmp_path: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    """The standby takes over within LEASE_TTL (+ one standby poll, TTL/3, and
    2 s of slack for a loaded machine), and the holder renews every TTL/3 (the
    key's PTTL never drops much below 2/3 of the TTL while it lives)."""
    ttl = 3.0
    config = msgspec.structs.replace(config, lease_ttl_seconds=ttl)
    replicas = [ServiceProcess(config, tmp_path / f"w{i}.log", f"w{i}") for i in range(2)]
    redis: Any = aioredis.from_url(config.redis_url)
    lease_key = f"{config.redis_key_prefix}:lease:watcher"
    watcher: ServiceProcess | None = None
    try:
        for r in replicas:
            await asyncio.to_thread(r.start, 30)
        async with log_only(config) as (h, _service):
            first = config.watch_root / "before.mp4"
            first.write_bytes(sources.regular.read_bytes())
            await h.terminal(first)
            holder: Any = await redis.get(lease_key)
            assert holder is not None
            watcher = next(r for r in replicas if holder.decode().startswith(f"{r.replica_id}:"))
            lowest = await lowest_pttl(redis, lease_key, holder, seconds=1.5 * ttl)
            watcher.kill()
            killed_at = time.monotonic()
            # Dropped while nobody watches: the standby must find it on taking over.
            second = config.watch_root / "after.mp4"
            second.write_bytes(sources.large.read_bytes())
            new_holder = await until_value(
                lambda: _other_holder(redis, lease_key, holder), what="a new watcher", timeout=60
            )
            gap = time.monotonic() - killed_at
            state = await h.terminal(second, timeout=60)
    finally:
        await redis.aclose()
        codes = [r.stop() for r in replicas if r is not watcher]
    assert watcher is not None and codes == [0]
    assert not new_holder.decode().startswith(f"{watcher.replica_id}:")
    assert gap <= ttl + ttl / 3 + 2.0, f"takeover took {gap:.1f}s with LEASE_TTL={ttl}"
    assert lowest >= ttl * 2 / 3 - 0.75, f"PTTL fell to {lowest:.2f}s: not renewed every TTL/3"
    assert_stored(s3_client, bucket, state, sources.large.read_bytes())
    assert_clean(s3_client, bucket, 2)


async def lowest_pttl(redis: Any, key: str, holder: bytes, *, seconds: float) -> float:
    """The lowest PTTL (s) the lease key shows over ``seconds`` while ``holder`` has it."""
    lowest = float("inf")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        async with redis.pipeline(transaction=True) as pipe:
            value, pttl = await pipe.get(key).pttl(key).execute()
        assert value == holder, "the lease changed hands while its holder lived"
        lowest = min(lowest, pttl / 1000)
        await asyncio.sleep(0.02)
    return lowest


async def _other_holder(redis: Any, key: str, old: bytes) -> bytes | None:
    value: bytes | None = await redis.get(key)
    return value if value is not None and value != old else None


async def test_sigterm_mid_upload_exits_cleanly_and_next_start_finishes(
    config: Any, tmp_path: Path, s3_client: Any, bucket: str
) -> None:
    service = ServiceProcess(config, tmp_path / "svc.log")
    dst = config.watch_root / "term.mp4"
    data = os.urandom(17 * MiB)
    try:
        service.start()
        async with log_only(config) as (h, _service):
            with dst.open("wb") as f:
                f.write(data[: 11 * MiB])
                f.flush()
                await h.until(
                    lambda p: (s := p.for_path(str(dst))) is not None and len(s.parts) >= 1,
                    what="a part in flight",
                )
                # Exits 0 before terminate's own deadline (or terminate raises).
                code = await asyncio.to_thread(service.terminate)
                f.write(data[11 * MiB :])
            assert code == 0, service.log_tail()
            service.start()
            state = await h.terminal(dst, timeout=60)
        assert service.terminate() == 0
    finally:
        service.stop()
    assert_stored(s3_client, bucket, state, data)
    assert_clean(s3_client, bucket, 1)


async def test_kill_9_at_random_moments(
    config: Any,
    tmp_path: Path,
    sources: mp4gen.Mp4Sources,
    large_faststart: Path,
    s3_client: Any,
    bucket: str,
) -> None:
    await kill_loop(7, config, tmp_path, sources, large_faststart, s3_client, bucket)


@pytest.mark.chaos
@pytest.mark.parametrize("seed", range(1, 21))
async def test_kill_9_soak(
    seed: int,
    config: Any,
    tmp_path: Path,
    sources: mp4gen.Mp4Sources,
    large_faststart: Path,
    s3_client: Any,
    bucket: str,
) -> None:
    """`task chaos`: the kill loop with 20 seeds."""
    await kill_loop(seed, config, tmp_path, sources, large_faststart, s3_client, bucket)


async def kill_loop(
    seed: int,
    config: Any,
    tmp_path: Path,
    sources: mp4gen.Mp4Sources,
    large_faststart: Path,
    s3_client: Any,
    bucket: str,
) -> None:
    """Four recorders with different write patterns; the service is killed
    0.2-1.0 s after each start (once it is running) while they write, then
    while a recording is idle and not yet completed (finalization: parts
    re-read and re-sent, CompleteMultipartUpload, StreamCompleted), up to
    twice, and at least once for sure; then it runs to the end."""
    rng = random.Random(seed)
    root = config.watch_root
    expected = {
        root / "append.mp4": sources.large.read_bytes(),
        root / "patched.mp4": sources.large.read_bytes(),
        root / "faststart.mp4": large_faststart.read_bytes(),
        root / "random.mp4": os.urandom(9 * MiB),
    }
    recorders = [
        mp4gen.record_append(sources.large, root / "append.mp4", chunk=256 * 1024, delay=0.05),
        mp4gen.record_mdat_patch(sources.large, root / "patched.mp4", chunk=256 * 1024, delay=0.05),
        mp4gen.record_faststart(
            sources.large,
            root / "faststart.mp4",
            chunk=256 * 1024,
            delay=0.05,
            faststart_version=large_faststart,
        ),
        write_slowly(root / "random.mp4", expected[root / "random.mp4"], delay=0.15),
    ]
    service = ServiceProcess(config, tmp_path / "svc.log")
    kills = 0
    in_finalization = 0
    try:
        async with log_only(config) as (h, _service):
            writing = asyncio.gather(*recorders)
            while not writing.done():
                # Ready first: a kill during interpreter start-up tests nothing.
                await asyncio.to_thread(service.start, 30)
                await asyncio.wait([writing], timeout=rng.uniform(0.2, 1.0))
                service.kill()
                kills += 1
            await writing
            # Then kill while recordings are being finalized: idle, not completed.
            for _ in range(6):
                if in_finalization >= 2:
                    break
                await asyncio.to_thread(service.start, 30)
                p = await h.until(lambda p: any(s.status == "idle" for s in p.streams.values())
                                  or all(s.terminal for s in p.streams.values()),
                                  what="a stream in finalization", timeout=60)  # fmt: skip
                if not any(s.status == "idle" for s in p.streams.values()):
                    break
                await asyncio.sleep(rng.uniform(0, 0.05))  # somewhere inside finalization
                service.kill()
                after = await h.projection()  # the log as the dead service left it
                in_finalization += any(s.status == "idle" for s in after.streams.values())
            await asyncio.to_thread(service.start, 30)
            states = {path: await h.terminal(path, timeout=90) for path in expected}
        assert service.terminate() == 0, service.log_tail()
    finally:
        service.stop()
    assert kills >= 1
    assert in_finalization >= 1, "no kill landed between StreamIdle and StreamCompleted"
    for path, data in expected.items():
        assert_stored(s3_client, bucket, states[path], data)
    assert_clean(s3_client, bucket, len(expected))
