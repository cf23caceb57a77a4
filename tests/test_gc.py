"""``cefmp4 gc``: the pure plan, then the command against the real service.

``plan_gc`` is tested rule by rule, at the age guard's boundary, and on
arbitrary logs (hypothesis) for the properties that make it safe to run next
to the service: the current upload of a live stream is never aborted, nothing
younger than the cutoff is aborted, and a longer ``older_than`` never aborts
more. The end-to-end test runs the service on real Redis and S3 so that one
stream is completed and one is live with an open upload, adds an orphan and a
leftover upload by hand, and checks that only those two go - through
``run_gc`` and through ``cefmp4.cli.main``.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cefmp4 import cli
from cefmp4.adapters.memorystore import MemoryStore
from cefmp4.adapters.storage import RemoteUpload
from cefmp4.dev.localservers import S3Endpoint
from cefmp4.domain.durations import duration
from cefmp4.domain.errors import NoSuchUpload
from cefmp4.domain.events import (
    BytesAvailable,
    Event,
    FileSeen,
    StreamCompleted,
    StreamFailed,
    UploadStarted,
)
from cefmp4.ops.gc import (
    ABORTABLE,
    DEFAULT_OLDER_THAN,
    GcDecision,
    apply_plan,
    plan_gc,
    run_gc,
)
from cefmp4.runtime.service import connect
from projections.streams import Projection, replay
from tests import mp4gen
from tests.harness import MiB, open_uploads, running, service_config, subprocess_env
from tests.properties import examples

PROPERTY = settings(max_examples=examples(200), deadline=None)
NOW = datetime(2024, 6, 1, 12, tzinfo=UTC)
HOUR = timedelta(hours=1)
OLD = NOW - 2 * HOUR


# --- plan_gc, rule by rule ------------------------------------------------------------


def log(*events: Event) -> Projection:
    return replay([(f"{i}-0", e) for i, e in enumerate(events, start=1)])


def seen(stream_id: str, key: str) -> FileSeen:
    return FileSeen(stream_id=stream_id, at=OLD, path=f"/w/{stream_id}.mp4",
                    rel_path=f"{stream_id}.mp4", bucket="b", key=key, size=0, mtime_ns=0,
                    inode=1)  # fmt: skip


def started(stream_id: str, upload_id: str) -> UploadStarted:
    return UploadStarted(stream_id=stream_id, at=OLD, upload_id=upload_id)


def completed(stream_id: str, key: str) -> StreamCompleted:
    return StreamCompleted(stream_id=stream_id, at=OLD, bucket="b", key=key, size=1, etag="e",
                           sha256="h", mtime_ns=0, parts=1, mp4="complete")  # fmt: skip


def failed(stream_id: str) -> StreamFailed:
    return StreamFailed(stream_id=stream_id, at=OLD, reason="deleted")


def upload(key: str, upload_id: str, initiated: datetime = OLD) -> RemoteUpload:
    return RemoteUpload(key, upload_id, initiated)


def one(u: RemoteUpload, projection: Projection, older_than: timedelta = HOUR) -> GcDecision:
    [decision] = plan_gc([u], projection, NOW, older_than)
    assert decision.upload == u
    return decision


S1_SEEN = seen("s1", "k")
# id: (log, what the log says about upload u1 of key k, verdict when old, stream)
RULES: dict[str, tuple[list[Event], str, str, str | None]] = {
    "empty-log": ([], "unknown_key", "abort", None),
    "other-key": ([seen("s1", "k/other")], "unknown_key", "abort", None),
    "completed": ([S1_SEEN, started("s1", "u1"), completed("s1", "k")], "stream_completed",
                  "abort", "s1"),
    "completed-single-put": ([S1_SEEN, completed("s1", "k")], "stream_completed", "abort", "s1"),
    "failed": ([S1_SEEN, started("s1", "u1"), failed("s1")], "stream_failed", "abort", "s1"),
    "replaced": ([S1_SEEN, started("s1", "u1"), started("s1", "u2")], "replaced_upload",
                 "abort", "s1"),
    "other-upload-recorded": ([S1_SEEN, started("s1", "u2")], "replaced_upload", "abort", "s1"),
    "current": ([S1_SEEN, started("s1", "u1")], "current_upload", "keep", "s1"),
    "current-after-replacing": ([S1_SEEN, started("s1", "u2"), started("s1", "u1")],
                                "current_upload", "keep", "s1"),
    "live-no-upload-yet": ([S1_SEEN, BytesAvailable(stream_id="s1", at=OLD, size=9, mtime_ns=1)],
                           "not_recorded", "keep", "s1"),
    "live-beats-terminal": ([seen("s0", "k"), started("s0", "u1"), failed("s0"), S1_SEEN,
                             started("s1", "u1")], "current_upload", "keep", "s1"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("events", "reason", "action", "stream_id"), list(RULES.values()), ids=list(RULES)
)
def test_each_rule(events: list[Event], reason: str, action: str, stream_id: str | None) -> None:
    decision = one(upload("k", "u1"), log(*events))
    assert (decision.reason, decision.action, decision.stream_id) == (reason, action, stream_id)


@pytest.mark.parametrize(
    "events",
    [
        [],
        [seen("s1", "k"), completed("s1", "k")],
        [seen("s1", "k"), started("s1", "u1"), failed("s1")],
        [seen("s1", "k"), started("s1", "u2")],
    ],
    ids=["unknown", "completed", "failed", "replaced"],
)
def test_age_guard_keeps_young_uploads_whatever_the_log_says(events: list[Event]) -> None:
    projection = log(*events)
    young = one(upload("k", "u1", NOW - HOUR + timedelta(microseconds=1)), projection)
    at_cutoff = one(upload("k", "u1", NOW - HOUR), projection)
    assert young.action == "keep" and young.reason in ABORTABLE
    assert at_cutoff.action == "abort" and at_cutoff.reason == young.reason
    # --older-than 0s: anything initiated up to now goes; the store's clock
    # running ahead of ours still keeps an upload.
    assert one(upload("k", "u1", NOW), projection, timedelta(0)).action == "abort"
    ahead = upload("k", "u1", NOW + timedelta(seconds=1))
    assert one(ahead, projection, timedelta(0)).action == "keep"


def test_live_uploads_are_kept_at_any_age() -> None:
    projection = log(seen("s1", "k1"), started("s1", "u1"), seen("s2", "k2"))
    ancient = NOW - timedelta(days=365)
    decisions = plan_gc(
        [upload("k1", "u1", ancient), upload("k2", "u9", ancient)], projection, NOW, timedelta(0)
    )
    assert [(d.action, d.reason) for d in decisions] == [
        ("keep", "current_upload"),
        ("keep", "not_recorded"),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0s", timedelta(0)),
        ("45s", timedelta(seconds=45)),
        ("30m", timedelta(minutes=30)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        (" 1h ", HOUR),
    ],
)
def test_duration(text: str, expected: timedelta) -> None:
    assert duration(text) == expected


@pytest.mark.parametrize("text", ["", "1", "h", "-1h", "1.5h", "1w", "1h 30m", "1 h", "2hours"])
def test_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        duration(text)


# --- plan_gc on arbitrary logs --------------------------------------------------------

# Few values on purpose: streams sharing keys and upload ids are the hard cases.
stream_ids = st.sampled_from(["s1", "s2", "s3"])
keys = st.sampled_from(["k1", "k2", "k3"])
upload_ids = st.sampled_from(["u1", "u2", "u3"])
log_events: st.SearchStrategy[Event] = st.one_of(
    st.builds(seen, stream_ids, keys),
    st.builds(started, stream_ids, upload_ids),
    st.builds(completed, stream_ids, keys),
    st.builds(failed, stream_ids),
)
ages = st.integers(min_value=-60, max_value=4 * 3600).map(lambda s: timedelta(seconds=s))
uploads = st.lists(
    st.builds(upload, st.sampled_from(["k1", "k2", "k3", "k4"]), upload_ids,
              ages.map(lambda age: NOW - age)),
    max_size=8,
)  # fmt: skip
# Announce a few streams first, so that every reason is reached often.
logs = st.tuples(st.lists(st.builds(seen, stream_ids, keys), min_size=1, max_size=4),
                 st.lists(log_events, max_size=12)).map(lambda t: [*t[0], *t[1]])  # fmt: skip
older_thans = st.integers(min_value=0, max_value=3 * 3600).map(lambda s: timedelta(seconds=s))


@PROPERTY
@given(logs, uploads, older_thans)
def test_plan_is_safe_on_any_log(
    events: list[Event], remote: list[RemoteUpload], older_than: timedelta
) -> None:
    projection = log(*events)
    decisions = plan_gc(remote, projection, NOW, older_than)
    assert [d.upload for d in decisions] == remote
    live = [s for s in projection.streams.values() if not s.terminal]
    known = {s.key for s in projection.streams.values()} | {
        r.key for r in projection.files.values()
    }
    for d in decisions:
        u = d.upload
        old_enough = u.initiated <= NOW - older_than
        # The verdict follows from the reason and the age, nothing else.
        assert (d.action == "abort") == (d.reason in ABORTABLE and old_enough)
        # Never abort what a live stream uses or is about to adopt.
        if any(s.key == u.key and s.upload_id in (None, u.upload_id) for s in live):
            assert d.action == "keep"
        # What no stream can use goes once it is old enough.
        elif old_enough:
            assert d.action == "abort"
            assert (d.reason == "unknown_key") == (u.key not in known)
        # Each upload is decided on its own: the list around it does not matter.
        assert plan_gc([u], projection, NOW, older_than) == [d]


@PROPERTY
@given(logs, uploads, older_thans, older_thans)
def test_longer_older_than_never_aborts_more(
    events: list[Event], remote: list[RemoteUpload], a: timedelta, b: timedelta
) -> None:
    projection = log(*events)
    shorter, longer = sorted((a, b))

    def aborted(older_than: timedelta) -> set[int]:
        plan = plan_gc(remote, projection, NOW, older_than)
        return {i for i, d in enumerate(plan) if d.action == "abort"}

    assert aborted(longer) <= aborted(shorter)


# --- end to end: the service, a leftover, an orphan -----------------------------------


def use_config_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], cwd: Path) -> None:
    """Make ``environment.load(os.environ)`` in this process return the test's Config."""
    for name in list(os.environ):
        if name not in env:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(cwd)  # no stray ./.env


def lines(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


async def test_gc_aborts_the_orphan_and_the_leftover_and_keeps_the_live_upload(
    tmp_path: Path,
    redis_url: str,
    key_prefix: str,
    bucket: str,
    s3_endpoint: S3Endpoint,
    s3_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    watch = tmp_path / "watch"
    watch.mkdir()
    # A long timeout: the live stream (not an MP4) must not finish on its own.
    config = service_config(
        watch, redis_url, key_prefix, bucket, s3_endpoint, stream_timeout_seconds=600.0
    )
    recording = mp4gen.make_mp4(tmp_path / "done.mp4", seconds=1)
    done_path, live_path = watch / "done.mp4", watch / "live.mp4"
    async with running(config) as h:
        await asyncio.to_thread(shutil.copyfile, recording, done_path)
        await asyncio.to_thread(live_path.write_bytes, os.urandom(6 * MiB))
        done = await h.terminal(done_path)
        projection = await h.until(
            lambda p: (s := p.for_path(str(live_path))) is not None and 1 in s.parts,
            what="a part of the live stream uploaded",
        )
        live = projection.for_path(str(live_path))
        assert done.status == "completed" and live is not None and live.upload_id is not None
        live_upload = live.upload_id

        orphan_key = f"{config.s3_key_prefix}nobody/orphan.mp4"
        orphan = s3_client.create_multipart_upload(Bucket=bucket, Key=orphan_key)["UploadId"]
        leftover = s3_client.create_multipart_upload(Bucket=bucket, Key=done.key)["UploadId"]
        outside = s3_client.create_multipart_upload(Bucket=bucket, Key="elsewhere/x.mp4")
        before = {u["UploadId"] for u in open_uploads(s3_client, bucket)}
        assert before == {live_upload, orphan, leftover, outside["UploadId"]}

        # Dry run with the default age guard: everything is younger than 1h.
        out = io.StringIO()
        plan = await run_gc(config, apply=False, older_than=DEFAULT_OLDER_THAN, out=out)
        assert len(plan) == 3 and all(d.action == "keep" for d in plan), out.getvalue()
        assert lines(out.getvalue(), "would abort") == []

        # Dry run with no age guard: both reported, nothing aborted.
        out = io.StringIO()
        plan = await run_gc(config, apply=False, older_than=timedelta(0), out=out)
        verdicts = {d.upload.upload_id: (d.action, d.reason) for d in plan}
        assert verdicts == {
            orphan: ("abort", "unknown_key"),
            leftover: ("abort", "stream_completed"),
            live_upload: ("keep", "current_upload"),
        }
        reported = lines(out.getvalue(), "would abort")
        assert len(reported) == 2, out.getvalue()
        assert any(orphan in r and orphan_key in r for r in reported)
        assert any(leftover in r and done.stream_id in r for r in reported)
        assert "2 to abort (dry run" in out.getvalue()
        assert {u["UploadId"] for u in open_uploads(s3_client, bucket)} == before

        # The same through the CLI, configured from the environment.
        use_config_env(monkeypatch, subprocess_env(config), tmp_path)
        capsys.readouterr()
        argv = ["gc", "--older-than", "0s"]
        assert await asyncio.to_thread(cli.main, argv) == 0
        cli_out = capsys.readouterr().out
        assert len(lines(cli_out, "would abort")) == 2, cli_out
        assert {u["UploadId"] for u in open_uploads(s3_client, bucket)} == before

        # Apply: exactly those two go; the live stream keeps its upload.
        out = io.StringIO()
        plan = await run_gc(config, apply=True, older_than=timedelta(0), out=out)
        assert {d.upload.upload_id for d in plan if d.action == "abort"} == {orphan, leftover}
        assert len(lines(out.getvalue(), "aborted ")) == 2, out.getvalue()
        assert "2 aborted (0 of them already gone)" in out.getvalue()
        after = {u["UploadId"] for u in open_uploads(s3_client, bucket)}
        assert after == {live_upload, outside["UploadId"]}

        # Again through the CLI with --apply: nothing left to do, exit 0.
        assert await asyncio.to_thread(cli.main, ["gc", "--apply", "--older-than", "0s"]) == 0
        cli_out = capsys.readouterr().out
        assert "1 multipart upload: 0 aborted" in cli_out, cli_out
        state = (await h.projection()).for_path(str(live_path))
    assert state is not None and not state.terminal and state.upload_id == live_upload
    assert {u["UploadId"] for u in open_uploads(s3_client, bucket)} == after


async def test_list_uploads_says_when_each_was_initiated(
    tmp_path: Path, redis_url: str, key_prefix: str, bucket: str, s3_endpoint: S3Endpoint,
    s3_client: Any,
) -> None:  # fmt: skip
    config = service_config(tmp_path, redis_url, key_prefix, bucket, s3_endpoint)
    before = datetime.now(UTC)
    s3_client.create_multipart_upload(Bucket=bucket, Key=f"{config.s3_key_prefix}a.mp4")
    after = datetime.now(UTC)
    async with connect(config) as (_redis, store):
        [remote] = await store.list_uploads(config.s3_key_prefix)
    assert remote.initiated.utcoffset() == timedelta(0)
    # Stores report whole seconds (or ms); allow that and a little clock skew.
    slack = timedelta(seconds=2)
    assert before - slack <= remote.initiated <= after + slack


class AlreadyAborted(MemoryStore):
    """A store on which someone else was first: AWS answers NoSuchUpload (SeaweedFS
    answers 204 for an aborted upload, so the real one cannot show this case)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        self.calls.append(upload_id)
        raise NoSuchUpload("s3 NoSuchUpload: The specified upload does not exist.")


async def test_an_upload_already_gone_is_fine() -> None:
    plan = plan_gc([upload("k", "u1"), upload("k", "u2", NOW)], Projection(), NOW, HOUR)
    assert [d.action for d in plan] == ["abort", "keep"]
    store, out = AlreadyAborted(), io.StringIO()
    assert await apply_plan(store, plan, out) == 1
    assert store.calls == ["u1"]
    assert len(lines(out.getvalue(), "already gone")) == 1
