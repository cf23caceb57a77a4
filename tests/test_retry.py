"""``cefmp4 retry``: a failed recording whose file is still there goes up once asked.

The watcher is the only writer of new streams; ``retry`` appends a
``RetryRequested`` and the watcher, seeing it in the file's record, starts a
new stream. Tested end to end: a failure recorded by an earlier run, the
service running, the CLI asking, the object arriving byte-exact.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from cefmp4 import cli
from cefmp4.adapters.eventlog import EventLog
from cefmp4.domain.events import FileSeen, RetryRequested, StreamFailed
from cefmp4.ops.retrycli import run_retry, select
from projections.streams import FileRecord
from tests import mp4gen
from tests.harness import History, objects, running, subprocess_env
from tests.test_gc import use_config_env

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def test_select_names_failed_records_by_stream_or_path() -> None:
    files = {
        "/w/a.mp4": FileRecord("s1", "k1", "failed", 1, 1, 1, "unreadable"),
        "/w/b.mp4": FileRecord("s2", "k2", "completed", 1, 1, 1),
        "/w/c.mp4": FileRecord("s3", "k3", "failed", 1, 1, 1, "empty"),
    }
    assert [p for p, _ in select(files, "s1", all_failed=False)] == ["/w/a.mp4"]
    assert [p for p, _ in select(files, "/w/c.mp4", all_failed=False)] == ["/w/c.mp4"]
    assert select(files, "s2", all_failed=False) == []  # completed: nothing to retry
    assert select(files, "/w/b.mp4", all_failed=False) == []
    assert [p for p, _ in select(files, None, all_failed=True)] == ["/w/a.mp4", "/w/c.mp4"]


async def test_retry_uploads_a_failed_recording_whose_file_is_still_there(
    make_config: Any,
    watch: Path,
    tmp_path: Path,
    sources: mp4gen.Mp4Sources,
    s3_client: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = make_config()
    failed_path, other = watch / "failed.mp4", watch / "other.mp4"
    shutil.copyfile(sources.regular, failed_path)
    st = os.stat(failed_path)
    # An earlier run failed this recording (say its permissions were wrong then).
    redis = aioredis.from_url(config.redis_url)
    try:
        log = EventLog(redis, config.events_key, "earlier-run")
        await log.append(
            FileSeen(
                stream_id="old",
                at=T0,
                path=str(failed_path),
                rel_path="failed.mp4",
                bucket=bucket,
                key="streams/old/failed.mp4",
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                inode=st.st_ino,
            )
        )
        await log.append(StreamFailed(stream_id="old", at=T0, reason="unreadable", detail="x"))
    finally:
        await redis.aclose()

    async with running(config) as h:
        # The watcher has scanned once another file went up: the failed one,
        # unchanged, was left alone (one stream for it, still the failed one).
        shutil.copyfile(sources.regular, other)
        await h.terminal(other)
        assert [s.stream_id for s in (await h.projection()).streams.values()
                if s.path == str(failed_path)] == ["old"]  # fmt: skip

        use_config_env(monkeypatch, subprocess_env(config), tmp_path)
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, ["retry", str(failed_path)]) == 0
        assert "retry requested    old" in capsys.readouterr().out

        def retried(p: History) -> bool:
            s = p.for_path(str(failed_path))
            return s is not None and s.stream_id != "old" and s.metadata_key is not None

        done = await h.until(retried, what="the retried recording uploaded")
        state = done.for_path(str(failed_path))
        assert state is not None and state.status == "completed"
        assert objects(s3_client, bucket)[state.key] == sources.regular.read_bytes()
        requests = [e for _, e in await h.events() if isinstance(e, RetryRequested)]
        assert [(e.stream_id, e.path) for e in requests] == [("old", str(failed_path))]

        # A second ask finds nothing failed at that path any more.
        assert await asyncio.to_thread(cli.main, ["retry", str(failed_path)]) == 1
        assert "no failed recording" in capsys.readouterr().out


async def test_retry_of_nothing_says_so(
    make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_config_env(monkeypatch, subprocess_env(make_config()), tmp_path)
    out = io.StringIO()
    args = argparse.Namespace(target=None, all_failed=True)
    assert await run_retry(make_config(), args, out) == 1
    assert "no failed recordings" in out.getvalue()
