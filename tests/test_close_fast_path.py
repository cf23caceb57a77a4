"""The close fast path end to end: a writer's close (or rename into place)
of a finished MP4 finalizes it without waiting for quiet time.

Real Redis, real SeaweedFS, the service in-process, real inotify. The quiet
rules are pushed far out (SETTLE_SECONDS 20, STREAM_TIMEOUT_SECONDS 30), so
a recording that finishes before them, with ``StreamIdle.cause == "closed"``,
went by the close. No timing target is asserted: the waits are deadlines
shorter than the settle time, which the quiet path could not meet.

The adapter (``cefmp4.adapters.closes``) is tested on its own below: facts
for closes and renames, new directories, hidden ones skipped, the limits.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cefmp4.adapters import closes
from cefmp4.domain.events import StreamIdle
from projections.streams import StreamState
from tests import mp4gen
from tests.gateproxy import GateProxy
from tests.harness import Harness, History, objects, open_uploads, running
from tests.test_pipeline import assert_clean, assert_stored

# The quiet rules would take 20 s (complete) or 30 s (anything): far beyond
# the deadline, so only the close can finish a file in time.
SLOW_QUIET = {"settle_seconds": 20.0, "stream_timeout_seconds": 30.0}
DEADLINE = 15.0


async def _idles(h: Harness, state: StreamState) -> list[StreamIdle]:
    return [e for _, e in await h.events() if isinstance(e, StreamIdle)
            and e.stream_id == state.stream_id]  # fmt: skip


async def _closes_on(h: Harness) -> None:
    """Wait until the close watch is up: a close before it is not seen."""
    for _ in range(int(DEADLINE / 0.02)):
        if h.registry.get_sample_value("cefmp4_close_notifications") == 1:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the close watch did not start")


async def _finished_by_close(h: Harness, dst: Path, mp4: str) -> StreamState:
    state = await h.terminal(dst, timeout=DEADLINE)
    idles = await _idles(h, state)
    assert idles, "completed without a StreamIdle"
    last = idles[-1]
    assert (last.cause, last.reason, last.mp4) == ("closed", "settled", mp4), last
    assert last.size == state.size
    assert h.registry.get_sample_value("cefmp4_close_notifications") == 1
    return state


async def test_plain_mp4_written_then_closed(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    dst = watch / "cam1" / "plain.mp4"
    dst.parent.mkdir()  # before the service starts: watched from the first scan
    async with running(make_config(**SLOW_QUIET)) as h:
        await _closes_on(h)
        await mp4gen.record_append(sources.regular, dst, chunk=64 * 1024, delay=0.01)
        state = await _finished_by_close(h, dst, "complete")
    assert_stored(s3_client, bucket, state, sources.regular.read_bytes())
    assert_clean(s3_client, bucket, 1)


async def test_faststart_rewrite_finishes_at_its_close(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    """Complete-looking half way (regular layout, before the in-place
    rewrite), but the writer has not closed it: only the final close counts."""
    dst = watch / "fast.mp4"
    async with running(make_config(**SLOW_QUIET)) as h:
        await _closes_on(h)
        await mp4gen.record_faststart(
            sources.regular,
            dst,
            chunk=64 * 1024,
            delay=0.01,
            faststart_version=sources.faststart,
            rewrite_delay=0.01,
        )
        state = await _finished_by_close(h, dst, "complete")
    assert_stored(s3_client, bucket, state, sources.faststart.read_bytes())
    assert_clean(s3_client, bucket, 1)


async def test_fragmented_with_mfra_finishes_at_its_close(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    dst = watch / "frag.mp4"
    async with running(make_config(**SLOW_QUIET)) as h:
        await _closes_on(h)
        await mp4gen.record_append(sources.fragmented, dst, chunk=64 * 1024, delay=0.01)
        state = await _finished_by_close(h, dst, "fragmented")
    assert_stored(s3_client, bucket, state, sources.fragmented.read_bytes())
    assert_clean(s3_client, bucket, 1)


async def test_fragmented_without_mfra_waits_for_the_idle_timeout(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    """Nothing in the bytes says it is over: closed or not, the timeout decides."""
    data = mp4gen.strip_mfra(sources.fragmented.read_bytes())
    src = watch.parent / "no-mfra.mp4"
    src.write_bytes(data)
    dst = watch / "frag.mp4"
    config = make_config(settle_seconds=0.5, stream_timeout_seconds=3.0)
    async with running(config) as h:
        await _closes_on(h)
        await mp4gen.record_append(src, dst, chunk=64 * 1024, delay=0.01)
        state = await h.terminal(dst)
        idles = await _idles(h, state)
        assert h.registry.get_sample_value("cefmp4_close_notifications") == 1
    assert [(i.cause, i.reason, i.mp4) for i in idles] == [("quiet", "timeout", "fragmented")]
    assert_stored(s3_client, bucket, state, data)
    assert_clean(s3_client, bucket, 1)


async def test_rename_into_place(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    """Written under a hidden temp name, renamed in: IN_MOVED_TO is the close."""
    dst = watch / "cam2" / "moved.mp4"
    async with running(make_config(**SLOW_QUIET)) as h:
        await _closes_on(h)
        # Created while running: the close watch adds the new directory.
        dst.parent.mkdir()
        await asyncio.sleep(0.2)  # the directory's IN_CREATE is read before files appear in it
        await mp4gen.record_then_rename(sources.regular, dst, chunk=64 * 1024, delay=0.01)
        state = await _finished_by_close(h, dst, "complete")
    assert_stored(s3_client, bucket, state, sources.regular.read_bytes())
    assert_clean(s3_client, bucket, 1)


def _piece(size: int) -> bytes:
    """A ``free`` box: appended to a complete MP4 it stays complete, so every
    close of the append-per-chunk writer below could be the last."""
    return (size).to_bytes(4, "big") + b"free" + bytes(size - 8)


async def test_reopen_and_append_is_one_object(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    """Close, reopen, append, close: each close leaves a complete MP4, so only
    the guard (CLOSE_GUARD_SECONDS, raised here so that a loaded machine
    cannot stretch the writer's reopen past it) keeps the first close from
    finishing a file that is about to grow."""
    pieces = [sources.regular.read_bytes(), _piece(4096), _piece(64 * 1024)]
    dst = watch / "chunks.mp4"
    async with running(make_config(close_guard_seconds=2.0, **SLOW_QUIET)) as h:
        await _closes_on(h)
        await mp4gen.record_reopen_append(pieces, dst)
        state = await _finished_by_close(h, dst, "complete")
        idles = await _idles(h, state)
    assert [i.size for i in idles] == [sum(map(len, pieces))]
    assert_stored(s3_client, bucket, state, b"".join(pieces))
    assert_clean(s3_client, bucket, 1)


async def test_append_after_the_close_decision(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    """The writer reopens after the guard, once the close already made the
    stream idle. Either the finalizer sees the change (FileMoved: it stands
    down, the next close finishes the whole file, one object) or it completed
    first (the grown file is a continuation: a second object holds the whole
    file, the first stays the file as it was at the first close). Both end
    with the newest object byte-exact and nothing left open."""
    first = sources.regular.read_bytes()
    extra = _piece(8192)
    dst = watch / "late.mp4"
    async with running(make_config(**SLOW_QUIET)) as h:
        await _closes_on(h)
        await mp4gen.record_reopen_append([first], dst)

        def idle_by_close(p: History) -> bool:
            s = p.for_path(str(dst))
            return s is not None and s.idle is not None

        await h.until(idle_by_close, timeout=DEADLINE, what="the close made it idle")
        with dst.open("ab") as writer:  # reopen and append
            writer.write(extra)
        whole = first + extra

        def whole_done(p: History) -> bool:
            s = p.for_path(str(dst))
            return s is not None and s.metadata_key is not None and s.size == len(whole)

        history = await h.until(whole_done, timeout=DEADLINE, what="the whole file finished")
        state = history.for_path(str(dst))
        assert state is not None
        idles = await _idles(h, state)
    assert idles[-1].cause == "closed"
    assert_stored(s3_client, bucket, state, whole)
    stored = {k: v for k, v in objects(s3_client, bucket).items()
              if not k.endswith(".metadata.json")}  # fmt: skip
    assert set(stored.values()) <= {first, whole}, "an object is neither close's file"
    assert open_uploads(s3_client, bucket) == []


async def test_append_while_the_finalizer_works_is_one_object(
    make_config: Any,
    watch: Path,
    sources: mp4gen.Mp4Sources,
    s3_endpoint: Any,
    s3_client: Any,
    bucket: str,
) -> None:
    """The writer reopens and appends after the close made the stream idle,
    while the finalizer is sending the tail (held at a gate): the finalizer
    sees the file changed before it completes and stands down, the next
    close finishes the whole file. One object, byte-exact."""
    first = sources.large.read_bytes()  # 12 MiB: parts 1-2 while written, the tail at the end
    extra = _piece(8192)
    dst = watch / "held.mp4"
    async with GateProxy(s3_endpoint.url) as gate:
        config = make_config(s3_endpoint_url=gate.url, s3_timeout_seconds=120.0, **SLOW_QUIET)
        async with running(config) as h:
            await _closes_on(h)
            gate.close("partNumber=3")  # only the finalizer sends part 3, the tail
            await mp4gen.record_reopen_append([first], dst)
            for _ in range(int(DEADLINE / 0.02)):
                if gate.held:
                    break
                await asyncio.sleep(0.02)
            assert gate.held, "the finalizer never sent the tail"
            with dst.open("ab") as writer:  # reopen and append, mid-finalization
                writer.write(extra)
            gate.open()
            state = await _finished_by_close(h, dst, "complete")
            idles = await _idles(h, state)
    whole = first + extra
    assert [i.size for i in idles] == [len(first), len(whole)]
    assert_stored(s3_client, bucket, state, whole)
    assert_clean(s3_client, bucket, 1)


async def test_without_close_notifications_files_finish_by_quiet_time(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    """WATCH_POLL: the fast path is off (gauge 0), the settle rule finishes."""
    dst = watch / "polled.mp4"
    config = make_config(watch_poll=True, settle_seconds=0.5, stream_timeout_seconds=3.0)
    async with running(config) as h:
        await mp4gen.record_append(sources.regular, dst, chunk=64 * 1024, delay=0.01)
        state = await h.terminal(dst)
        idles = await _idles(h, state)
        assert h.registry.get_sample_value("cefmp4_close_notifications") == 0
    assert [(i.cause, i.reason) for i in idles] == [("quiet", "settled")]
    assert_stored(s3_client, bucket, state, sources.regular.read_bytes())


async def test_inotify_limit_turns_the_fast_path_off(
    make_config: Any,
    watch: Path,
    sources: mp4gen.Mp4Sources,
    s3_client: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def exhausted(root: bytes, skip: Callable[[bytes], bool]) -> closes.CloseWatch:
        raise closes.Unavailable("limit", "inotify watch limit reached")

    monkeypatch.setattr(closes, "watch", exhausted)
    dst = watch / "limited.mp4"
    async with running(make_config(settle_seconds=0.5, stream_timeout_seconds=3.0)) as h:
        await mp4gen.record_append(sources.regular, dst, chunk=64 * 1024, delay=0.01)
        state = await h.terminal(dst)
        idles = await _idles(h, state)
        assert h.registry.get_sample_value("cefmp4_close_notifications") == 0
    assert [(i.cause, i.reason) for i in idles] == [("quiet", "settled")]
    assert_stored(s3_client, bucket, state, sources.regular.read_bytes())


# -- the adapter on its own -----------------------------------------------


def _hidden(name: bytes) -> bool:
    return name.startswith(b".")


async def _collect(watch: closes.CloseWatch, want: int) -> list[closes.CloseFact]:
    got: list[closes.CloseFact] = []
    async with asyncio.timeout(10):
        async for batch in watch.facts():
            got.extend(batch)
            if len(got) >= want:
                return got
    return got


async def test_adapter_reports_closes_renames_and_new_directories(tmp_path: Path) -> None:
    root = tmp_path / "w"
    (root / "old" / ".hidden").mkdir(parents=True)
    watch = closes.watch(os.fsencode(root), _hidden)
    try:
        assert watch.watched == 2  # root and old; the hidden one is skipped
        (root / "old" / ".hidden" / "x.mp4").write_bytes(b"skipped")
        (root / "old" / "a.mp4").write_bytes(b"a")
        (root / "new").mkdir()
        await _collect(watch, 1)  # a.mp4; the directory was added on the way
        assert watch.watched == 3
        (root / "new" / "b.mp4").write_bytes(b"b")
        (root / "new" / ".b.tmp").write_bytes(b"c")
        (root / "new" / ".b.tmp").rename(root / "new" / "c.mp4")
        facts = await _collect(watch, 3)
    finally:
        watch.close()
    paths = {(os.fsdecode(f.path), f.how) for f in facts}
    assert (str(root / "new" / "b.mp4"), "closed") in paths
    assert (str(root / "new" / ".b.tmp"), "closed") in paths  # the watcher filters names
    assert (str(root / "new" / "c.mp4"), "moved_in") in paths


async def test_adapter_ends_cleanly_on_close(tmp_path: Path) -> None:
    watch = closes.watch(os.fsencode(tmp_path), _hidden)
    task = asyncio.create_task(_collect(watch, 1))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    watch.close()
    watch.close()  # idempotent


class _Exhausted:
    """An inotify instance whose kernel has no watches left."""

    def fileno(self) -> int:
        return -1

    def add_watch(self, path: bytes, mask: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def read(self, timeout: int | None = None) -> list[Any]:
        return []

    def close(self) -> None:
        pass


def test_adapter_watch_limit_is_unavailable(tmp_path: Path) -> None:
    watch = closes.CloseWatch(_Exhausted(), os.fsencode(tmp_path), _hidden)
    with pytest.raises(closes.Unavailable) as caught:
        watch.add_tree(os.fsencode(tmp_path))
    assert caught.value.reason == "limit"
