"""End to end under faults: S3 behind a fault-injecting proxy, S3 down for a
while, Redis killed and restarted mid-recording.

Each test ends with the pipeline's checks (byte-exact object with its sidecar,
one object per recording, no open multipart upload) and two more: the faults
really fired (a fault test whose faults never happened proves nothing) and no
supervised task crashed, i.e. the service rode the fault out instead of
crash-looping through it. Waits are conditions on the event log; a sleep only
sets the length of an outage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from cefmp4.dev.localservers import RedisServer, S3Endpoint
from cefmp4.domain.events import FileSeen, StreamFailed
from tests import mp4gen
from tests.faultproxy import FaultProxy
from tests.harness import History, MiB, log_only, objects, open_uploads, running
from tests.test_pipeline import assert_clean, assert_stored

S3_TIMEOUT = 2.0  # per request; a stall must outlast it
OUTAGE_SECONDS = 5.0


@pytest.fixture(scope="session")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ~16 MiB MP4: three whole 5 MiB parts and a tail."""
    root = tmp_path_factory.mktemp("faults-mp4")
    return mp4gen.make_mp4(root / "16mib.mp4", seconds=2, size_hint_mb=16)


def assert_no_crash(registry: CollectorRegistry) -> None:
    """No supervised task restarted and no handler crashed (transient errors are fine)."""
    counted: dict[str, float] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "cefmp4_task_crashes_total" or (
                sample.name == "cefmp4_handler_errors_total"
                and sample.labels["kind"] in ("internal", "permanent")
            ):
                counted[f"{sample.name}{sample.labels}"] = sample.value
    assert not {k: v for k, v in counted.items() if v}, counted


async def write(f: BinaryIO, data: bytes, *, step: int = 256 * 1024) -> None:
    """Append like a camera: a few hundred KiB at a time."""
    for start in range(0, len(data), step):
        await asyncio.to_thread(f.write, data[start : start + step])
        await asyncio.to_thread(f.flush)
        await asyncio.sleep(0.01)


def has_part(path: Path, number: int) -> Callable[[History], bool]:
    def condition(p: History) -> bool:
        s = p.for_path(str(path))
        return s is not None and number in s.parts

    return condition


async def test_resets_slowdowns_and_stalls_on_the_way_to_s3(
    make_config: Any, watch: Path, recording: Path, s3_endpoint: S3Endpoint, s3_client: Any,
    bucket: str,
) -> None:  # fmt: skip
    dst = watch / "faulty.mp4"
    # Seed 7's fates for new connections: stall, slowdown, -, reset after
    # 3 MiB, -, -, slowdown, reset, reset, immediate reset, ... Connection 1
    # carries the start-up HEAD; the retries open 2 and 3; idle_close makes
    # each later burst of uploads open new ones, so all three kinds are met
    # whatever the timing. max_faults guarantees the run gets through.
    async with FaultProxy.to(
        s3_endpoint.url,
        seed=7,
        reset_rate=0.15,
        slowdown_rate=0.15,
        stall_rate=0.05,
        stall_seconds=S3_TIMEOUT + 1.5,
        max_faults=15,
        idle_close_seconds=0.25,
    ) as proxy:
        config = make_config(s3_endpoint_url=proxy.url, s3_timeout_seconds=S3_TIMEOUT)
        async with running(config) as h:
            await mp4gen.record_mdat_patch(recording, dst, chunk=256 * 1024, delay=0.05)
            state = await h.terminal(dst)
            failed = [e for _, e in await h.events() if isinstance(e, StreamFailed)]
    injected = proxy.injected
    assert injected.reset >= 1 and injected.slowdown >= 1 and injected.stall >= 1, injected
    assert not failed
    assert_stored(s3_client, bucket, state, recording.read_bytes())
    assert_clean(s3_client, bucket, 1)
    assert_no_crash(h.registry)


async def test_s3_down_mid_recording_then_back(
    make_config: Any, watch: Path, recording: Path, s3_endpoint: S3Endpoint, s3_client: Any,
    bucket: str,
) -> None:  # fmt: skip
    dst = watch / "outage.mp4"
    data = recording.read_bytes()
    async with FaultProxy.to(s3_endpoint.url) as proxy:
        config = make_config(s3_endpoint_url=proxy.url, s3_timeout_seconds=S3_TIMEOUT)
        async with running(config) as h:
            with dst.open("wb") as f:
                await write(f, data[: 6 * MiB])
                await h.until(has_part(dst, 1), what="part 1 before the outage")
                proxy.down = True  # resets live connections, then every new one
                await write(f, data[6 * MiB :])
            # The rest of the file, and then its idle timeout, meet a dead S3.
            await asyncio.sleep(OUTAGE_SECONDS)
            during = await h.projection()
            proxy.down = False
            state = await h.terminal(dst)
    assert proxy.injected.refused > 0, "the service never tried S3 during the outage"
    stalled = during.for_path(str(dst))
    assert stalled is not None and sorted(stalled.parts) == [1] and not stalled.terminal
    assert_stored(s3_client, bucket, state, data)
    assert_clean(s3_client, bucket, 1)
    assert_no_crash(h.registry)


async def test_s3_down_when_the_service_starts(
    make_config: Any, watch: Path, recording: Path, s3_endpoint: S3Endpoint, s3_client: Any,
    bucket: str,
) -> None:  # fmt: skip
    dst = watch / "early.mp4"
    async with FaultProxy.to(s3_endpoint.url) as proxy:
        proxy.down = True
        config = make_config(s3_endpoint_url=proxy.url, s3_timeout_seconds=S3_TIMEOUT)
        async with running(config) as h:
            await mp4gen.record_append(recording, dst, chunk=512 * 1024, delay=0.01)
            await asyncio.sleep(OUTAGE_SECONDS)
            proxy.down = False
            state = await h.terminal(dst)
    assert proxy.injected.refused > 0
    assert_stored(s3_client, bucket, state, recording.read_bytes())
    assert_clean(s3_client, bucket, 1)
    assert_no_crash(h.registry)


async def test_redis_killed_and_restarted_mid_recording(
    make_config: Any, watch: Path, recording: Path, local_redis_server: RedisServer,
    s3_client: Any, bucket: str,
) -> None:  # fmt: skip
    server = local_redis_server
    dst = watch / "redis-restart.mp4"
    data = recording.read_bytes()
    config = make_config()
    assert config.redis_url == server.url
    async with running(config) as h:
        with dst.open("wb") as f:
            await write(f, data[: 6 * MiB])
            await h.until(has_part(dst, 1), what="part 1 before the restart")
            before = await h.events()
            server.kill()  # SIGKILL; the AOF on disk is all that survives
            try:
                await write(f, data[6 * MiB : 11 * MiB])  # the watcher sees it, cannot log it
                await asyncio.sleep(1.0)
            finally:
                await asyncio.to_thread(server.start)
            await write(f, data[11 * MiB :])
        state = await h.terminal(dst)
        after = await h.events()
    # Everything the log held before the kill is still there (AOF replay).
    assert [i for i, _ in before] == [i for i, _ in after[: len(before)]]
    assert not [e for _, e in after if isinstance(e, StreamFailed)]
    assert_stored(s3_client, bucket, state, data)
    assert_clean(s3_client, bucket, 1)
    assert_no_crash(h.registry)


async def test_lost_create_response_leaves_no_orphan_upload(
    make_config: Any, watch: Path, s3_endpoint: S3Endpoint, s3_client: Any, bucket: str
) -> None:
    """S3 created the upload but its answer was lost: the retried create makes a
    second one; the first must not stay open (and be billed) until gc runs."""
    # The first connection's answer is lost after S3 created the upload.
    async with FaultProxy.to(s3_endpoint.url, lost_response_rate=1.0, max_faults=1) as proxy:
        # md5: no checksum probe (S3_CHECKSUM=auto) takes the first connection's fault.
        config = make_config(
            s3_endpoint_url=proxy.url, s3_timeout_seconds=S3_TIMEOUT, s3_checksum="md5"
        )
        async with log_only(config) as (h, service):
            seen = FileSeen(
                stream_id="s1",
                at=datetime.now(UTC),
                path=str(watch / "x.mp4"),
                rel_path="x.mp4",
                bucket=bucket,
                key="streams/s1/x.mp4",
                size=0,
                mtime_ns=0,
                inode=0,
            )
            await h.log.append(seen)
            async with service.uploads.leased("s1") as held:
                assert held is not None
                upload_id = await service.uploads.create(*held)
    if proxy.injected.lost_response != 1:  # not an AssertionError: the fault must fire
        raise RuntimeError(f"the fault did not fire: {proxy.injected}")
    assert [u["UploadId"] for u in open_uploads(s3_client, bucket)] == [upload_id]


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return sum(
        s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def until_true(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``check`` (a condition, not a sleep) until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def blocked_lines(logs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """The blocked / unblocked story the operator sees."""
    return [
        (e["log_level"], e["event"].split(":")[0])
        for e in logs
        if e["event"].startswith(("deployment blocked", "deployment unblocked"))
    ]


async def test_access_denied_for_a_while_then_back(
    make_config: Any, watch: Path, recording: Path, sources: mp4gen.Mp4Sources,
    s3_endpoint: S3Endpoint, s3_client: Any, bucket: str,
) -> None:  # fmt: skip
    """Revoked keys for a while: every recording waits on disk, none fails,
    and all of them go up byte-exact once S3 accepts again."""
    growing, small, large = watch / "growing.mp4", watch / "small.mp4", watch / "large.mp4"
    expected = {
        growing: recording.read_bytes(),
        small: sources.regular.read_bytes(),
        large: sources.large.read_bytes(),
    }
    async with FaultProxy.to(s3_endpoint.url) as proxy:
        config = make_config(s3_endpoint_url=proxy.url, s3_timeout_seconds=S3_TIMEOUT)
        with capture_logs() as logs:
            async with running(config) as h:

                def blocked() -> float:
                    return metric(h.registry, "cefmp4_blocked", cause="permissions")

                with growing.open("wb") as f:
                    await write(f, expected[growing][: 6 * MiB])
                    await h.until(has_part(growing, 1), what="part 1 before the denial")
                    proxy.deny = True
                    await write(f, expected[growing][6 * MiB :])
                await asyncio.to_thread(small.write_bytes, expected[small])
                await asyncio.to_thread(large.write_bytes, expected[large])
                await until_true(lambda: blocked() == 1, "the service to report blocked")
                # Every recording went idle while denied, so the finalizers met
                # the denial too; nothing was failed for it.
                during = await h.until(
                    lambda p: all((s := p.for_path(str(f))) is not None and s.idle is not None
                                  for f in expected),
                    what="every recording idle while denied",
                )  # fmt: skip
                assert not any(s.terminal for s in during.streams.values())
                assert blocked() == 1
                proxy.deny = False
                states = {path: await h.terminal(path) for path in expected}
                assert blocked() == 0
                failed = [e for _, e in await h.events() if isinstance(e, StreamFailed)]
    assert proxy.injected.denied > 0
    assert not failed
    for path, state in states.items():
        assert_stored(s3_client, bucket, state, expected[path])
    assert_clean(s3_client, bucket, 3)
    assert_no_crash(h.registry)
    assert blocked_lines(logs) == [
        ("warning", "deployment blocked"),
        ("info", "deployment unblocked"),
    ], blocked_lines(logs)


async def test_service_starts_while_access_is_denied(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_endpoint: S3Endpoint,
    s3_client: Any, bucket: str,
) -> None:  # fmt: skip
    """Denied at start: the service waits at ensure_bucket (no crash), says so
    once, and uploads what it finds once S3 accepts."""
    dst = watch / "waiting.mp4"
    async with FaultProxy.to(s3_endpoint.url) as proxy:
        proxy.deny = True
        config = make_config(s3_endpoint_url=proxy.url, s3_timeout_seconds=S3_TIMEOUT)
        with capture_logs() as logs:
            async with running(config) as h:
                await until_true(
                    lambda: metric(h.registry, "cefmp4_blocked", cause="permissions") == 1,
                    "start to report blocked",
                )
                await asyncio.to_thread(dst.write_bytes, sources.regular.read_bytes())
                proxy.deny = False
                state = await h.terminal(dst)
                assert metric(h.registry, "cefmp4_blocked") == 0
    assert proxy.injected.denied > 0
    assert_stored(s3_client, bucket, state, sources.regular.read_bytes())
    assert_clean(s3_client, bucket, 1)
    assert_no_crash(h.registry)
    assert blocked_lines(logs) == [
        ("warning", "deployment blocked"),
        ("info", "deployment unblocked"),
    ]
    assert objects(s3_client, bucket)  # the bucket is there and holds the recording
