"""Part plans recorded per recording, end to end (real Redis, real SeaweedFS).

The plan (``cefmp4.domain.partplan``) is chosen when the watcher first sees a
file and recorded in its ``FileSeen``; from then on it is the stream's, not
the settings'. These tests change the settings under a live stream and a
continued one, and let a file appear large, and check that the objects are
the files, no part is sent twice, and ``cefmp4 verify`` cuts them the same way.
The pure rules are in ``test_partplan.py``; the compatibility with streams
seen before plans were recorded in ``test_versions.py`` and
``test_projection.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cefmp4 import cli
from cefmp4.domain.events import FileSeen, PartUploaded
from cefmp4.domain.partplan import PartPlan
from cefmp4.ops.verifycli import verify
from tests.harness import Harness, History, MiB, objects, open_uploads, running, subprocess_env
from tests.test_gc import use_config_env

FIRST, REST = 5 * MiB, 6 * MiB  # part 1 smaller than the rest, as by default


async def _parts(h: Harness, stream_id: str) -> list[PartUploaded]:
    return [
        e for _, e in await h.events() if isinstance(e, PartUploaded) and e.stream_id == stream_id
    ]


async def _seen(h: Harness, stream_id: str) -> FileSeen:
    [seen] = [
        e for _, e in await h.events() if isinstance(e, FileSeen) and e.stream_id == stream_id
    ]
    return seen


async def test_a_live_stream_keeps_its_plan_when_the_settings_change(
    make_config: Any,
    watch: Path,
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Three parts go up under (5, 6 MiB); the service restarts with other
    part sizes; the recording goes on and ends. Parts 1-3 stand, the tail is
    part 4, and verify - with the new settings - cuts the file as recorded."""
    dst = watch / "cam.mp4"
    data = os.urandom(FIRST + 2 * REST)
    before = make_config(first_part_bytes=FIRST, chunk_size_bytes=REST, stream_timeout_seconds=60)
    async with running(before) as h:
        dst.write_bytes(data)

        def three_parts(p: History) -> bool:
            s = p.for_path(str(dst))
            return s is not None and sorted(s.parts) == [1, 2, 3]

        state = (await h.until(three_parts, what="parts 1-3")).for_path(str(dst))
        assert state is not None and state.plan == PartPlan(FIRST, REST)
    after = make_config(first_part_bytes=8 * MiB, chunk_size_bytes=7 * MiB)
    tail = os.urandom(3 * MiB)
    with dst.open("ab") as recorder:
        recorder.write(tail)
    restarted_at = datetime.now(UTC)  # after the FileSeen: `since` below starts here
    async with running(after) as h:
        done = await h.terminal(dst)
        parts = await _parts(h, done.stream_id)
    assert done.status == "completed", (done.failure_reason, done.failure_detail)
    assert done.completion is not None and done.completion.parts == 4
    sent = Counter(p.part_number for p in parts)
    assert sent == {1: 1, 2: 1, 3: 1, 4: 1}, "a part was sent twice"
    spans = sorted((p.part_number, p.offset, p.size) for p in parts)
    assert spans == [(1, 0, FIRST), (2, FIRST, REST), (3, FIRST + REST, REST),
                     (4, FIRST + 2 * REST, 3 * MiB)]  # fmt: skip
    assert objects(s3_client, bucket)[done.key] == data + tail
    assert open_uploads(s3_client, bucket) == []

    use_config_env(monkeypatch, subprocess_env(after), tmp_path)
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, ["verify", str(dst)]) == 0
    assert f"OK        {dst}" in capsys.readouterr().out
    # A window (`verify --since`) that holds the completion but not the
    # FileSeen: still cut by its plan.
    now = datetime.now(UTC)
    verdicts = await verify(after, paths=[], streams=[], since=now - restarted_at, sha256=False,
                            now=now)  # fmt: skip
    assert [(v.path, v.outcome) for v in verdicts] == [(str(dst), "ok")]


async def test_a_continuation_is_cut_like_the_object_it_continues(
    make_config: Any, watch: Path, s3_client: Any, bucket: str
) -> None:
    """The first object was cut (5, 6 MiB); the settings change before the
    recorder appends. The continuation keeps that plan, so all three of the
    first object's parts are copied and only the appended bytes are sent."""
    dst = watch / "long.mp4"
    old = os.urandom(FIRST + 2 * REST)
    new = old + os.urandom(4 * MiB)
    async with running(make_config(first_part_bytes=FIRST, chunk_size_bytes=REST)) as h:
        dst.write_bytes(old)
        first = await h.terminal(dst)
    assert first.status == "completed" and first.plan == PartPlan(FIRST, REST)
    async with running(make_config(first_part_bytes=8 * MiB, chunk_size_bytes=7 * MiB)) as h:
        with dst.open("ab") as recorder:
            recorder.write(new[len(old) :])

        def continued(p: History) -> bool:
            s = p.for_path(str(dst))
            return s is not None and s.stream_id != first.stream_id and s.metadata_key is not None

        second = (await h.until(continued, what="the continuation")).for_path(str(dst))
        sent = h.registry.get_sample_value("cefmp4_bytes_uploaded_total") or 0.0
    assert second is not None and second.status == "completed"
    assert second.plan == PartPlan(FIRST, REST)
    assert [second.parts[n].copied for n in (1, 2, 3, 4)] == [True, True, True, False]
    assert sent == 4 * MiB
    stored = objects(s3_client, bucket)
    assert stored[first.key] == old and stored[second.key] == new


async def test_a_file_that_appears_large_goes_up_in_larger_parts(
    make_config: Any, watch: Path, tmp_path: Path, s3_client: Any, bucket: str
) -> None:
    """Moved into place at 48 MiB: parts 2.. are 48 / 8 = 6 MiB (between
    CHUNK_SIZE_BYTES 5 MiB and LARGE_PART_BYTES 8 MiB)."""
    staged = tmp_path / "staged.mp4"
    data = os.urandom(48 * MiB)
    staged.write_bytes(data)
    config = make_config(first_part_bytes=FIRST, chunk_size_bytes=5 * MiB, large_part_bytes=8 * MiB)
    async with running(config) as h:
        staged.rename(watch / "import.mp4")
        done = await h.terminal(watch / "import.mp4")
        seen = await _seen(h, done.stream_id)
    assert done.status == "completed", (done.failure_reason, done.failure_detail)
    assert seen.size == len(data) and seen.plan == PartPlan(FIRST, 6 * MiB)
    assert done.completion is not None and done.completion.parts == 1 + 7 + 1  # 43 MiB / 6
    sizes = [done.parts[n].size for n in sorted(done.parts)]
    assert sizes == [FIRST] + [6 * MiB] * 7 + [1 * MiB]
    body = s3_client.get_object(Bucket=bucket, Key=done.key)["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
