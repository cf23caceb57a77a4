"""A replica that lost its lease, the way it happens in life: the process is
paused (SIGSTOP: a long GC pause, a frozen VM, a partition) in the middle of
an S3 call for a stream, past the lease TTL; another replica takes the stream
over; then the first one wakes up (SIGCONT) and carries on where it was.

Its S3 call completes (S3 cannot check tokens), but nothing it does after
that may reach the log or end the upload: no event from its REPLICA_ID about
the stream after the takeover, the object completes once, byte-exact, from
the other replica, and no multipart upload is left open.

The pause lands deterministically inside the stream's lease, one step before
an append: the paused replica reaches S3 through a ``GateProxy`` that holds
S3's answer to its first UploadPart, so it is stopped waiting for it (its
next step is recording the part), and the test checks the lease names it
before going on.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from cefmp4.dev.localservers import S3Endpoint
from tests.gateproxy import GateProxy
from tests.harness import MiB, ServiceProcess, log_only, service_config
from tests.test_pipeline import assert_clean, assert_stored

TTL = 3.0


async def about(redis: Any, events_key: str, stream_id: str) -> list[tuple[str, str, str]]:
    """(entry id, type, replica) of every event about ``stream_id``, in log order."""
    out = []
    for entry_id, fields in await redis.xrange(events_key):
        data = json.loads(fields.get(b"data", b"{}"))
        if data.get("stream_id") == stream_id:
            out.append((entry_id.decode(), fields[b"type"].decode(), fields[b"replica"].decode()))
    return out


async def until(condition: Any, what: str, timeout: float = 60.0) -> Any:
    """Poll an async condition until it returns something truthy."""
    async with asyncio.timeout(timeout):
        while True:
            if result := await condition():
                return result
            await asyncio.sleep(0.05)


async def test_replica_paused_past_its_lease_cannot_record_or_end_the_stream(
    tmp_path: Path, redis_url: str, key_prefix: str, bucket: str, s3_endpoint: S3Endpoint,
    s3_client: Any,
) -> None:  # fmt: skip
    watch = tmp_path / "watch"
    watch.mkdir()
    dst = watch / "cam.mp4"
    data = os.urandom(16 * MiB + 999)  # not an MP4: idle only after the timeout

    def config(**overrides: Any) -> Any:
        overrides = {"lease_ttl_seconds": TTL, "stream_timeout_seconds": 4.0, **overrides}
        return service_config(watch, redis_url, key_prefix, bucket, s3_endpoint, **overrides)

    redis: Any = aioredis.from_url(redis_url)
    events_key = config().events_key
    async with GateProxy(s3_endpoint.url) as gate:
        paused = ServiceProcess(
            config(s3_endpoint_url=gate.url, s3_timeout_seconds=120.0), tmp_path / "A.log", "A"
        )
        other = ServiceProcess(config(), tmp_path / "B.log", "B")
        try:
            await asyncio.to_thread(paused.start, 30)  # the proxy runs in this loop
            async with log_only(config()) as (h, _service):
                with dst.open("wb") as f:
                    # From here on, A waits for the answer to any UploadPart: it
                    # holds the stream, and its next step is to record the part.
                    gate.close(match="partNumber=")
                    f.write(data[: 6 * MiB])
                    f.flush()
                    stream = await until(
                        lambda: _in_call(h, gate, redis, key_prefix, dst), "A in an S3 call"
                    )
                    lease_key = f"{key_prefix}:lease:stream:{stream.stream_id}"
                    await asyncio.to_thread(other.start, 30)
                    os.kill(paused.pid, signal.SIGSTOP)
                    holder = await redis.get(lease_key)
                    assert holder is not None and holder.startswith(b"A:"), (
                        f"A is paused outside the stream's lease ({holder!r}): test setup broken"
                    )
                    # The recording goes on; B must take the stream over.
                    f.write(data[6 * MiB : 12 * MiB])
                    f.flush()
                    by_b = await until(
                        lambda: _first(redis, events_key, stream.stream_id, "B", "PartUploaded"),
                        "B sending parts of the stream",
                    )
                    history = await about(redis, events_key, stream.stream_id)
                    takeover = next(i for i, _t, r in history if r == "B")
                    assert not _after(takeover, by_b)
                    assert not (await redis.get(lease_key) or b"").startswith(b"A:")
                    # Both of A's leases moved on: the watcher's too, or A
                    # would still (rightly) be the one to report growth.
                    await until(
                        lambda: _held_by(redis, f"{key_prefix}:lease:watcher", b"B:"),
                        "B watching",
                    )
                    # A wakes up with its S3 answer and carries on, then stops.
                    gate.open()
                    os.kill(paused.pid, signal.SIGCONT)
                    await until(lambda: asyncio.sleep(0, gate.held == 0), "A's answer delivered")
                    code = await asyncio.to_thread(paused.terminate)
                    assert code == 0, paused.tail()
                    f.write(data[12 * MiB :])
                state = await h.terminal(dst, timeout=90)
                events = await about(redis, events_key, stream.stream_id)
        finally:
            for r in (paused, other):
                if r.proc is not None and r.proc.poll() is None:
                    os.kill(r.pid, signal.SIGCONT)
                r.stop()
            await redis.aclose()
    assert gate.ever_held > 0
    late = [(i, t) for i, t, r in events if r == "A" and _after(i, takeover)]
    assert late == [], f"A recorded {late} after B took the stream over"
    completed = [r for _i, t, r in events if t == "StreamCompleted"]
    assert completed == ["B"], events
    assert_stored(s3_client, bucket, state, data)
    assert_clean(s3_client, bucket, 1)


def _after(entry_id: str, other: str) -> bool:
    a, b = (tuple(map(int, x.split("-"))) for x in (entry_id, other))
    return a > b


async def _first(
    redis: Any, events_key: str, stream_id: str, replica: str, kind: str
) -> str | None:
    for entry_id, t, r in await about(redis, events_key, stream_id):
        if r == replica and t == kind:
            return entry_id
    return None


async def _in_call(h: Any, gate: GateProxy, redis: Any, key_prefix: str, dst: Path) -> Any:
    """The stream, once A holds its lease and waits at the gate for S3."""
    stream = (await h.projection()).for_path(str(dst))
    if stream is None or gate.held == 0:
        return None
    holder = await redis.get(f"{key_prefix}:lease:stream:{stream.stream_id}")
    return stream if holder is not None and holder.startswith(b"A:") else None


async def _held_by(redis: Any, key: str, prefix: bytes) -> bool:
    holder = await redis.get(key)
    return holder is not None and holder.startswith(prefix)
