"""Leases and the fence (``cefmp4.adapters.leases``) against a real Redis, and the
lease checks right before CompleteMultipartUpload and AbortMultipartUpload.

A lease is only as good as its compare-and-set: each test here has the lease
move to someone else (another token in the key, or no key at all) and checks
that the old holder can no longer renew, release, append or end an upload.
The process-level version (a replica paused past its TTL) is in
``tests/test_fencing.py``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from cefmp4.adapters.leases import Fence, Lease, LeaseLost
from cefmp4.adapters.storage import ObjectStore
from cefmp4.domain.events import StreamFailed, StreamIdle
from cefmp4.domain.partplan import final_parts
from tests.harness import MiB, log_only, open_uploads
from tests.test_pipeline import finalize_now, two_parts_sent

TTL = 0.6  # short: kept() must renew several times inside one test


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


def lease(redis: Any, key_prefix: str, owner: str = "me", ttl: float = TTL) -> Lease:
    return Lease(redis, f"{key_prefix}:lease:x", owner, ttl)


async def test_acquire_is_exclusive_and_every_token_is_new(redis: Any, key_prefix: str) -> None:
    mine, theirs = lease(redis, key_prefix), lease(redis, key_prefix, "other")
    assert await mine.acquire()
    assert not await theirs.acquire() and theirs.token is None
    assert mine.token is not None and mine.token.startswith("me:")
    assert await redis.get(mine.key) == mine.token.encode()
    assert 0 < await redis.pttl(mine.key) <= TTL * 1000
    first = mine.token
    await mine.release()
    assert await mine.acquire()
    assert mine.token != first, "a new acquisition must carry a new token"


async def test_renew_extends_only_our_own_token(redis: Any, key_prefix: str) -> None:
    mine = lease(redis, key_prefix, ttl=5.0)
    assert await mine.acquire()
    await redis.pexpire(mine.key, 1000)
    assert await mine.renew()
    assert await redis.pttl(mine.key) > 4000
    # The lease moved on (expired, someone else took it): renew must not
    # extend the new holder's key, and we know we lost it.
    await redis.set(mine.key, "other:1234", px=1000)
    assert not await mine.renew()
    assert mine.token is None and not mine.held
    assert await redis.get(mine.key) == b"other:1234"
    assert await redis.pttl(mine.key) <= 1000


async def test_release_deletes_only_our_own_token(redis: Any, key_prefix: str) -> None:
    mine = lease(redis, key_prefix)
    assert await mine.acquire()
    await mine.release()
    assert await redis.exists(mine.key) == 0 and mine.token is None
    # A stale holder releasing after the lease moved on leaves the new one.
    stale = lease(redis, key_prefix)
    assert await stale.acquire()
    await redis.set(stale.key, "other:1234", px=5000)
    await stale.release()
    assert await redis.get(stale.key) == b"other:1234"


async def test_check_asks_redis(redis: Any, key_prefix: str) -> None:
    mine = lease(redis, key_prefix, ttl=5.0)
    assert await mine.acquire()
    await mine.check()
    await redis.set(mine.key, "other:1234")
    assert mine.held, "locally it still looks held: only Redis knows"
    with pytest.raises(LeaseLost):
        await mine.check()
    assert mine.token is None
    with pytest.raises(LeaseLost):
        await mine.check()


async def test_check_compares_with_the_token_it_asked_about(
    redis: Any, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease key is gone and, while check()'s GET is in flight, the
    renewer notices and drops the token: None == None must not pass as held
    (it let a paused replica open an upload after losing the stream)."""
    mine = lease(redis, key_prefix, ttl=5.0)
    assert await mine.acquire()
    await redis.delete(mine.key)
    real_get = redis.get

    async def get_while_renewer_drops_token(key: str) -> Any:
        mine.token = None
        return await real_get(key)

    monkeypatch.setattr(redis, "get", get_while_renewer_drops_token)
    with pytest.raises(LeaseLost):
        await mine.check()


async def test_kept_renews_while_the_body_runs_and_releases(redis: Any, key_prefix: str) -> None:
    mine = lease(redis, key_prefix)
    assert await mine.acquire()
    async with mine.kept() as lost:
        # Outlive the TTL three times over: only renewals keep the key.
        deadline = time.monotonic() + 3 * TTL
        while time.monotonic() < deadline:
            assert await redis.get(mine.key) == (mine.token or "").encode()
            await asyncio.sleep(0.05)
        assert not lost.is_set()
    assert await redis.exists(mine.key) == 0, "kept() must release on exit"


@pytest.mark.parametrize("how", ["deleted", "changed"])
async def test_kept_sets_lost_when_the_lease_moves(redis: Any, key_prefix: str, how: str) -> None:
    mine = lease(redis, key_prefix)
    assert await mine.acquire()
    async with mine.kept() as lost:
        if how == "deleted":
            await redis.delete(mine.key)
        else:
            await redis.set(mine.key, "other:1234", px=10_000)
        async with asyncio.timeout(TTL * 3):
            await lost.wait()
        assert mine.token is None
    if how == "changed":
        assert await redis.get(mine.key) == b"other:1234", "released someone else's lease"


def idle_event(stream_id: str) -> StreamIdle:
    return StreamIdle(
        stream_id=stream_id,
        at=datetime.now(UTC),
        size=1,
        mtime_ns=1,
        reason="timeout",
        mp4="invalid",
    )


@pytest.mark.parametrize("moved", ["to another token", "away (expired)"])
async def test_fence_appends_only_while_the_token_holds(
    redis: Any, key_prefix: str, moved: str
) -> None:
    events_key = f"{key_prefix}:events"
    mine = lease(redis, key_prefix, ttl=5.0)
    assert await mine.acquire()
    fence = Fence(redis, events_key, mine)
    entry_id = await fence.append(idle_event("s1"), "me")
    assert [e[0].decode() for e in await redis.xrange(events_key)] == [entry_id]
    if moved == "to another token":
        await redis.set(mine.key, "other:1234")
    else:
        await redis.delete(mine.key)
    assert mine.token is not None, "locally still held: only the script can tell"
    with pytest.raises(LeaseLost):
        await fence.append(idle_event("s1"), "me")
    assert mine.token is None
    assert await redis.xlen(events_key) == 1, "a refused append reached the log"


class StealOnListParts:
    """An ObjectStore that, on the next ``list_parts``, gives the stream's
    lease to someone else (as if this process had paused past its TTL), and
    remembers which calls that end an upload were made."""

    def __init__(self, store: ObjectStore, redis: Any, lease_key: str) -> None:
        self._store = store
        self._redis = redis
        self._lease_key = lease_key
        self.armed = False
        self.ended: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def list_parts(self, key: str, upload_id: str) -> Any:
        if self.armed:
            self.armed = False
            await self._redis.set(self._lease_key, "thief:0000000000000000", px=60_000)
        return await self._store.list_parts(key, upload_id)

    async def complete_multipart(self, key: str, upload_id: str, parts: Any) -> str:
        self.ended.append("complete")
        return await self._store.complete_multipart(key, upload_id, parts)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        self.ended.append("abort")
        await self._store.abort_multipart(key, upload_id)


async def test_lease_lost_before_completion_leaves_the_upload_alone(
    make_config: Any, watch: Path, s3_client: Any, bucket: str, redis: Any
) -> None:
    """Every part is sent and recorded; the finalizer then loses the lease
    (while it re-lists the parts): it must not complete the upload, nor
    record anything, and the StreamIdle stays pending for the new holder."""
    dst = watch / "fenced.mp4"
    dst.write_bytes(os.urandom(12 * MiB))
    config = make_config()
    async with log_only(config) as (h, service):
        state = await two_parts_sent(h, service, dst)
        assert state.plan is not None  # the watcher records how it cut the file
        tail = final_parts(12 * MiB, state.plan)[-1]
        async with service.uploads.leased(state.stream_id) as held:
            assert held is not None and state.upload_id is not None
            s, fence = held
            await service.uploads.send(s, state.upload_id, [tail], "test", fence)
        lease_key = f"{config.redis_key_prefix}:lease:stream:{state.stream_id}"
        thief = StealOnListParts(service.deps.store, redis, lease_key)
        object.__setattr__(service.deps, "store", cast(ObjectStore, thief))
        service.uploads.forget(state)  # the finalizer lists the parts once more
        thief.armed = True
        after = await finalize_now(h, service, state, dst)
        pending = await redis.xpending(config.events_key, "finalizers")
    assert not thief.armed, "the lease was never taken away: the test did not run"
    assert thief.ended == [], "a replica without the lease ended the upload"
    assert after.status != "completed"
    assert [u["UploadId"] for u in open_uploads(s3_client, bucket)] == [state.upload_id]
    assert pending["pending"] == 1, "the StreamIdle must stay pending for the lease holder"


async def test_lease_lost_before_abort_leaves_the_upload_alone(
    make_config: Any, watch: Path, s3_client: Any, bucket: str, redis: Any
) -> None:
    """Ending a stream (deleted, truncated, a permanent error) aborts its
    upload; a holder whose lease moved on must neither abort nor record it."""
    dst = watch / "fenced.mp4"
    dst.write_bytes(os.urandom(12 * MiB))
    config = make_config()
    async with log_only(config) as (h, service):
        state = await two_parts_sent(h, service, dst)
        store = StealOnListParts(service.deps.store, redis, "unused")
        object.__setattr__(service.deps, "store", cast(ObjectStore, store))
        async with service.uploads.leased(state.stream_id) as held:
            assert held is not None
            s, fence = held
            await redis.set(fence.lease.key, "thief:0000000000000000", px=60_000)
            with pytest.raises(LeaseLost):
                await service.uploads.abort(s, fence)  # what the failer does first
        failed = [e for _, e in await h.events() if isinstance(e, StreamFailed)]
    assert store.ended == [], "a replica without the lease aborted the upload"
    assert failed == []
    assert [u["UploadId"] for u in open_uploads(s3_client, bucket)] == [state.upload_id]


async def test_lease_lost_before_create_opens_no_upload(
    make_config: Any, watch: Path, s3_client: Any, bucket: str, redis: Any
) -> None:
    """A holder that lost the stream (paused past its TTL between listing the
    uploads and creating one) must not open an upload nobody will record."""
    dst = watch / "fenced.mp4"
    dst.write_bytes(os.urandom(6 * MiB))
    async with log_only(make_config()) as (h, service):
        await service.start()
        await service.watcher.run_once()
        state = (await h.projection()).for_path(str(dst))
        assert state is not None
        async with service.uploads.leased(state.stream_id) as held:
            assert held is not None
            s, fence = held
            await redis.set(fence.lease.key, "thief:0000000000000000", px=60_000)
            with pytest.raises(LeaseLost):
                await service.uploads.create(s, fence)
    assert open_uploads(s3_client, bucket) == []
