"""Outages seen from the consumer groups: while S3 is down the messages stay
pending (nothing is acknowledged that did not happen), and a service started
while its Redis is down waits for it, then works.

Kept apart from ``tests/test_faults.py`` (the byte-exactness side of the same
faults) so each asserts its own observable.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from cefmp4.dev.localservers import RedisServer, S3Endpoint
from tests import mp4gen
from tests.faultproxy import FaultProxy
from tests.harness import MiB, ServiceProcess, log_only, running, service_config
from tests.test_pipeline import assert_clean, assert_stored

GROUPS = ("uploaders", "finalizers", "metadata")


async def pending(redis: Any, events_key: str) -> int:
    counts = [(await redis.xpending(events_key, g))["pending"] for g in GROUPS]
    return sum(counts)


async def test_messages_stay_pending_while_s3_is_down(
    make_config: Any, watch: Path, s3_endpoint: S3Endpoint, s3_client: Any, bucket: str
) -> None:
    dst = watch / "outage.mp4"
    data = os.urandom(11 * MiB)
    async with FaultProxy.to(s3_endpoint.url) as proxy:
        config = make_config(s3_endpoint_url=proxy.url, s3_timeout_seconds=2.0)
        redis: Any = aioredis.from_url(config.redis_url)
        try:
            async with running(config) as h:
                with dst.open("wb") as f:
                    f.write(data[: 6 * MiB])
                    f.flush()
                    await h.until(
                        lambda p: (s := p.for_path(str(dst))) is not None and 1 in s.parts,
                        what="part 1 before the outage",
                    )
                    proxy.down = True
                    f.write(data[6 * MiB :])
                # The service tries S3, fails, tries again: all that time the
                # message that asked for part 2 is pending, never acknowledged.
                seen: list[int] = []
                async with asyncio.timeout(60):
                    while True:
                        seen.append(await pending(redis, config.events_key))
                        if proxy.injected.refused >= 3:
                            break
                        await asyncio.sleep(0.05)
                during = await pending(redis, config.events_key)
                stalled = (await h.projection()).for_path(str(dst))
                proxy.down = False
                state = await h.terminal(dst)
                after = await pending(redis, config.events_key)
        finally:
            await redis.aclose()
    assert stalled is not None and sorted(stalled.parts) == [1] and not stalled.terminal
    assert during > 0, f"nothing pending while S3 was down (samples: {seen[-10:]})"
    assert after == 0, "messages left pending after everything went through"
    assert_stored(s3_client, bucket, state, data)
    assert_clean(s3_client, bucket, 1)


async def test_redis_down_at_start_then_up(
    tmp_path: Path, key_prefix: str, bucket: str, s3_endpoint: S3Endpoint,
    sources: mp4gen.Mp4Sources, s3_client: Any,
) -> None:  # fmt: skip
    """The service's own Redis is not running when it starts: it must wait
    (not exit, not crash-loop) and do its work once Redis is up."""
    watch = tmp_path / "watch"
    watch.mkdir()
    server = RedisServer(tmp_path / "redis")  # our own: the session's stays up
    config = service_config(watch, server.url, key_prefix, bucket, s3_endpoint)
    service = ServiceProcess(config, tmp_path / "svc.log")
    dst = watch / "early.mp4"
    try:
        service.start()
        async with asyncio.timeout(30):
            while True:
                if "connecting" in service.log_tail():
                    break
                await asyncio.sleep(0.05)
        dst.write_bytes(sources.regular.read_bytes())
        assert service.proc is not None and service.proc.poll() is None, service.tail()
        await asyncio.to_thread(server.start)
        async with log_only(config) as (h, _service):
            state = await h.terminal(dst, timeout=90)
        assert service.proc.poll() is None, "the service exited instead of waiting"
        code = await asyncio.to_thread(service.terminate)
    finally:
        service.stop()
        server.stop()
    assert code == 0, service.tail()
    assert_stored(s3_client, bucket, state, sources.regular.read_bytes())
    assert_clean(s3_client, bucket, 1)
