"""Properties of the stream projection (``projections.streams``).

The log is delivered at least once, by several writers, in an order no single
writer controls, and a process may start from a snapshot instead of from the
first entry. So the projection is tested on arbitrary event sequences over a
handful of stream ids, paths and upload ids: duplicates, events out of order,
late events after a stream ended, and events for streams nobody announced are
all generated on purpose.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import get_args, get_type_hints

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from cefmp4.domain.events import (
    EVENT_TYPES,
    BytesAvailable,
    Continues,
    Event,
    FailReason,
    FileDeleted,
    FileSeen,
    FileTruncated,
    MetadataWritten,
    PartUploaded,
    RetryRequested,
    StreamCompleted,
    StreamFailed,
    StreamIdle,
    UploadStarted,
)
from cefmp4.domain.partplan import PartPlan, final_parts
from projections.streams import (
    STEPS,
    Completion,
    FileRecord,
    Part,
    Projection,
    StreamState,
    fold,
    record_of,
    replay,
)
from tests.properties import examples

PROPERTY = settings(max_examples=examples(150), deadline=None)

T0 = datetime(2024, 1, 1, tzinfo=UTC)

# Few values on purpose: collisions (same stream, same path, same upload id)
# are where the interesting interleavings are.
stream_ids = st.sampled_from(["s1", "s2", "s3"])
paths = st.sampled_from(["/w/a.mp4", "/w/b.mp4"])
upload_ids = st.sampled_from(["u1", "u2", "u3"])
small = st.integers(min_value=0, max_value=50)
times = st.integers(min_value=0, max_value=10_000).map(lambda s: T0 + timedelta(seconds=s))
short = st.sampled_from(["", "x", "y"])
mp4_states = st.sampled_from(["complete", "incomplete", "fragmented", "invalid"])

common = {"stream_id": stream_ids, "at": times}
file_seen = st.builds(
    FileSeen,
    **common,
    path=paths,
    rel_path=short,
    bucket=short,
    key=short,
    size=small,
    mtime_ns=small,
    inode=st.integers(1, 3),
    continues=st.none() | st.builds(Continues, stream_ids, short, small, small, st.just(("a",))),
)
events: st.SearchStrategy[Event] = st.one_of(
    file_seen,
    st.builds(BytesAvailable, **common, size=small, mtime_ns=small),
    st.builds(UploadStarted, **common, upload_id=upload_ids),
    st.builds(
        PartUploaded,
        **common,
        upload_id=upload_ids,
        part_number=st.integers(1, 4),
        offset=small,
        size=small,
        etag=short,
        md5=short,
        copied=st.booleans(),
    ),
    st.builds(
        StreamIdle,
        **common,
        size=small,
        mtime_ns=small,
        reason=st.sampled_from(["settled", "timeout"]),
        mp4=mp4_states,
        mp4_reason=short,
    ),
    st.builds(
        StreamCompleted,
        **common,
        bucket=short,
        key=short,
        size=small,
        etag=short,
        sha256=short,
        mtime_ns=small,
        parts=st.integers(0, 4),
        mp4=mp4_states,
        mp4_reason=short,
    ),
    st.builds(
        MetadataWritten,
        **common,
        key=short,
        duration_seconds=st.none() | st.floats(0, 100),
        error=st.none() | short,
    ),
    st.builds(StreamFailed, **common, reason=st.sampled_from(get_args(FailReason)), detail=short),
    st.builds(FileDeleted, **common, path=paths),
    st.builds(FileTruncated, **common, path=paths, size=small),
    st.builds(RetryRequested, **common, path=paths),
)
# FileSeen is over-represented so that most sequences have live streams for the
# other events to act on; without it most events would hit unknown streams.
# A list of batches, flattened: a plain st.lists averages a handful of events,
# too few for e.g. two terminal events of one stream to meet, while this still
# shrinks well (a fixed drawn length does not, and takes minutes to shrink).
logs = st.lists(st.lists(st.one_of(file_seen, events), min_size=1, max_size=12), max_size=8).map(
    lambda batches: [e for batch in batches for e in batch]
)


def entries(log: list[Event]) -> list[tuple[str, Event]]:
    return [(f"{i + 1}-0", e) for i, e in enumerate(log)]


def snapshot(projection: Projection) -> Projection:
    """What a process that persisted the projection and restarted would hold."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(projection), type=Projection)


def history(log: Iterable[Event], stream_id: str) -> list[tuple[Event, StreamState | None]]:
    """Each event of ``stream_id`` paired with the stream's state after it."""
    state: StreamState | None = None
    out: list[tuple[Event, StreamState | None]] = []
    for event in log:
        if event.stream_id == stream_id:
            state = fold(state, event)
            out.append((event, state))
    return out


# (a) snapshot + tail == full replay


@PROPERTY
@given(log=logs, cuts=st.sets(st.integers(0, 100)))
def test_snapshot_plus_tail_equals_full_replay(log: list[Event], cuts: set[int]) -> None:
    # A follower that snapshots its projection at arbitrary points and resumes
    # from the snapshot must end where a replay from the first entry ends;
    # otherwise a restart silently changes what the service believes.
    full = replay(entries(log))
    live = Projection()
    for i, (entry_id, event) in enumerate(entries(log)):
        if i in cuts:
            restored = snapshot(live)
            assert restored == live
            live = restored
        live.apply(entry_id, event)
    if len(log) in cuts:
        live = snapshot(live)
    assert live == full
    assert live.events == len(log)
    assert live.last_id == (f"{len(log)}-0" if log else "0-0")


@PROPERTY
@given(log=logs)
def test_snapshot_round_trip_keeps_types(log: list[Event]) -> None:
    # == on the Projection would accept a part table that came back keyed by
    # str, or naive datetimes equal by accident; check the shapes explicitly.
    restored = snapshot(replay(entries(log)))
    for state in restored.streams.values():
        assert all(type(n) is int and n == p.number for n, p in state.parts.items())
        assert state.started_at.tzinfo is not None
        assert all(p.uploaded_at.tzinfo is not None for p in state.parts.values())


# (b) fold is deterministic, total and pure


@PROPERTY
@given(log=logs, event=events)
def test_fold_is_deterministic_and_does_not_mutate(log: list[Event], event: Event) -> None:
    projection = replay(entries(log))
    states: list[StreamState | None] = [None, *projection.streams.values()]
    for state in states:
        before = snapshot(projection)
        first = fold(state, event)
        second = fold(state, event)
        assert first == second
        # States handed out earlier (snapshots, concurrent readers) stay valid:
        # fold never changes its input in place.
        assert snapshot(projection) == before
        if state is None:
            assert (first is None) != isinstance(event, FileSeen)
        else:
            assert first is not None  # a known stream never disappears


# (c) completion is final


@PROPERTY
@given(log=logs)
def test_completion_never_changes_once_completed(log: list[Event]) -> None:
    for stream_id in ("s1", "s2", "s3"):
        completion = None
        for event, state in history(log, stream_id):
            if completion is not None:
                # An object exists in S3 with this size/ETag/SHA-256; the
                # sidecar already describes it. No later fact (a failure from a
                # supervisor, a duplicate or racing completion, late bytes)
                # may change what the projection says about it.
                assert state is not None
                assert state.status == "completed", event
                assert state.completion == completion, event
            elif state is not None and state.status == "completed":
                completion = state.completion
                assert isinstance(event, StreamCompleted)
                assert completion is not None


def test_stream_failed_does_not_override_completed() -> None:
    # After a completion, a failure can only be about the sidecar: the
    # completion stands, the reason is kept, and the stream is settled.
    state = fold(None, seen("s1", "/w/a.mp4"))
    done = fold(state, completed("s1", etag="e1"))
    after = fold(done, StreamFailed(stream_id="s1", at=T0, reason="s3_rejected"))
    assert done is not None and not done.settled
    assert after is not None and after.completion == done.completion
    assert after.status == "completed" and after.failure_reason == "s3_rejected"
    assert after.settled


def test_second_completion_does_not_replace_the_first() -> None:
    # Two replicas may both finalize one stream (each watcher reports idle);
    # the first completion recorded is the one the sidecar was written for.
    state = fold(fold(None, seen("s1", "/w/a.mp4")), completed("s1", etag="e1"))
    again = fold(state, completed("s1", etag="e2"))
    assert again is not None and again.completion is not None
    assert again.completion.etag == "e1"


def test_completed_after_failed_records_the_object() -> None:
    # The opposite order is allowed on purpose: a completion proves an object
    # exists, which is the more important fact.
    state = fold(
        fold(None, seen("s1", "/w/a.mp4")), StreamFailed(stream_id="s1", at=T0, reason="deleted")
    )
    assert state is not None and state.status == "failed"
    done = fold(state, completed("s1", etag="e1"))
    assert done is not None and done.status == "completed"


# (d) parts belong to the current upload


@PROPERTY
@given(log=logs)
def test_parts_only_come_from_the_current_upload(log: list[Event]) -> None:
    for stream_id in ("s1", "s2", "s3"):
        sent: list[PartUploaded] = []
        previous: StreamState | None = None
        for event, state in history(log, stream_id):
            if isinstance(event, PartUploaded):
                sent.append(event)
            if state is None:
                continue
            for number, part in state.parts.items():
                assert number == part.number
                # Some PartUploaded of *this* upload id carried exactly this part.
                assert any(
                    e.upload_id == state.upload_id
                    and (e.part_number, e.offset, e.size, e.etag, e.md5, e.at)
                    == (part.number, part.offset, part.size, part.etag, part.md5, part.uploaded_at)
                    for e in sent
                ), (part, state.upload_id)
            if (
                isinstance(event, UploadStarted)
                and previous is not None
                and not previous.terminal
                and event.upload_id != previous.upload_id
            ):
                # A new upload replaces the old one: its parts are void.
                assert state.upload_id == event.upload_id
                assert state.parts == {}
            previous = state


def test_upload_replacement_voids_old_parts() -> None:
    log: list[Event] = [
        seen("s1", "/w/a.mp4"),
        UploadStarted(stream_id="s1", at=T0, upload_id="u1"),
        part("s1", "u1", 1, "old-1"),
        part("s1", "u1", 2, "old-2"),
        UploadStarted(stream_id="s1", at=T0, upload_id="u1"),  # duplicate: keeps parts
    ]
    state = replay(entries(log)).streams["s1"]
    assert sorted(state.parts) == [1, 2]
    log += [
        UploadStarted(stream_id="s1", at=T0, upload_id="u2"),
        part("s1", "u1", 3, "late-old-3"),  # late part of the replaced upload
        part("s1", "u2", 1, "new-1"),
    ]
    state = replay(entries(log)).streams["s1"]
    assert state.upload_id == "u2"
    assert {n: p.etag for n, p in state.parts.items()} == {1: "new-1"}


# (e) FileSeen: first fact stands; by_path follows the newest stream


@PROPERTY
@given(log=logs)
def test_duplicate_file_seen_does_not_reset_a_stream(log: list[Event]) -> None:
    for stream_id in ("s1", "s2", "s3"):
        previous: StreamState | None = None
        for event, state in history(log, stream_id):
            if isinstance(event, FileSeen) and previous is not None:
                # Redelivery (or a second writer) must not wipe upload id,
                # parts, status or size that later facts established.
                assert state is previous


def realistic(log: list[Event]) -> list[Event]:
    """``log`` without the facts about a stream that cannot follow its end in
    a real log: once a stream settled (failed, or completed with its sidecar
    written) its lease holder wrote its last event, and a duplicate FileSeen
    is a retried XADD, appended seconds after the original. What can still
    come is about its file (FileDeleted, RetryRequested) or a duplicate of an
    unfenced sidecar write (MetadataWritten)."""
    streams: dict[str, StreamState] = {}
    out: list[Event] = []
    for event in log:
        old = streams.get(event.stream_id)
        late_ok = isinstance(event, FileDeleted | RetryRequested | MetadataWritten)
        if old is not None and old.settled and not late_ok:
            continue
        new = fold(old, event)
        if new is not None:
            streams[new.stream_id] = new
        out.append(event)
    return out


def reference(log: list[Event]) -> tuple[dict[str, StreamState], dict[str, str]]:
    """Every stream ever and the newest stream created per path: the unbounded
    model the bounded projection is checked against."""
    streams: dict[str, StreamState] = {}
    newest: dict[str, str] = {}
    for event in log:
        old = streams.get(event.stream_id)
        new = fold(old, event)
        if new is not None:
            streams[new.stream_id] = new
            if old is None:
                newest[new.path] = new.stream_id
    return streams, newest


@PROPERTY
@given(log=logs.map(realistic))
def test_projection_holds_what_is_open_or_on_disk(log: list[Event]) -> None:
    everything, newest = reference(log)
    projection = replay(entries(log))
    # Streams: exactly the ones not settled, with the same state as the model.
    assert projection.streams == {i: s for i, s in everything.items() if not s.settled}
    # by_path: the newest stream of a path while it is open.
    assert projection.by_path == {
        path: i for path, i in newest.items() if not everything[i].terminal
    }
    for path, stream_id in projection.by_path.items():
        found = projection.for_path(path)
        assert found is not None and found.stream_id == stream_id and found.path == path
    # files: a record only for a path whose newest stream is finished, and it
    # describes that stream; none for a path whose file was reported gone.
    for path, record in projection.files.items():
        s = everything[record.stream_id]
        assert s.terminal and record == _without_retry(record_of(s), record)
        # The newest stream, or an older one while a newer is still open.
        assert newest[path] == record.stream_id or path in projection.by_path
    for path, stream_id in newest.items():
        s = everything[stream_id]
        if path not in projection.files and s.terminal:
            # Gone: deleted while live, or reported deleted after it finished,
            # or it ended while displaced (a record needs the newest stream).
            deleted_after = any(
                isinstance(e, FileDeleted) and e.stream_id == stream_id and e.path == path
                for e in log
            )
            assert s.gone == "deleted" or deleted_after


def _without_retry(expected: FileRecord, got: FileRecord) -> FileRecord:
    return msgspec.structs.replace(expected, retry=got.retry)


@PROPERTY
@given(log=logs.map(realistic))
def test_state_is_bounded_by_open_streams_and_files(log: list[Event]) -> None:
    # Finish every stream and delete every file: nothing may be left.
    projection = replay(entries(log))
    tail: list[Event] = []
    for s in list(projection.streams.values()):
        if not s.terminal:
            tail.append(StreamFailed(stream_id=s.stream_id, at=T0, reason="internal_error"))
        tail.append(MetadataWritten(stream_id=s.stream_id, at=T0, key="m", duration_seconds=None))
    for event in tail:
        projection.apply("9-0", event)
    for path, record in list(projection.files.items()):
        projection.apply("9-1", FileDeleted(stream_id=record.stream_id, at=T0, path=path))
    assert projection.streams == {} and projection.by_path == {} and projection.files == {}


def test_retry_marks_only_the_failed_record_it_names() -> None:
    log: list[Event] = [
        seen("s1", "/w/a.mp4"),
        StreamFailed(stream_id="s1", at=T0, reason="unreadable"),
        RetryRequested(stream_id="other", at=T0, path="/w/a.mp4"),
    ]
    projection = replay(entries(log))
    assert projection.files["/w/a.mp4"].retry is False
    projection.apply("9-0", RetryRequested(stream_id="s1", at=T0, path="/w/a.mp4"))
    assert projection.files["/w/a.mp4"].retry is True
    assert projection.files["/w/a.mp4"].failure_reason == "unreadable"


def test_late_duplicate_file_seen_of_a_retired_stream_is_ignored() -> None:
    log: list[Event] = [
        seen("s1", "/w/a.mp4"),
        completed("s1", etag="e1"),
        MetadataWritten(stream_id="s1", at=T0, key="m", duration_seconds=1.0),
        seen("s1", "/w/a.mp4"),
    ]
    projection = replay(entries(log))
    assert projection.streams == {} and projection.by_path == {}
    assert projection.files["/w/a.mp4"].stream_id == "s1"


def test_events_for_unknown_streams_are_ignored() -> None:
    # Late or foreign events (e.g. the FileSeen was trimmed from the stream) must
    # not invent a half-initialised stream.
    log: list[Event] = [
        BytesAvailable(stream_id="ghost", at=T0, size=5, mtime_ns=1),
        UploadStarted(stream_id="ghost", at=T0, upload_id="u1"),
        completed("ghost", etag="e"),
    ]
    projection = replay(entries(log))
    assert projection.streams == {} and projection.by_path == {}
    assert projection.events == 3 and projection.last_id == "3-0"


def test_new_recording_at_same_path_takes_over_by_path() -> None:
    log: list[Event] = [
        seen("s1", "/w/a.mp4"),
        completed("s1", etag="e1"),
        seen("s2", "/w/a.mp4"),
        seen("s1", "/w/a.mp4"),  # late duplicate of the old stream's FileSeen
    ]
    projection = replay(entries(log))
    assert projection.by_path == {"/w/a.mp4": "s2"}
    assert [s.stream_id for s in projection.live()] == ["s2"]
    assert projection.files["/w/a.mp4"].stream_id == "s1"  # until s2 finishes


# (f) what a continuation needs: the completed object's parts, from the log


md5_hexes = st.binary(min_size=16, max_size=16).map(bytes.hex)


@st.composite
def completed_multipart(draw: st.DrawFn) -> tuple[StreamState, PartPlan, bool]:
    """A completed stream whose parts are its object's layout, or - now and
    then - miss one or cover other bytes (which the record must not trust)."""
    first, rest = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    # None: a stream seen before plans were recorded, cut uniformly.
    recorded = draw(st.sampled_from([PartPlan(first, rest), None]))
    plan = recorded or PartPlan.uniform(first)
    size = draw(st.integers(first, first + rest * 6))
    parts: dict[int, Part] = {}
    exact = True
    for span in final_parts(size, plan):
        flaw = draw(st.sampled_from(["", "", "", "", "missing", "other bytes"]))
        exact = exact and not flaw
        if flaw != "missing":
            extra = 1 if flaw == "other bytes" else 0
            parts[span.number] = Part(
                span.number, span.offset, span.size + extra, "etag", draw(md5_hexes), T0
            )
    completion = Completion(size, 1, "e", "h", len(final_parts(size, plan)), "complete", "", T0)
    state = StreamState(
        "s1", "/w/a.mp4", "a.mp4", "b", "k/s1", 1, T0, "completed",
        parts=parts, completion=completion, plan=recorded,
    )  # fmt: skip
    return state, plan, exact


@PROPERTY
@given(case=completed_multipart())
def test_record_keeps_the_part_md5s_of_the_completed_object(
    case: tuple[StreamState, PartPlan, bool],
) -> None:
    state, plan, exact = case
    assert state.completion is not None
    record = record_of(state)
    if exact:
        md5s = tuple(state.parts[n].md5 for n in sorted(state.parts))
        later = plan.rest if plan.rest != plan.first else 0
        expected = Continues("s1", "k/s1", state.completion.size, plan.first, md5s, later)
        assert record.continues() == expected and record.continues().plan() == plan
        assert len(record.part_md5s) == 16 * len(md5s)  # packed: 16 bytes a part
    else:
        assert (record.part_size, record.part_md5s) == (0, b"")
        assert record.continues() == Continues("s1", "k/s1", state.completion.size)
    restored = snapshot(replay([]))
    restored.files["/w/a.mp4"] = record
    assert snapshot(restored) == restored  # bytes survive the msgpack snapshot


def test_single_put_and_failed_records_have_no_parts() -> None:
    put = fold(fold(None, seen("s1", "/w/a.mp4")), completed("s1", etag="e"))
    assert put is not None and record_of(put).continues() == Continues("s1", "k/s1", 10)
    failed = fold(
        fold(None, seen("s2", "/w/a.mp4")), StreamFailed(stream_id="s2", at=T0, reason="empty")
    )
    assert failed is not None and record_of(failed).part_md5s == b""


def test_file_seen_and_copied_parts_fold_into_the_state() -> None:
    continues = Continues("s0", "k/s0", 12, 5, ("aa" * 16, "bb" * 16, "cc" * 16))
    log: list[Event] = [
        msgspec.structs.replace(seen("s1", "/w/a.mp4"), continues=continues),
        UploadStarted(stream_id="s1", at=T0, upload_id="u1"),
        msgspec.structs.replace(part("s1", "u1", 1, "x-2"), copied=True),
        part("s1", "u1", 2, "y"),
    ]
    state = replay(entries(log)).streams["s1"]
    assert state.continues == continues
    assert [(p.number, p.copied) for p in state.parts.values()] == [(1, True), (2, False)]
    # Duplicate delivery of the FileSeen does not reset it (the first fact stands).
    again = replay(entries([*log, log[0]])).streams["s1"]
    assert again == state


# helpers


def seen(stream_id: str, path: str) -> FileSeen:
    return FileSeen(
        stream_id=stream_id,
        at=T0,
        path=path,
        rel_path=path.rsplit("/", 1)[-1],
        bucket="b",
        key=f"k/{stream_id}",
        size=0,
        mtime_ns=0,
        inode=1,
    )


def part(stream_id: str, upload_id: str, number: int, etag: str) -> PartUploaded:
    return PartUploaded(
        stream_id=stream_id,
        at=T0,
        upload_id=upload_id,
        part_number=number,
        offset=(number - 1) * 10,
        size=10,
        etag=etag,
        md5="m",
    )


def completed(stream_id: str, *, etag: str) -> StreamCompleted:
    return StreamCompleted(
        stream_id=stream_id,
        at=T0,
        bucket="b",
        key=f"k/{stream_id}",
        size=10,
        etag=etag,
        sha256="h",
        mtime_ns=1,
        parts=0,
        mp4="complete",
    )


def test_every_event_type_has_its_own_fold_step() -> None:
    """A new event added to EVENT_TYPES without a step would make ``fold``
    raise on the first one in the log; a step filed under another type would
    fold it as the wrong fact."""
    assert set(STEPS) == set(EVENT_TYPES.values())
    for event_type, step in STEPS.items():
        assert get_type_hints(step)["event"] is event_type, step.__name__


def test_records_and_states_from_snapshots_before_plans_read_as_uniform() -> None:
    """A snapshot written before plans were recorded: FileRecord arrays end at
    ``part_md5s`` and StreamStates have no ``plan``. They decode with
    ``later_part_size`` 0 and ``plan`` None, which mean every part of part 1's
    size (the record) and CHUNK_SIZE_BYTES (the stream), as they were cut."""
    md5s = bytes(range(32))
    old_record = ["s1", "k", "completed", 25, 1, 7, None, False, 10, md5s]
    record = msgspec.msgpack.decode(msgspec.msgpack.encode(old_record), type=FileRecord)
    assert record.later_part_size == 0
    assert record.continues().plan() == PartPlan.uniform(10)
    state = StreamState("s1", "/w/a.mp4", "a.mp4", "b", "k", 1, T0)
    doc = msgspec.to_builtins(state)
    del doc["plan"]
    old_state = msgspec.msgpack.decode(msgspec.msgpack.encode(doc), type=StreamState)
    assert old_state == state and old_state.plan is None
