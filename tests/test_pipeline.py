"""End to end: recorders write into WATCH_DIR, objects appear in a real S3
(SeaweedFS, which enforces the 5 MiB part minimum) via a real Redis log.

Every test ends with the same three checks: the object equals the file byte
for byte, there is exactly one object (plus its sidecar) per recording, and no
multipart upload is left open.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cefmp4.adapters import checksums
from cefmp4.domain.events import FileSeen, PartUploaded, StreamCompleted, StreamFailed, StreamIdle
from cefmp4.runtime.service import Service
from projections.streams import StreamState
from tests import mp4gen
from tests.harness import (
    PYTHON,
    Harness,
    MiB,
    log_only,
    objects,
    open_uploads,
    running,
    subprocess_env,
)


def assert_stored(
    s3_client: Any, bucket: str, state: StreamState, expected: bytes
) -> dict[str, Any]:
    """Byte-exact object + its sidecar; returns the sidecar."""
    assert state.status == "completed", (state.failure_reason, state.failure_detail)
    stored = objects(s3_client, bucket)
    assert stored[state.key] == expected, "object differs from the file"
    sidecar = json.loads(stored[f"{state.key}.metadata.json"])
    assert sidecar["total_size_bytes"] == len(expected)
    assert sidecar["stream_id"] == state.stream_id

    # The object's integrity proof: the store-verified full-object CRC (crc
    # modes), the SHA-256 (SIDECAR_SHA256), and always the MD5 ETag.
    if sidecar["sha256"] is not None:
        assert sidecar["sha256"] == hashlib.sha256(expected).hexdigest()
    if sidecar["checksum"] is not None:
        algorithm = sidecar["checksum"]["algorithm"].lower()
        assert sidecar["checksum"]["value"] == checksums.encode(
            algorithm, checksums.crc_value(algorithm, expected)
        )
    return dict(sidecar)


def assert_clean(s3_client: Any, bucket: str, recordings: int) -> None:
    keys = objects(s3_client, bucket).keys()
    videos = [k for k in keys if not k.endswith(".metadata.json")]
    assert len(videos) == recordings, sorted(keys)
    assert open_uploads(s3_client, bucket) == []


async def test_slowly_growing_file_streams_while_written(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    dst = watch / "cam1" / "slow.mp4"
    dst.parent.mkdir()
    data = sources.large.read_bytes()
    async with running(make_config()) as h:
        with dst.open("wb") as recorder:
            # Like a camera: a few hundred KiB at a time. Halfway, wait until a
            # part is in S3 - streaming means it goes up while the file grows.
            for start in range(0, 6 * MiB, 256 * 1024):
                recorder.write(data[start : start + 256 * 1024])
                recorder.flush()
                await asyncio.sleep(0.01)
            await h.until(
                lambda p: (s := p.for_path(str(dst))) is not None and 1 in s.parts,
                what="part 1 uploaded while the file grows",
            )
            for start in range(6 * MiB, len(data), 256 * 1024):
                recorder.write(data[start : start + 256 * 1024])
                recorder.flush()
                await asyncio.sleep(0.01)
        state = await h.terminal(dst)
        events = await h.events()
    sidecar = assert_stored(s3_client, bucket, state, data)
    assert_clean(s3_client, bucket, 1)
    assert state.key.endswith("/cam1/slow.mp4")
    assert sidecar["mp4_complete"] is True
    assert sidecar["duration_seconds"] == pytest.approx(2.0, abs=0.2)
    # Every non-last part is a whole part of the plan (S3 would reject less).
    completed = next(e for _, e in events if isinstance(e, StreamCompleted))
    sizes = [p.size for n, p in sorted(state.parts.items()) if n <= completed.parts]
    assert len(sizes) == 3 and all(s == 5 * MiB for s in sizes[:-1])


async def test_mdat_size_patched_back_at_the_end(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    dst = watch / "patched.mp4"
    async with running(make_config()) as h:
        await mp4gen.record_mdat_patch(sources.large, dst, chunk=512 * 1024, delay=0.02)
        state = await h.terminal(dst)
        events = await h.events()
    assert_stored(s3_client, bucket, state, sources.large.read_bytes())
    assert_clean(s3_client, bucket, 1)
    sent_part1 = [e for _, e in events if isinstance(e, PartUploaded) and e.part_number == 1]
    assert len(sent_part1) >= 2, "the patched first part was not sent again"


async def test_faststart_rewrite_shifts_the_whole_file(
    make_config: Any,
    watch: Path,
    sources: mp4gen.Mp4Sources,
    large_faststart: Path,
    s3_client: Any,
    bucket: str,
) -> None:
    dst = watch / "faststart.mp4"
    async with running(make_config()) as h:
        await mp4gen.record_faststart(
            sources.large, dst, chunk=512 * 1024, delay=0.02, faststart_version=large_faststart
        )
        state = await h.terminal(dst)
    sidecar = assert_stored(s3_client, bucket, state, large_faststart.read_bytes())
    assert sidecar["mp4_complete"] is True
    assert_clean(s3_client, bucket, 1)


async def test_fragmented_file_finishes_on_idle_timeout(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    # Without its closing mfra: with one, the writer's close would finish it
    # at once (tests/test_close_fast_path.py) if the close watch saw it.
    data = mp4gen.strip_mfra(sources.fragmented.read_bytes())
    src = watch.parent / "no-mfra.mp4"
    src.write_bytes(data)
    dst = watch / "frag.mp4"
    async with running(make_config(stream_timeout_seconds=2.0)) as h:
        await mp4gen.record_append(src, dst, chunk=64 * 1024, delay=0.01)
        state = await h.terminal(dst)
    sidecar = assert_stored(s3_client, bucket, state, data)
    assert sidecar["mp4_structure"] == "fragmented"
    assert state.idle is not None and state.idle.reason == "timeout"
    assert_clean(s3_client, bucket, 1)


async def test_small_file_is_one_put(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    dst = watch / "small.MP4"  # the extension matches case-insensitively
    async with running(make_config()) as h:
        await mp4gen.record_append(sources.regular, dst, chunk=64 * 1024, delay=0.0)
        state = await h.terminal(dst)
    assert state.upload_id is None
    assert state.completion is not None and state.completion.parts == 0
    sidecar = assert_stored(s3_client, bucket, state, sources.regular.read_bytes())
    assert sidecar["chunks"][0]["size_bytes"] == sources.regular.stat().st_size
    assert_clean(s3_client, bucket, 1)


async def test_empty_file_fails_with_reason_and_no_object(
    make_config: Any, watch: Path, s3_client: Any, bucket: str
) -> None:
    dst = watch / "empty.mp4"
    async with running(make_config(stream_timeout_seconds=1.0)) as h:
        dst.touch()
        state = await h.terminal(dst)
    assert state.status == "failed" and state.failure_reason == "empty"
    assert_clean(s3_client, bucket, 0)


async def test_not_an_mp4_is_uploaded_and_sidecar_says_why(
    make_config: Any, watch: Path, s3_client: Any, bucket: str
) -> None:
    dst = watch / "garbage.mp4"
    content = os.urandom(6 * MiB + 123)
    async with running(make_config(stream_timeout_seconds=1.5)) as h:
        dst.write_bytes(content)
        state = await h.terminal(dst)
    sidecar = assert_stored(s3_client, bucket, state, content)
    assert sidecar["mp4_complete"] is False
    assert sidecar["mp4_structure"] == "invalid"
    assert sidecar["duration_seconds"] is None
    assert sidecar["ffprobe_error"]
    assert state.idle is not None and state.idle.reason == "timeout"
    assert_clean(s3_client, bucket, 1)


async def test_deleted_mid_upload_aborts_the_upload(
    make_config: Any, watch: Path, s3_client: Any, bucket: str
) -> None:
    dst = watch / "deleted.mp4"
    async with running(make_config()) as h:
        with dst.open("wb") as f:
            f.write(os.urandom(11 * MiB))
        await h.until(
            lambda p: (s := p.for_path(str(dst))) is not None and len(s.parts) == 2,
            what="two parts uploaded",
        )
        dst.unlink()
        state = await h.terminal(dst)
    assert state.status == "failed" and state.failure_reason == "deleted"
    assert_clean(s3_client, bucket, 0)


async def test_truncate_and_rewrite_becomes_a_new_stream(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    dst = watch / "reused.mp4"
    async with running(make_config()) as h:
        await mp4gen.record_append(sources.large, dst, chunk=1024 * 1024, delay=0.0)
        first = await h.terminal(dst)
        await mp4gen.truncate_and_rewrite(sources.regular, dst)
        await h.until(
            lambda p: (s := p.for_path(str(dst))) is not None and s.stream_id != first.stream_id,
            what="a second stream",
        )
        second = await h.terminal(dst)
    assert first.key != second.key
    assert_stored(s3_client, bucket, first, sources.large.read_bytes())
    assert_stored(s3_client, bucket, second, sources.regular.read_bytes())
    assert_clean(s3_client, bucket, 2)


async def test_truncated_while_uploading_abandons_the_first_stream(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    dst = watch / "restarted.mp4"
    async with running(make_config()) as h:
        with dst.open("wb") as f:
            f.write(os.urandom(11 * MiB))
        first = await h.until(
            lambda p: (s := p.for_path(str(dst))) is not None and len(s.parts) == 2,
            what="two parts uploaded",
        )
        first_id = first.by_path[str(dst)]
        await mp4gen.truncate_and_rewrite(sources.regular, dst)
        second = await h.terminal(dst)
        p = await h.projection()
    assert p.streams[first_id].failure_reason == "truncated"
    assert second.stream_id != first_id
    assert_stored(s3_client, bucket, second, sources.regular.read_bytes())
    assert_clean(s3_client, bucket, 1)


async def test_files_present_at_start_and_no_reupload_after_restart(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    (watch / "sub").mkdir()
    a, b = watch / "a.mp4", watch / "sub" / "b.mp4"
    a.write_bytes(sources.large.read_bytes())
    b.write_bytes(sources.regular.read_bytes())
    (watch / ".hidden.mp4").write_bytes(b"x")  # ignored: hidden
    (watch / "notes.txt").write_text("ignored: not an mp4")
    config = make_config()
    async with running(config) as h:
        state_a = await h.terminal(a)
        state_b = await h.terminal(b)
        before = len(await h.events())
    assert_stored(s3_client, bucket, state_a, sources.large.read_bytes())
    assert_stored(s3_client, bucket, state_b, sources.regular.read_bytes())
    assert_clean(s3_client, bucket, 2)
    # Restart, one deterministic pass of every worker: nothing to do.
    async with log_only(config) as (h, service):
        await service.start()
        await service.watcher.run_once()
        for consumer in service.consumers:
            await consumer.run_once()
        after = await h.events()
    assert len(after) == before, after[before:]
    seen = [e for _, e in after if isinstance(e, FileSeen)]
    assert sorted(e.rel_path for e in seen) == ["a.mp4", "sub/b.mp4"]


async def test_kill_9_mid_upload_then_restart_finishes_byte_exact(
    make_config: Any, watch: Path, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    config = make_config()
    env = subprocess_env(config)
    dst = watch / "killed.mp4"
    content = os.urandom(23 * MiB + 17)
    log_file = (tmp_path / "service.log").open("ab")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [PYTHON, "-m", "cefmp4", "run"], env=env, stdout=log_file, stderr=log_file
        )

    proc = start()
    try:
        async with log_only(config) as (h, _service):
            with dst.open("wb") as f:
                f.write(content[: 12 * MiB])
                f.flush()
                await h.until(
                    lambda p: (s := p.for_path(str(dst))) is not None and len(s.parts) >= 1,
                    what="first part",
                )
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                f.write(content[12 * MiB :])
            proc = start()
            state = await h.terminal(dst, timeout=90)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()
    assert proc.returncode == 0, (tmp_path / "service.log").read_text()[-3000:]
    assert_stored(s3_client, bucket, state, content)
    assert_clean(s3_client, bucket, 1)


async def test_unknown_events_and_failures_do_not_stop_the_service(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    """A foreign entry in the log is skipped; later recordings still complete."""
    config = make_config()
    async with running(config) as h:
        await h.log._redis.xadd(config.events_key, {"type": "FromTheFuture", "v": "9"})
        dst = watch / "after.mp4"
        await asyncio.to_thread(dst.write_bytes, sources.regular.read_bytes())
        state = await h.terminal(dst)
        failed = [e for _, e in await h.events() if isinstance(e, StreamFailed)]
    assert not failed
    assert_stored(s3_client, bucket, state, sources.regular.read_bytes())


async def test_restart_adopts_upload_and_parts_the_log_lacks(
    make_config: Any, watch: Path, s3_client: Any, bucket: str
) -> None:
    """Crash after CreateMultipartUpload and UploadPart, before their events:
    the restart adopts the upload (no second one) and the part (MD5 = ETag)
    instead of leaving an orphan or sending the bytes again."""
    config = make_config()
    dst = watch / "crashed.mp4"
    content = os.urandom(11 * MiB)
    dst.write_bytes(content)
    async with log_only(config) as (h, service):
        await service.start()
        await service.watcher.run_once()
        state = (await h.projection()).for_path(str(dst))
        assert state is not None and state.upload_id is None
        store = service.deps.store
        upload_id = await store.create_multipart(state.key, "video/mp4")
        part1 = content[: 5 * MiB]
        digest = hashlib.md5(part1).digest()
        await store.upload_part(state.key, upload_id, 1, part1, base64.b64encode(digest).decode())
        uploader = next(c for c in service.consumers if c.group == "uploaders")
        await uploader.run_once()
        state = (await h.projection()).for_path(str(dst))
        sent = service.metrics.parts.labels("growing")._value.get()
    assert state is not None and state.upload_id == upload_id
    assert sorted(state.parts) == [1, 2]
    assert state.parts[1].etag == digest.hex()
    assert sent == 1, "part 1 was sent again instead of adopted"
    assert [u["UploadId"] for u in open_uploads(s3_client, bucket)] == [upload_id]


@pytest.mark.parametrize("poll", [True, False], ids=["WATCH_POLL=true", "WATCH_POLL=false"])
async def test_polling_mode_for_network_mounts(
    make_config: Any, watch: Path, tmp_path: Path, sources: mp4gen.Mp4Sources, s3_client: Any,
    bucket: str, poll: bool,
) -> None:  # fmt: skip
    """Polling sees what inotify does not. A directory moved into WATCH_DIR
    with a recording already inside gets one inotify event, for the directory
    (filtered: not a recording), and none for the file - like a remote write
    on NFS, only a poll notices it. With the rescan far beyond the test and
    the file not live, the poller is the only way the file can be found:
    with WATCH_POLL=true it is uploaded; the same scenario with
    WATCH_POLL=false is the control: a recording written *after* the move is
    seen, the moved-in one is not, so it is the poll that found it above."""
    config = make_config(watch_poll=poll, poll_interval_seconds=0.2, rescan_interval_seconds=600.0)
    data = sources.regular.read_bytes()
    staged = tmp_path / "outside" / "sub"
    staged.mkdir(parents=True)
    (staged / "moved.mp4").write_bytes(data)
    moved = watch / "sub" / "moved.mp4"

    def seen(path: Path) -> Callable[[Any], bool]:
        return lambda p: p.for_path(str(path)) is not None

    async with running(config) as h:
        # The first scan is done (it found this), and notifications run (they found that).
        (watch / "a.mp4").write_bytes(data)
        await h.until(seen(watch / "a.mp4"), what="the first scan")
        (watch / "b.mp4").write_bytes(data)
        await h.until(seen(watch / "b.mp4"), what="notifications running")
        os.rename(staged, watch / "sub")
        if poll:
            state = await h.terminal(moved)
        else:
            # Later than the move, and sorted after it within one batch.
            (watch / "zz.mp4").write_bytes(data)
            p = await h.until(seen(watch / "zz.mp4"), what="the write after the move")
    if poll:
        assert_stored(s3_client, bucket, state, data)
    else:
        assert p.for_path(str(moved)) is None, (
            "inotify saw the moved-in file: the test proves nothing"
        )


async def test_sidecar_describes_the_first_of_two_completions(
    make_config: Any, watch: Path, s3_client: Any, bucket: str
) -> None:
    """Two finalizers raced: the second StreamCompleted must not rewrite the
    sidecar with its own figures (the projection keeps the first)."""
    config = make_config()
    now = datetime.now(UTC)
    seen = FileSeen(
        stream_id="s1",
        at=now,
        path=str(watch / "x.mp4"),
        rel_path="x.mp4",
        bucket=bucket,
        key="streams/s1/x.mp4",
        size=10,
        mtime_ns=1,
        inode=1,
    )
    first, second = (
        StreamCompleted(
            stream_id="s1",
            at=now + timedelta(seconds=i),
            bucket=bucket,
            key=seen.key,
            size=10,
            etag=f"etag{i}",
            sha256="0" * 64,
            mtime_ns=1,
            parts=0,
            mp4="invalid",
        )
        for i in (1, 2)
    )
    async with log_only(config) as (h, service):
        for event in (seen, first, second):
            await h.log.append(event)
        metadata = next(c for c in service.consumers if c.group == "metadata")
        await metadata.run_once()
        state = (await h.projection()).streams["s1"]
    doc = json.loads(objects(s3_client, bucket)["streams/s1/x.mp4.metadata.json"])
    assert doc["etag"] == "etag1"
    assert state.metadata_key == "streams/s1/x.mp4.metadata.json"


async def two_parts_sent(h: Harness, service: Service, dst: Path) -> StreamState:
    """One pass of the watcher and the uploaders over a finished 12 MiB file."""
    await service.start()
    await service.watcher.run_once()
    await next(c for c in service.consumers if c.group == "uploaders").run_once()
    state = (await h.projection()).for_path(str(dst))
    assert state is not None and state.upload_id is not None and sorted(state.parts) == [1, 2]
    return state


async def finalize_now(h: Harness, service: Service, state: StreamState, dst: Path) -> StreamState:
    """Say the file is idle (as the watcher would) and run one finalizer pass."""
    stat = dst.stat()
    await h.log.append(
        StreamIdle(
            stream_id=state.stream_id,
            at=datetime.now(UTC),
            size=stat.st_size,
            mtime_ns=stat.st_mtime_ns,
            reason="timeout",
            mp4="invalid",
        )
    )
    await next(c for c in service.consumers if c.group == "finalizers").run_once()
    return (await h.projection()).streams[state.stream_id]


async def test_invalid_part_at_completion_reconciles_with_the_store(
    make_config: Any, watch: Path, s3_client: Any, bucket: str
) -> None:
    """The log and the store disagree about a part's ETag (e.g. a part re-sent
    by a replica whose event was lost): completion answers InvalidPart; the
    finalizer lists the parts again, adopts what the store has, completes."""
    dst = watch / "disagree.mp4"
    content = os.urandom(12 * MiB)
    dst.write_bytes(content)
    async with log_only(make_config()) as (h, service):
        state = await two_parts_sent(h, service, dst)
        part2 = state.parts[2]
        await h.log.append(
            PartUploaded(
                stream_id=state.stream_id,
                at=datetime.now(UTC),
                upload_id=state.upload_id or "",
                part_number=2,
                offset=part2.offset,
                size=part2.size,
                etag="0" * 32,
                md5=part2.md5,
            )
        )
        state = await finalize_now(h, service, state, dst)
    assert state.status == "completed", (state.failure_reason, state.failure_detail)
    assert objects(s3_client, bucket)[state.key] == content
    assert open_uploads(s3_client, bucket) == []


async def test_upload_aborted_behind_our_back_is_replaced(
    make_config: Any, watch: Path, s3_client: Any, bucket: str
) -> None:
    """A lifecycle rule (or a person) aborted the stream's multipart upload:
    NoSuchUpload starts a new upload and every part is sent again."""
    dst = watch / "lifecycle.mp4"
    content = os.urandom(12 * MiB)
    dst.write_bytes(content)
    async with log_only(make_config()) as (h, service):
        state = await two_parts_sent(h, service, dst)
        s3_client.abort_multipart_upload(Bucket=bucket, Key=state.key, UploadId=state.upload_id)
        after = await finalize_now(h, service, state, dst)
    assert after.status == "completed", (after.failure_reason, after.failure_detail)
    assert after.upload_id != state.upload_id
    assert objects(s3_client, bucket)[after.key] == content
    assert open_uploads(s3_client, bucket) == []
