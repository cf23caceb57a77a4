"""Stream state as a projection of the event log.

``fold`` is the only place that knows how a fact changes a stream's state. It
is pure and total: the same function serves the live follower (events as they
arrive) and the replay of the whole log at start-up, so the two cannot drift
apart. Facts that no longer matter (a part of an upload that was replaced, a
byte count after the stream ended) are ignored rather than rejected, because
at-least-once delivery and several writers make such late facts normal.

``Projection`` is the container: every stream by id, the newest stream for
each path (what the watcher compares the disk against), and the id of the last
entry folded (where a follower resumes XREAD).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from cefmp4.events import (
    BytesAvailable,
    Event,
    FileDeleted,
    FileSeen,
    FileTruncated,
    IdleReason,
    MetadataWritten,
    Mp4State,
    PartUploaded,
    StreamCompleted,
    StreamFailed,
    StreamIdle,
    UploadStarted,
)

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


class Idle(msgspec.Struct, frozen=True, gc=False):
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
    idle: Idle | None = None
    completion: Completion | None = None
    failure_reason: str | None = None
    failure_detail: str = ""
    gone: Literal["deleted", "truncated"] | None = None
    metadata_key: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def fold(state: StreamState | None, event: Event) -> StreamState | None:
    """The state after ``event``; ``None`` while the stream is unknown."""
    if isinstance(event, FileSeen):
        if state is not None:  # duplicate delivery: the first fact stands
            return state
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
        )
    if state is None:
        return None
    replace = msgspec.structs.replace
    match event:
        case StreamCompleted():
            if state.status == "completed":  # duplicate or racing finalizer: the first stands
                return state
            return replace(
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
        case MetadataWritten():
            return replace(state, metadata_key=event.key)
        case StreamFailed():
            if state.status == "completed":  # an object exists; that fact wins
                return state
            return replace(
                state, status="failed", failure_reason=event.reason, failure_detail=event.detail
            )
        case FileDeleted():
            return state if state.gone else replace(state, gone="deleted")
        case FileTruncated():
            return state if state.gone else replace(state, gone="truncated")
    if state.terminal:
        return state
    match event:
        case BytesAvailable():
            return replace(state, status="active", size=event.size, mtime_ns=event.mtime_ns)
        case UploadStarted():
            if event.upload_id == state.upload_id:
                return state
            return replace(state, upload_id=event.upload_id, parts={})
        case PartUploaded():
            if event.upload_id != state.upload_id:
                return state  # a part of a replaced upload is void
            part = Part(
                number=event.part_number,
                offset=event.offset,
                size=event.size,
                etag=event.etag,
                md5=event.md5,
                uploaded_at=event.at,
            )
            return replace(state, parts={**state.parts, event.part_number: part})
        case StreamIdle():
            idle = Idle(event.size, event.mtime_ns, event.reason, event.mp4, event.mp4_reason)
            return replace(state, status="idle", idle=idle)
    return state


class Projection(msgspec.Struct):
    """All streams, folded. Mutable container of immutable states."""

    streams: dict[str, StreamState] = msgspec.field(default_factory=dict)
    by_path: dict[str, str] = msgspec.field(default_factory=dict)
    last_id: str = "0-0"
    events: int = 0

    def apply(self, entry_id: str, event: Event) -> None:
        old = self.streams.get(event.stream_id)
        new = fold(old, event)
        if new is not None:
            self.streams[event.stream_id] = new
            if old is None:  # a FileSeen that created a stream: newest for its path
                self.by_path[new.path] = new.stream_id
        self.last_id = entry_id
        self.events += 1

    def for_path(self, path: str) -> StreamState | None:
        stream_id = self.by_path.get(path)
        return None if stream_id is None else self.streams.get(stream_id)

    def live(self) -> list[StreamState]:
        return [s for s in self.streams.values() if not s.terminal]


def replay(entries: list[tuple[str, Event]]) -> Projection:
    projection = Projection()
    for entry_id, event in entries:
        projection.apply(entry_id, event)
    return projection
