"""Every failure reason that is cheap to produce, end to end, in one service.

Each one is raised by a handler and recorded by the supervisor's one failure
path: a ``StreamFailed`` event with the reason, ``cefmp4_streams_failed{reason}``
and one "stream failed" log line (INFO for the recorder's own doing, deleted
and truncated; ERROR for the rest). None stops the service, and nothing of a
too-large file is uploaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import pytest
from botocore.exceptions import ClientError
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from cefmp4.adapters.s3store import translate
from cefmp4.adapters.storage import ObjectStore
from cefmp4.domain.events import StreamFailed
from cefmp4.domain.partplan import MAX_OBJECT_SIZE
from projections.streams import Projection
from tests.harness import MiB, log_only, objects, open_uploads, running
from tests.test_pipeline import finalize_now, two_parts_sent


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return sum(
        s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def sparse(path: Path, size: int) -> None:
    """A file of ``size`` bytes that takes no disk space (a failure where the
    file system cannot hold one: then too_large is not being checked)."""
    try:
        with path.open("wb") as f:
            f.truncate(size)
    except OSError as exc:  # EFBIG: the file system's limit is below the size
        pytest.fail(f"no sparse file of {size} bytes on this file system: {exc}")


def has_part(path: Path) -> Any:
    def condition(p: Projection) -> bool:
        s = p.for_path(str(path))
        return s is not None and 1 in s.parts

    return condition


async def test_each_failure_reason_has_event_metric_and_log_line(
    make_config: Any, watch: Path, tmp_path: Path, s3_client: Any, bucket: str
) -> None:
    names = ("empty", "deleted", "truncated", "huge")
    empty, deleted, truncated, huge = (watch / f"{name}.mp4" for name in names)
    # Made outside WATCH_DIR and moved in, so the watcher first sees it whole.
    outside = tmp_path / "huge.mp4"
    sparse(outside, MAX_OBJECT_SIZE + 1)
    with capture_logs() as logs:
        async with running(make_config(stream_timeout_seconds=1.5)) as h:
            empty.touch()
            for path in (deleted, truncated):
                path.write_bytes(os.urandom(6 * MiB))
            await h.until(has_part(deleted), what="a part of deleted.mp4")
            await h.until(has_part(truncated), what="a part of truncated.mp4")
            first_truncated = (await h.projection()).by_path[str(truncated)]
            deleted.unlink()
            with truncated.open("r+b") as f:
                f.truncate(MiB)  # shrinks: the stream is abandoned, the rest is new
            outside.rename(huge)
            for path in (empty, deleted, huge):
                await h.terminal(path)
            await h.until(
                lambda p: p.streams[first_truncated].terminal, what="the truncated stream ends"
            )
            p = await h.projection()
            events = [e for _, e in await h.events() if isinstance(e, StreamFailed)]
            registry = h.registry
    want = {
        p.by_path[str(empty)]: "empty",
        p.by_path[str(deleted)]: "deleted",
        first_truncated: "truncated",
        p.by_path[str(huge)]: "too_large",
    }
    got = {e.stream_id: e.reason for e in events if e.stream_id in want}
    assert got == want, events
    assert sorted(e.stream_id for e in events if e.stream_id in want) == sorted(want)
    lines = {
        (e["stream_id"], e["reason"]): e["log_level"] for e in logs if e["event"] == "stream failed"
    }
    for stream_id, reason in want.items():
        assert metric(registry, "cefmp4_streams_failed_total", reason=reason) == 1
        expected = "info" if reason in ("deleted", "truncated") else "error"
        assert lines[(stream_id, reason)] == expected
    # Nothing of the 5 TiB file was read into a part or sent.
    huge_state = p.streams[p.by_path[str(huge)]]
    assert huge_state.parts == {} and huge_state.upload_id is None
    assert "exceed" in (huge_state.failure_detail or "")
    assert not [k for k in objects(s3_client, bucket) if k.startswith(huge_state.key)]
    # Every failed stream's upload was aborted (the new, 1 MiB stream is one PUT).
    assert open_uploads(s3_client, bucket) == []


class RejectingParts:
    """The real store, except that S3 refuses every UploadPart with a 400
    (as it would an oversized or malformed request): the error goes through
    the adapter's own translation, so the handler sees what it would see."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self.rejected = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def upload_part(self, *args: Any, **kwargs: Any) -> str:
        self.rejected += 1
        error = {"Code": "InvalidArgument", "Message": "Part number must be an integer"}
        reply = {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 400}}
        raise translate(ClientError(reply, "UploadPart"))


async def test_a_permanent_s3_error_fails_the_stream_once_and_aborts_its_upload(
    make_config: Any, watch: Path, s3_client: Any, bucket: str
) -> None:
    dst = watch / "rejected.mp4"
    dst.write_bytes(os.urandom(12 * MiB))
    with capture_logs() as logs:
        async with log_only(make_config()) as (h, service):
            state = await two_parts_sent(h, service, dst)
            store = RejectingParts(service.deps.store)
            object.__setattr__(service.deps, "store", cast(ObjectStore, store))
            after = await finalize_now(h, service, state, dst)  # the tail part is refused
            events = [e for _, e in await h.events() if isinstance(e, StreamFailed)]
            registry = service.metrics.registry
    assert store.rejected == 1, "the tail part was sent once: a permanent error is not retried"
    assert after.status == "failed" and after.failure_reason == "s3_rejected"
    [failed] = events
    assert failed.reason == "s3_rejected" and "InvalidArgument" in failed.detail
    assert metric(registry, "cefmp4_streams_failed_total", reason="s3_rejected") == 1
    [line] = [e for e in logs if e["event"] == "stream failed"]
    assert line["log_level"] == "error" and line["reason"] == "s3_rejected"
    assert open_uploads(s3_client, bucket) == []  # the stream's upload was aborted
    assert [k for k in objects(s3_client, bucket) if k.startswith(state.key)] == []
