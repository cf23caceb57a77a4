"""SIGTERM / SIGINT with the real service as a child process.

README: stop taking work, let in-flight parts finish within
``SHUTDOWN_GRACE_SECONDS``, acknowledge only what completed, release leases,
exit 0; a second signal exits at once. Each promise is checked on its own
observable: the exit code, the ``<prefix>:lease:*`` keys right after exit
(TTLs long enough that expiry cannot stand in for a release), ListParts
against the log's ``PartUploaded``, and XPENDING of the consumer groups.

An upload is held in flight with a ``GateProxy`` between the service and S3:
the part's answer waits at the gate until the test lets it through, so "a
part in flight at the signal" is a fact, not a timing guess.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from cefmp4.domain.config import Config
from cefmp4.domain.events import PartUploaded
from cefmp4.domain.partplan import PartPlan, whole_parts
from tests.gateproxy import GateProxy
from tests.harness import MiB, ServiceProcess, log_only

LONG_TTL = 60.0  # leases cannot expire during a test: only a release removes them


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def lease_keys(redis: Any, config: Config) -> list[bytes]:
    return [k async for k in redis.scan_iter(f"{config.redis_key_prefix}:lease:*")]


async def wait_for(condition: Any, what: str, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_signal_exits_0_and_releases_every_lease(
    make_config: Any, tmp_path: Path, redis: Any, sig: signal.Signals
) -> None:
    config = make_config(lease_ttl_seconds=LONG_TTL)
    service = ServiceProcess(config, tmp_path / "svc.log")
    try:
        await asyncio.to_thread(service.start, 30)
        assert await redis.exists(f"{config.redis_key_prefix}:lease:watcher")
        service.proc.send_signal(sig)  # type: ignore[union-attr]
        code = await asyncio.to_thread(service.proc.wait, 30)  # type: ignore[union-attr]
        left = await lease_keys(redis, config)
    finally:
        service.stop()
    assert code == 0, service.tail()
    assert left == [], f"leases left behind after a clean stop: {left}"


async def test_second_signal_exits_at_once_with_130(
    make_config: Any, tmp_path: Path, s3_endpoint: Any
) -> None:
    dst = make_config().watch_root / "held.mp4"
    async with GateProxy(s3_endpoint.url) as gate:
        config = make_config(
            s3_endpoint_url=gate.url, s3_timeout_seconds=120.0, shutdown_grace_seconds=120.0
        )
        service = ServiceProcess(config, tmp_path / "svc.log")
        try:
            await asyncio.to_thread(service.start, 30)
            gate.close()  # whatever the service asks S3 now stays in flight
            dst.write_bytes(os.urandom(6 * MiB))
            await wait_for(lambda: gate.held > 0, "an S3 call in flight")
            service.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            await wait_for(lambda: "stopping: finishing in-flight work" in service.log_tail(),
                           "the first signal handled")  # fmt: skip
            # The grace period (120 s) is far away and the call cannot finish:
            # only the second signal can end the process now.
            assert service.proc.poll() is None  # type: ignore[union-attr]
            service.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            code = await asyncio.to_thread(service.proc.wait, 30)  # type: ignore[union-attr]
        finally:
            gate.open()
            service.stop()
    assert code == 130, service.tail()


async def test_sigterm_mid_part_finishes_it_and_acknowledges_only_what_completed(
    make_config: Any, tmp_path: Path, s3_endpoint: Any, s3_client: Any, bucket: str,
    redis: Any,
) -> None:  # fmt: skip
    dst = make_config().watch_root / "term.mp4"
    data = os.urandom(11 * MiB)
    async with GateProxy(s3_endpoint.url) as gate:
        config = make_config(
            s3_endpoint_url=gate.url, lease_ttl_seconds=LONG_TTL, s3_timeout_seconds=120.0,
            shutdown_grace_seconds=60.0,
        )  # fmt: skip
        service = ServiceProcess(config, tmp_path / "svc.log")
        try:
            await asyncio.to_thread(service.start, 30)
            async with log_only(make_config()) as (h, _service):
                with dst.open("wb") as f:
                    f.write(data[: 6 * MiB])
                    f.flush()
                    await h.until(lambda p: (s := p.for_path(str(dst))) is not None
                                  and 1 in s.parts, what="part 1")  # fmt: skip
                    gate.close()
                    f.write(data[6 * MiB :])
                    f.flush()
                    await wait_for(
                        lambda: gate.held > 0 and any("partNumber=2" in r for r in gate.requests),
                        "part 2 in flight",
                    )
                    service.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                    await wait_for(lambda: "stopping: finishing in-flight work"
                                   in service.log_tail(), "the signal handled")  # fmt: skip
                    sent_at_signal = await parts_in_log(h)
                    gate.open()  # the in-flight part may finish now
                    code = await asyncio.to_thread(service.proc.wait, 60)  # type: ignore[union-attr]
                left = await lease_keys(redis, config)
                history = await h.projection()
                entries = await redis.xrange(config.events_key)
                pending = {
                    g: await redis.xpending_range(config.events_key, g, "-", "+", 1000)
                    for g in ("uploaders", "finalizers", "metadata")
                }
                groups = {
                    g["name"].decode(): g for g in await redis.xinfo_groups(config.events_key)
                }
        finally:
            gate.open()
            service.stop()
    assert code == 0, service.tail()
    assert left == [], f"leases left behind: {left}"
    state = history.for_path(str(dst))
    assert state is not None and state.upload_id is not None
    assert sent_at_signal == {1} and set(state.parts) == {1, 2}, "the in-flight part did not finish"
    # Every part the log records is in the store with that ETag.
    listed = s3_client.list_parts(Bucket=bucket, Key=state.key, UploadId=state.upload_id)
    in_store = {p["PartNumber"]: p["ETag"].strip('"') for p in listed.get("Parts", [])}
    assert {n: p.etag for n, p in state.parts.items()} == in_store
    # Acknowledged = effect recorded; pending = effect not recorded.
    delivered = groups["uploaders"]["last-delivered-id"].decode()
    pending_ids = {p["message_id"].decode() for p in pending["uploaders"]}
    for entry_id, fields in entries:
        kind = fields[b"type"].decode()
        if kind not in ("FileSeen", "BytesAvailable") or _after(entry_id.decode(), delivered):
            continue
        size = json.loads(fields[b"data"])["size"]
        plan = state.plan or PartPlan.uniform(5 * MiB)
        done = all(n in state.parts for n in (s.number for s in whole_parts(size, plan)))
        acked = entry_id.decode() not in pending_ids
        assert acked == done, (kind, size, acked, sorted(state.parts))
    assert pending["finalizers"] == [] and pending["metadata"] == []


async def parts_in_log(h: Any) -> set[int]:
    return {e.part_number for _, e in await h.events() if isinstance(e, PartUploaded)}


def _after(entry_id: str, other: str) -> bool:
    a, b = (tuple(map(int, x.split("-"))) for x in (entry_id, other))
    return a > b
