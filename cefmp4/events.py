"""Events: the immutable facts in the log, and their wire format.

Every change in CefMP4 is an event appended to one Redis Stream
(``<prefix>:events``). An entry has the fields

* ``type`` - the event name, e.g. ``PartUploaded``;
* ``v`` - the schema version of that event type;
* ``data`` - the event as JSON (msgspec), readable from any language;
* ``replica`` - which process wrote it (host-pid or ``REPLICA_ID``).

Events are facts, never commands: "part 3 of stream X is in S3 with ETag E",
not "upload part 3". Consumers decide what to do by folding facts into a
projection (``projections.streams``) and comparing it with the file on disk.
Adding an optional field is backwards compatible; anything else bumps ``v``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

SCHEMA_VERSION = 1

Mp4State = Literal["complete", "incomplete", "fragmented", "invalid"]
IdleReason = Literal["settled", "timeout"]
# Why a stream ended without an object: a closed set, so the
# ``cefmp4_streams_failed{reason}`` label stays bounded (details go in
# ``StreamFailed.detail``). ``deleted`` and ``truncated`` are the recorder's
# doing and expected; the others mean a recording was lost and deserve a look.
FailReason = Literal[
    "empty",  # still empty at the idle timeout
    "deleted",  # removed from disk before completion
    "truncated",  # shrank or was replaced under the same name
    "unreadable",  # permission denied, I/O error
    "too_large",  # beyond S3's 5 TiB object limit (or the part plan's capacity)
    "verify_failed",  # the completed object's size is not the file's
    "s3_invalid_part",  # InvalidPart again after a re-listing
    "s3_rejected",  # any other permanent S3 4xx; the S3 code is in ``detail``
    "s3_client_error",  # botocore refused the request before sending it
    "no_such_upload",  # the upload vanished and no object stands for it
    "redis_error",  # Redis refused a command (not a connection problem)
    "internal_error",  # a bug: the handler raised something unexpected
]


class Event(msgspec.Struct, frozen=True, kw_only=True):
    stream_id: str
    at: datetime  # UTC, timezone-aware


class FileSeen(Event, frozen=True, kw_only=True):
    """A new recording: a path that has no live stream, or new content at it."""

    path: str  # absolute path on the watcher's host
    rel_path: str  # relative to WATCH_DIR, '/'-separated; part of the object key
    bucket: str
    key: str  # object key, fixed for the stream's whole life
    size: int
    mtime_ns: int
    inode: int


class BytesAvailable(Event, frozen=True, kw_only=True):
    """The file changed (grew or was patched); coalesced, not one per write."""

    size: int
    mtime_ns: int


class UploadStarted(Event, frozen=True, kw_only=True):
    """A multipart upload exists for the stream. A second one replaces the first
    (the first was lost, e.g. aborted by a lifecycle rule): its parts are void."""

    upload_id: str


class PartUploaded(Event, frozen=True, kw_only=True):
    upload_id: str
    part_number: int
    offset: int
    size: int
    etag: str
    md5: str  # hex MD5 of the bytes sent (also sent as Content-MD5)


class StreamIdle(Event, frozen=True, kw_only=True):
    """The file has not changed for a while; the finalizer should try to finish."""

    size: int
    mtime_ns: int
    reason: IdleReason
    mp4: Mp4State
    mp4_reason: str = ""


class StreamCompleted(Event, frozen=True, kw_only=True):
    bucket: str
    key: str
    size: int
    etag: str
    sha256: str
    mtime_ns: int  # of the file at finalization: a later change is a new recording
    parts: int  # 0 for a single PutObject
    mp4: Mp4State
    mp4_reason: str = ""


class MetadataWritten(Event, frozen=True, kw_only=True):
    key: str  # the sidecar's object key
    duration_seconds: float | None
    error: str | None = None


class StreamFailed(Event, frozen=True, kw_only=True):
    """Terminal: the stream produced no object (or gave up on one)."""

    reason: FailReason
    detail: str = ""


class FileDeleted(Event, frozen=True, kw_only=True):
    path: str


class FileTruncated(Event, frozen=True, kw_only=True):
    """The file shrank or was replaced under the same name (O_TRUNC, new inode).
    Its stream is abandoned; the new content becomes a new stream."""

    path: str
    size: int


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        FileSeen,
        BytesAvailable,
        UploadStarted,
        PartUploaded,
        StreamIdle,
        StreamCompleted,
        MetadataWritten,
        StreamFailed,
        FileDeleted,
        FileTruncated,
    )
}

TERMINAL_TYPES = (StreamCompleted, StreamFailed)


class UnknownEvent(msgspec.Struct, frozen=True):
    """An entry this version cannot decode (newer type or version): skipped, not fatal."""

    type: str
    v: int
    error: str


_encoder = msgspec.json.Encoder()
_decoders = {name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()}


def encode(event: Event, replica: str) -> dict[str, bytes]:
    """Stream entry fields for ``event``."""
    return {
        "type": type(event).__name__.encode(),
        "v": str(SCHEMA_VERSION).encode(),
        "data": _encoder.encode(event),
        "replica": replica.encode(),
    }


def decode(fields: dict[bytes, bytes]) -> Event | UnknownEvent:
    """Inverse of :func:`encode`; never raises on a malformed entry."""
    name = fields.get(b"type", b"").decode(errors="replace")
    try:
        version = int(fields.get(b"v", b"0"))
    except ValueError:
        version = 0
    decoder = _decoders.get(name)
    if decoder is None or version != SCHEMA_VERSION:
        return UnknownEvent(name, version, "unknown type or version")
    try:
        return decoder.decode(fields.get(b"data", b""))
    except msgspec.DecodeError as exc:
        return UnknownEvent(name, version, str(exc))
