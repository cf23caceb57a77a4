"""Stream state as a projection of the event log.

``fold`` is the only place that knows how a fact changes a stream's state:
one small step per event type (``STEPS``), dispatched on the event's type.
It is pure and total: the same function serves the live follower (events as they
arrive) and the replay of the whole log at start-up, so the two cannot drift
apart. Facts that no longer matter (a part of an upload that was replaced, a
byte count after the stream ended) are ignored rather than rejected, because
at-least-once delivery and several writers make such late facts normal.

``Projection`` is the container, and its size follows what is live or on
disk, never how much was handled before (a recorder box hands the service
tens of thousands of recordings a day, for months):

* ``streams``: the open streams by id, plus completed ones until their sidecar
  is written (the metadata consumer still needs their parts). A stream that
  is settled - failed, or completed with its sidecar written or given up on -
  is *retired*: it leaves ``streams``.
* ``by_path``: the newest open stream of each path (what the watcher compares
  the disk against).
* ``files``: for each path whose newest stream finished and whose file is still
  on disk, a compact ``FileRecord``: just what a decision about that file still
  needs (which stream, which key, the size/mtime/inode it had, completed or
  failed, and a completed object's part MD5s, which a continuation of the file
  needs to copy the unchanged parts). It goes when the file goes: the watcher
  appends ``FileDeleted`` for the record when the file is gone from disk (a
  notification or a rescan).
* ``last_id``/``events``: the last entry folded (where a follower resumes XREAD).

A late duplicate ``FileSeen`` of a retired stream whose record is still there
is recognised by its stream id and ignored (the first fact stands). One whose
record is gone too (the file was deleted) would start the stream again; the
watcher then finds no file and fails it as ``deleted``: noise, never a wrong
object. Duplicates are appended within seconds of the original (a retried
XADD), long before a stream can retire, so this does not happen in practice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, Literal

import msgspec

from cefmp4.domain.events import (
    BytesAvailable,
    Continues,
    Event,
    FileDeleted,
    FileSeen,
    FileTruncated,
    IdleReason,
    MetadataWritten,
    Mp4State,
    PartUploaded,
    RetryRequested,
    StreamCompleted,
    StreamFailed,
    StreamIdle,
    UploadStarted,
)
from cefmp4.domain.partplan import PartPlan, capacity, final_parts

Status = Literal["active", "idle", "completed", "failed"]
TERMINAL: frozenset[Status] = frozenset({"completed", "failed"})


# gc=False on the state structs: they hold only scalars, strings, datetimes,
# each other and (StreamState) a dict of Parts, so they can never be part of a
# reference cycle. Untracked, the hundreds of thousands of them a projection
# holds cost the cyclic GC nothing: catch_up of a 1M-event log got 10-40 % faster
# (with hiredis; tests/bench/bench_replay.py). Semantics are unchanged.
class Part(msgspec.Struct, frozen=True, gc=False):
    number: int
    offset: int
    size: int
    etag: str
    md5: str
    uploaded_at: datetime
    copied: bool = False  # copied inside the store from the continued object
    checksum: str = ""  # tagged CRC (PartUploaded.checksum), "" for md5/none
    file_size: int | None = None  # the file when the part was read, if quiet
    file_mtime_ns: int | None = None
    crc: str = ""  # local CRC of the bytes sent when ``checksum`` is "" (PartUploaded.crc)


class IdleReport(msgspec.Struct, frozen=True, gc=False):
    """What the last ``StreamIdle`` said: the file's size and mtime when it
    went quiet, why, and the MP4 verdict (``StreamState.idle``)."""

    size: int
    mtime_ns: int
    reason: IdleReason
    mp4: Mp4State
    mp4_reason: str


class Completion(msgspec.Struct, frozen=True, gc=False):
    size: int
    mtime_ns: int
    etag: str
    sha256: str
    parts: int
    mp4: Mp4State
    mp4_reason: str
    at: datetime


class StreamState(msgspec.Struct, frozen=True, gc=False):
    stream_id: str
    path: str
    rel_path: str
    bucket: str
    key: str
    inode: int
    started_at: datetime
    status: Status = "active"
    size: int = 0
    mtime_ns: int = 0
    upload_id: str | None = None
    # Never mutated in place: fold copies the dict, so every state value that
    # was ever handed out stays valid (snapshots, concurrent readers).
    parts: dict[int, Part] = msgspec.field(default_factory=dict)
    idle: IdleReport | None = None
    completion: Completion | None = None
    failure_reason: str | None = None
    failure_detail: str = ""
    gone: Literal["deleted", "truncated"] | None = None
    metadata_key: str | None = None
    continues: Continues | None = None  # the completed object this file extends
    # How the file is cut (FileSeen.plan); None for a stream seen before plans
    # were recorded, cut by CHUNK_SIZE_BYTES (consumers.deps.Deps.plan_of).
    plan: PartPlan | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def settled(self) -> bool:
        """Nothing more will happen to it: failed, or completed and its sidecar
        written (or given up on: a StreamFailed after the completion)."""
        if self.status == "failed":
            return True
        return self.status == "completed" and (
            self.metadata_key is not None or self.failure_reason is not None
        )


class FileRecord(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """A finished recording whose file is still on disk: what the watcher needs
    to tell "unchanged, nothing to do" from "new content, a new recording",
    and, for a completed object, what a continuation of the file needs to copy
    the object's parts instead of sending them (``Continues``).

    One per file on disk, so 100k of them on a busy recorder: ``array_like``
    keeps the field names out of every snapshot entry (about a third of it)."""

    stream_id: str
    key: str
    status: Literal["completed", "failed"]
    size: int  # of the completed object; for a failed stream, the last size seen
    mtime_ns: int
    inode: int
    failure_reason: str | None = None
    retry: bool = False  # ``cefmp4 retry`` asked for another attempt
    # The completed multipart object's parts: their plan (part 1's size, and
    # that of parts 2-1000 when it differs) and the 16-byte MD5 of each,
    # concatenated in part order - one bytes object, not a string per part,
    # because there is a record per file on disk. Empty for a single
    # PutObject, a failed stream, or parts that do not tile the object
    # (never expected; then nothing is copied). ``later_part_size`` is last
    # and 0 when equal, so records of snapshots from before it read the same.
    part_size: int = 0
    part_md5s: bytes = b""
    later_part_size: int = 0

    def plan(self) -> PartPlan | None:
        """How the completed object was cut; None where nothing is copyable."""
        if self.part_size < 1:
            return None
        return PartPlan(self.part_size, self.later_part_size or self.part_size)

    def continues(self) -> Continues:
        """What a stream that extends this recording's file continues."""
        md5s = self.part_md5s
        hexes = tuple(md5s[i : i + 16].hex() for i in range(0, len(md5s), 16))
        return Continues(
            self.stream_id, self.key, self.size, self.part_size, hexes, self.later_part_size
        )


def record_of(s: StreamState) -> FileRecord:
    """The compact record of a terminal stream."""
    if s.completion is not None:
        plan, md5s = _object_parts(s, s.completion)
        return FileRecord(
            s.stream_id,
            s.key,
            "completed",
            s.completion.size,
            s.completion.mtime_ns,
            s.inode,
            part_size=plan.first if plan else 0,
            part_md5s=md5s,
            later_part_size=plan.rest if plan and plan.rest != plan.first else 0,
        )
    return FileRecord(s.stream_id, s.key, "failed", s.size, s.mtime_ns, s.inode, s.failure_reason)


def _object_parts(s: StreamState, c: Completion) -> tuple[PartPlan | None, bytes]:
    """The completed object's part plan and packed part MD5s, from the parts
    the stream recorded. Total: anything that is not exactly the object's
    layout (which the finalizer verified part by part before completing)
    gives nothing, and a continuation then sends every part. A stream that
    recorded no plan was cut into parts of one size, which part 1 shows."""
    first = s.parts.get(1)
    if c.parts == 0 or first is None or first.size < 1:
        return None, b""
    plan = s.plan or PartPlan.uniform(first.size)
    if plan.first != first.size or c.size > capacity(plan):
        return None, b""
    spans = final_parts(c.size, plan)
    if len(spans) != c.parts:
        return None, b""
    digests = []
    for span in spans:
        p = s.parts.get(span.number)
        if p is None or (p.offset, p.size) != (span.offset, span.size):
            return None, b""
        try:
            digest = bytes.fromhex(p.md5)
        except ValueError:
            return None, b""
        if len(digest) != 16:
            return None, b""
        digests.append(digest)
    return plan, b"".join(digests)


def fold(state: StreamState | None, event: Event) -> StreamState | None:
    """The state after ``event``; ``None`` while the stream is unknown."""
    if state is None:
        return _started(event) if isinstance(event, FileSeen) else None
    return STEPS[type(event)](state, event)


# One step per event type: how the fact changes a stream the projection
# knows. Steps that only matter while the stream is open return a terminal
# stream unchanged (a late byte count or part after the end is void).
_replace = msgspec.structs.replace


def _started(event: FileSeen) -> StreamState:
    return StreamState(
        stream_id=event.stream_id,
        path=event.path,
        rel_path=event.rel_path,
        bucket=event.bucket,
        key=event.key,
        inode=event.inode,
        started_at=event.at,
        size=event.size,
        mtime_ns=event.mtime_ns,
        continues=event.continues,
        plan=event.plan,
    )


def _seen_again(state: StreamState, event: FileSeen) -> StreamState:
    return state  # duplicate delivery: the first fact stands


def _bytes_available(state: StreamState, event: BytesAvailable) -> StreamState:
    if state.terminal:
        return state
    return _replace(state, status="active", size=event.size, mtime_ns=event.mtime_ns)


def _upload_started(state: StreamState, event: UploadStarted) -> StreamState:
    if state.terminal or event.upload_id == state.upload_id:
        return state
    return _replace(state, upload_id=event.upload_id, parts={})


def _part_uploaded(state: StreamState, event: PartUploaded) -> StreamState:
    if state.terminal or event.upload_id != state.upload_id:
        return state  # a part of a replaced upload is void
    part = Part(
        number=event.part_number,
        offset=event.offset,
        size=event.size,
        etag=event.etag,
        md5=event.md5,
        uploaded_at=event.at,
        copied=event.copied,
        checksum=event.checksum,
        file_size=event.file_size,
        file_mtime_ns=event.file_mtime_ns,
        crc=event.crc,
    )
    return _replace(state, parts={**state.parts, event.part_number: part})


def _stream_idle(state: StreamState, event: StreamIdle) -> StreamState:
    if state.terminal:
        return state
    idle = IdleReport(event.size, event.mtime_ns, event.reason, event.mp4, event.mp4_reason)
    return _replace(state, status="idle", idle=idle)


def _stream_completed(state: StreamState, event: StreamCompleted) -> StreamState:
    if state.status == "completed":  # duplicate or racing finalizer: the first stands
        return state
    return _replace(
        state,
        status="completed",
        completion=Completion(
            size=event.size,
            mtime_ns=event.mtime_ns,
            etag=event.etag,
            sha256=event.sha256,
            parts=event.parts,
            mp4=event.mp4,
            mp4_reason=event.mp4_reason,
            at=event.at,
        ),
    )


def _metadata_written(state: StreamState, event: MetadataWritten) -> StreamState:
    return _replace(state, metadata_key=event.key)


def _stream_failed(state: StreamState, event: StreamFailed) -> StreamState:
    if state.status == "completed":
        # An object exists; that fact wins. What failed is its sidecar:
        # remember why, which also settles the stream.
        if state.failure_reason is not None:
            return state
        return _replace(state, failure_reason=event.reason, failure_detail=event.detail)
    return _replace(
        state, status="failed", failure_reason=event.reason, failure_detail=event.detail
    )


def _file_deleted(state: StreamState, event: FileDeleted) -> StreamState:
    return state if state.gone else _replace(state, gone="deleted")


def _file_truncated(state: StreamState, event: FileTruncated) -> StreamState:
    return state if state.gone else _replace(state, gone="truncated")


def _retry_requested(state: StreamState, event: RetryRequested) -> StreamState:
    return state  # about the file's record, not the stream: ``Projection.apply``


# Any: each step takes its own event type; ``STEPS[type(event)]`` pairs them.
STEPS: Mapping[type[Event], Callable[[StreamState, Any], StreamState]] = MappingProxyType(
    {
        FileSeen: _seen_again,
        BytesAvailable: _bytes_available,
        UploadStarted: _upload_started,
        PartUploaded: _part_uploaded,
        StreamIdle: _stream_idle,
        StreamCompleted: _stream_completed,
        MetadataWritten: _metadata_written,
        StreamFailed: _stream_failed,
        FileDeleted: _file_deleted,
        FileTruncated: _file_truncated,
        RetryRequested: _retry_requested,
    }
)


class Projection(msgspec.Struct):
    """Open streams, finished files on disk, folded. Mutable container of
    immutable states; see the module docstring for what each part holds."""

    streams: dict[str, StreamState] = msgspec.field(default_factory=dict)
    by_path: dict[str, str] = msgspec.field(default_factory=dict)
    files: dict[str, FileRecord] = msgspec.field(default_factory=dict)
    last_id: str = "0-0"
    events: int = 0

    def apply(self, entry_id: str, event: Event) -> None:
        self.last_id = entry_id
        self.events += 1
        old = self.streams.get(event.stream_id)
        if old is None and isinstance(event, FileSeen) and self._is_finished(event):
            return  # a late duplicate of a retired stream's first fact
        new = fold(old, event)
        if new is not None:
            if old is None:  # a FileSeen that created a stream: newest for its path
                self.by_path[new.path] = new.stream_id
            if new.terminal and (old is None or not old.terminal):
                self._finished(new)
            if new.settled:
                self.streams.pop(new.stream_id, None)
            else:
                self.streams[new.stream_id] = new
        if isinstance(event, FileDeleted | RetryRequested):
            self._file_event(event)

    def _is_finished(self, event: FileSeen) -> bool:
        record = self.files.get(event.path)
        return record is not None and record.stream_id == event.stream_id

    def _finished(self, s: StreamState) -> None:
        """``s`` just became terminal. Only the newest stream of a path speaks
        for the file; an older one (displaced by a truncation) says nothing."""
        if self.by_path.get(s.path) != s.stream_id:
            return
        del self.by_path[s.path]
        if s.gone == "deleted":
            self.files.pop(s.path, None)
        else:
            self.files[s.path] = record_of(s)

    def _file_event(self, event: FileDeleted | RetryRequested) -> None:
        record = self.files.get(event.path)
        if record is None or record.stream_id != event.stream_id:
            return
        if isinstance(event, FileDeleted):
            del self.files[event.path]
        elif record.status == "failed":
            self.files[event.path] = msgspec.structs.replace(record, retry=True)

    def for_path(self, path: str) -> StreamState | None:
        """The newest open stream of ``path``."""
        stream_id = self.by_path.get(path)
        return None if stream_id is None else self.streams.get(stream_id)

    def live(self) -> list[StreamState]:
        """Open streams: O(live), whatever the history (``streams`` holds no
        retired ones)."""
        return [s for s in self.streams.values() if not s.terminal]


def replay(entries: list[tuple[str, Event]]) -> Projection:
    projection = Projection()
    for entry_id, event in entries:
        projection.apply(entry_id, event)
    return projection
