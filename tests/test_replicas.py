"""Several replicas, kill -9 and SIGTERM, with the real service as child
processes against real Redis and SeaweedFS.

Whatever happens to the processes, every recording ends as exactly one
byte-exact object with its sidecar, and no multipart upload stays open.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from cefmp4.localservers import S3Endpoint
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
    for r in replicas:
        r.start()
    contents = {config.watch_root / f"cam{i}.mp4": os.urandom(14 * MiB + i) for i in range(3)}
    redis = aioredis.from_url(config.redis_url)
    try:
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
            holder: Any = await redis.get(lease_key)
            owner = holder.decode().rsplit(":", 1)[0] if holder else "r0"
            victim = next(r for r in replicas if r.replica_id == owner)
            victim.kill()
            await asyncio.gather(*writers)
            states = {path: await h.terminal(path, timeout=90) for path in contents}
            entries: Any = await redis.xrange(config.events_key)
        writers_seen = {fields[b"replica"].decode() for _, fields in entries}
    finally:
        await redis.aclose()
        codes = [r.terminate() for r in replicas if r is not victim]
    assert codes == [0, 0], [r.log_tail() for r in replicas]
    for path, data in contents.items():
        assert_stored(s3_client, bucket, states[path], data)
    assert_clean(s3_client, bucket, len(contents))
    assert len(writers_seen) >= 2, f"only {writers_seen} wrote events: no work was spread"


async def test_standby_takes_over_watching_when_the_watcher_dies(
    config: Any, tmp_path: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    replicas = [ServiceProcess(config, tmp_path / f"w{i}.log", f"w{i}") for i in range(2)]
    for r in replicas:
        r.start(ready_timeout=30)
    redis = aioredis.from_url(config.redis_url)
    lease_key = f"{config.redis_key_prefix}:lease:watcher"
    watcher: ServiceProcess | None = None
    try:
        async with log_only(config) as (h, _service):
            first = config.watch_root / "before.mp4"
            first.write_bytes(sources.regular.read_bytes())
            await h.terminal(first)
            holder: Any = await redis.get(lease_key)
            assert holder is not None
            watcher = next(r for r in replicas if holder.decode().startswith(f"{r.replica_id}:"))
            watcher.kill()
            # Dropped while nobody watches: the standby must find it on taking over.
            second = config.watch_root / "after.mp4"
            second.write_bytes(sources.large.read_bytes())
            state = await h.terminal(second, timeout=config.lease_ttl_seconds * 5 + 30)
            new_holder: Any = await redis.get(lease_key)
    finally:
        await redis.aclose()
        codes = [r.terminate() for r in replicas if r is not watcher]
    assert watcher is not None and codes == [0]
    assert new_holder is not None and not new_holder.decode().startswith(f"{watcher.replica_id}:")
    assert_stored(s3_client, bucket, state, sources.large.read_bytes())
    assert_clean(s3_client, bucket, 2)


async def test_sigterm_mid_upload_exits_cleanly_and_next_start_finishes(
    config: Any, tmp_path: Path, s3_client: Any, bucket: str
) -> None:
    service = ServiceProcess(config, tmp_path / "svc.log")
    dst = config.watch_root / "term.mp4"
    data = os.urandom(17 * MiB)
    service.start()
    async with log_only(config) as (h, _service):
        with dst.open("wb") as f:
            f.write(data[: 11 * MiB])
            f.flush()
            await h.until(
                lambda p: (s := p.for_path(str(dst))) is not None and len(s.parts) >= 1,
                what="a part in flight",
            )
            started = time.monotonic()
            code = await asyncio.to_thread(service.terminate)
            elapsed = time.monotonic() - started
            f.write(data[11 * MiB :])
        assert code == 0, service.log_tail()
        assert elapsed < config.shutdown_grace_seconds + 5, elapsed
        service.start()
        state = await h.terminal(dst, timeout=60)
    assert service.terminate() == 0
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
    every 0.2-1.0 s while they write and twice more while it finishes (to hit
    finalization: between CompleteMultipartUpload and StreamCompleted, during
    the sidecar), then runs to the end."""
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
    async with log_only(config) as (h, _service):
        writing = asyncio.gather(*recorders)
        while not writing.done():
            service.start()
            await asyncio.wait([writing], timeout=rng.uniform(0.2, 1.0))
            service.kill()
            kills += 1
        await writing
        for _ in range(2):
            service.start()
            await asyncio.sleep(rng.uniform(0.5, 2.5))  # an outage at a random instant
            service.kill()
        service.start()
        states = {path: await h.terminal(path, timeout=90) for path in expected}
    assert service.terminate() == 0, service.log_tail()
    assert kills >= 2
    for path, data in expected.items():
        assert_stored(s3_client, bucket, states[path], data)
    assert_clean(s3_client, bucket, len(expected))
