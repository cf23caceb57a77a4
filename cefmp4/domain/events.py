"""Events: the immutable facts in the log, and their wire format.

Every change in CefMP4 is an event appended to one Redis Stream
(``<prefix>:events``). An entry has the fields

* ``type`` - the event name, e.g. ``PartUploaded``;
* ``v`` - the version of that event type (``VERSION`` on its class);
* ``data`` - the event as JSON (msgspec), readable from any language;
* ``replica`` - which process wrote it (host-pid or ``REPLICA_ID``).

Events are facts, never commands: "part 3 of stream X is in S3 with ETag E",
not "upload part 3". Consumers decide what to do by folding facts into a
projection (``projections.streams``) and comparing it with the file on disk.

Versions are per type, so one event can change without touching the others.
Adding an optional field (with a default) is backwards compatible and keeps
``VERSION``; anything else bumps it and declares an upcaster, a pure function
from the JSON object of version n to that of n + 1 (after the ``eventsourcing``
library's ``upcast_v1_v2``). A replica reads every version up to its own: the
current one with the typed decoder (the replay's fast path), an older one as a
plain dict taken up the chain of upcasters and converted to the class. It
cannot read a newer version or an unknown type: those decode to
``UnknownEvent``, which consumer groups leave pending for a newer replica
(``cefmp4.runtime.consumerloop``). Rolling upgrades therefore go one way: start the
new replicas, then stop the old ones. ``docs/events.schema.json`` is the
same contract for other languages (``python -m cefmp4.dev.schema``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal, get_args

import msgspec

from cefmp4.domain.partplan import PartPlan

Mp4State = Literal["complete", "incomplete", "fragmented", "invalid"]
IdleReason = Literal["settled", "timeout"]
# What made the watcher look: the file stayed quiet (settle or timeout), or
# the writer closed it / moved it into place (inotify, Linux).
IdleCause = Literal["quiet", "closed"]
# RFC 3339 in JSON; msgspec's schema leaves the format out, other languages want it.
UtcDatetime = Annotated[datetime, msgspec.Meta(extra_json_schema={"format": "date-time"})]

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
    # Every concrete event class sets its own; Codec refuses a class without one.
    VERSION: ClassVar[int]

    stream_id: str
    at: UtcDatetime  # UTC, timezone-aware


# gc=False: scalars and a tuple of strings, never in a cycle; a StreamState
# holds it (see projections.streams on untracked state).
class Continues(msgspec.Struct, frozen=True, gc=False):
    """The completed object whose file a new stream's file extends: the
    recorder paused past the idle timeout and appended to the same file. The
    new stream gets its own object with the whole file; parts whose bytes the
    earlier object already holds are copied inside the store, not sent again.

    Everything the copy needs is here, in the log (the projection's record of
    the path is replaced when the new stream finishes, and another replica may
    handle it). The earlier object's parts are ``cefmp4.domain.partplan``'s
    ``final_parts(size, plan())``; ``part_md5s`` has the hex MD5 of each
    one's bytes, in part order (empty for an object made by one PutObject).
    """

    stream_id: str
    key: str
    size: int
    part_size: int = 0  # the size of its part 1 (0: no parts to copy)
    part_md5s: tuple[str, ...] = ()
    # The size of its parts 2-1000; 0 in continuations written before plans
    # were recorded, whose parts were all ``part_size``.
    later_part_size: int = 0

    def plan(self) -> PartPlan:
        return PartPlan(self.part_size, self.later_part_size or self.part_size)


class FileSeen(Event, frozen=True, kw_only=True):
    """A new recording: a path that has no live stream, or new content at it."""

    VERSION: ClassVar[int] = 1

    # Paths are in wire form (cefmp4.domain.pathnames: any bytes, printable, reversible).
    path: str  # absolute path on the watcher's host
    rel_path: str  # relative to WATCH_DIR, '/'-separated, never shortened
    bucket: str
    key: str  # object key, fixed for the stream's whole life (cefmp4.domain.objectkeys)
    size: int
    mtime_ns: int
    inode: int
    # Optional (added without a version bump): a replica that does not know it
    # uploads the whole file instead of copying the unchanged parts.
    continues: Continues | None = None
    # How the file is cut into parts (chosen when it was seen). Optional, added
    # without a version bump: None in entries from before it, which were cut
    # by CHUNK_SIZE_BYTES alone. A replica that does not know it cuts by its
    # own CHUNK_SIZE_BYTES, and the object is still byte-exact: every part
    # records its span, and a finalizer re-sends any part its plan cuts
    # differently. A bump would be worse: older replicas would skip these
    # streams yet acknowledge their later events and snapshot past them.
    plan: PartPlan | None = None


class BytesAvailable(Event, frozen=True, kw_only=True):
    """The file changed (grew or was patched); coalesced, not one per write."""

    VERSION: ClassVar[int] = 1

    size: int
    mtime_ns: int


class UploadStarted(Event, frozen=True, kw_only=True):
    """A multipart upload exists for the stream. A second one replaces the first
    (the first was lost, e.g. aborted by a lifecycle rule): its parts are void."""

    VERSION: ClassVar[int] = 1

    upload_id: str


class PartUploaded(Event, frozen=True, kw_only=True):
    VERSION: ClassVar[int] = 1

    upload_id: str
    part_number: int
    offset: int
    size: int
    etag: str
    # Hex MD5 of the part's bytes: computed and sent as Content-MD5 in md5
    # mode; with a CRC (``checksum``) the store's MD5 ETag, computed locally
    # only when the ETag is not an MD5; "" when neither is known.
    md5: str
    # The bytes were copied inside the store from the object the stream
    # continues (FileSeen.continues), not sent; ``etag`` is then the store's.
    copied: bool = False
    # The part's checksum as sent and verified by the store, tagged with its
    # algorithm ("crc64nvme:<base64>", cefmp4.adapters.checksums); "" in md5
    # or none mode and in events written before S3_CHECKSUM existed.
    checksum: str = ""
    # The file's size and mtime (fstat after the part was read), recorded only
    # when the file had been quiet for a while: if the file still has them at
    # finalization, the part's bytes cannot have changed and are not read again.
    file_size: int | None = None
    file_mtime_ns: int | None = None
    # With no ``checksum`` (md5 or none mode): the CRC64NVME of the bytes sent,
    # computed locally (tagged). The store never sees it; the finalizer's
    # re-read compares it instead of a second MD5, at a thirtieth of the CPU.
    crc: str = ""


class StreamIdle(Event, frozen=True, kw_only=True):
    """The file has not changed for a while; the finalizer should try to finish."""

    VERSION: ClassVar[int] = 1

    size: int
    mtime_ns: int
    reason: IdleReason
    mp4: Mp4State
    mp4_reason: str = ""
    cause: IdleCause = "quiet"  # optional (v1 readers and entries without it: "quiet")


class StreamCompleted(Event, frozen=True, kw_only=True):
    VERSION: ClassVar[int] = 1

    bucket: str
    key: str
    size: int
    etag: str
    sha256: str
    mtime_ns: int  # of the file at finalization: a later change is a new recording
    parts: int  # 0 for a single PutObject
    mp4: Mp4State
    mp4_reason: str = ""
    # The object's checksum as the store reported it after completion (tagged,
    # "crc64nvme:<base64>"), "" where it reports none: what the sidecar says
    # the store verified, without asking the store again.
    checksum: str = ""


class MetadataWritten(Event, frozen=True, kw_only=True):
    VERSION: ClassVar[int] = 1

    key: str  # the sidecar's object key
    duration_seconds: float | None
    error: str | None = None


class StreamFailed(Event, frozen=True, kw_only=True):
    """Terminal: the stream produced no object (or gave up on one)."""

    VERSION: ClassVar[int] = 2

    reason: FailReason
    detail: str = ""


class FileDeleted(Event, frozen=True, kw_only=True):
    """The file left the disk. For an open stream: it ends (``deleted``). For a
    finished one: the projection forgets its record, which keeps the
    service's state bounded by the files still on disk."""

    VERSION: ClassVar[int] = 1

    path: str


class FileTruncated(Event, frozen=True, kw_only=True):
    """The file shrank or was replaced under the same name (O_TRUNC, new inode).
    Its stream is abandoned; the new content becomes a new stream."""

    VERSION: ClassVar[int] = 1

    path: str
    size: int


class RetryRequested(Event, frozen=True, kw_only=True):
    """An operator asked (``cefmp4 retry``) for another attempt at the failed
    stream ``stream_id``; the watcher starts a new stream for ``path`` if the
    file is still there."""

    VERSION: ClassVar[int] = 1

    path: str


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
        RetryRequested,
    )
}

TERMINAL_TYPES = (StreamCompleted, StreamFailed)


# JSON object of (type, from_version) -> that of from_version + 1. An upcaster
# may assume the documented shape of its from-version; the errors a malformed
# entry makes it raise turn into UnknownEvent. Example, for a FileSeen v2 that
# adds `device: str = ""`: {("FileSeen", 1): lambda doc: {**doc, "device": ""}}.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

# StreamFailed v1 carried a free-form reason (``s3_accessdenied``,
# ``permanent_error``, ...); v2's is the closed ``FailReason``. The S3 code the
# old reason named moves into ``detail``, so nothing is lost.
_V1_REASONS: Mapping[str, str] = MappingProxyType(
    {"s3_invalidpart": "s3_invalid_part", "permanent_error": "internal_error"}
)


def upcast_stream_failed_v1_v2(doc: dict[str, Any]) -> dict[str, Any]:
    reason = str(doc["reason"])
    if reason in get_args(FailReason):
        return doc
    new = _V1_REASONS.get(reason, "s3_rejected" if reason.startswith("s3_") else "internal_error")
    detail = f"{reason}: {doc.get('detail', '')}".rstrip(": ")
    return {**doc, "reason": new, "detail": detail}


UPCASTERS: Mapping[tuple[str, int], Upcaster] = MappingProxyType(
    {("StreamFailed", 1): upcast_stream_failed_v1_v2}
)

# What an upcaster raises on an entry that does not have its from-version's shape.
_UPCAST_ERRORS = (LookupError, TypeError, ValueError, AttributeError)
_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


class UnknownEvent(msgspec.Struct, frozen=True):
    """An entry this version cannot decode (newer type or version, or malformed)."""

    type: str
    v: int
    error: str

    def label(self) -> str:
        """``type`` as a metric label: bounded, whatever the entry said."""
        return self.type if _LABEL.fullmatch(self.type) else "invalid"


class Codec:
    """The event types one version of the code reads, and its upcasters.

    Immutable once built; the module's :data:`CODEC` is built at import from
    :data:`EVENT_TYPES` and :data:`UPCASTERS`, and a test builds its own to
    play a newer (or older) replica. Construction checks the chain: every
    version below a class's ``VERSION`` has an upcaster, and no upcaster
    exists for a type or version the codec does not read - a gap would make
    old entries of the log unreadable, which must fail at import, not on a
    replay.
    """

    def __init__(
        self,
        types: Iterable[type[Event]],
        upcasters: Mapping[tuple[str, int], Upcaster] | None = None,
    ) -> None:
        self.types: Mapping[str, type[Event]] = MappingProxyType(
            {cls.__name__: cls for cls in types}
        )
        self.upcasters: Mapping[tuple[str, int], Upcaster] = MappingProxyType(dict(upcasters or {}))
        for name, cls in self.types.items():
            version = getattr(cls, "VERSION", None)
            if not isinstance(version, int) or version < 1:
                raise ValueError(f"{name}: VERSION must be an int >= 1, not {version!r}")
            missing = [v for v in range(1, version) if (name, v) not in self.upcasters]
            if missing:
                raise ValueError(f"{name} v{version}: no upcaster from v{missing[0]}")
        for name, v in self.upcasters:
            if name not in self.types or not 1 <= v < self.types[name].VERSION:
                raise ValueError(f"upcaster ({name!r}, {v}) upgrades nothing this codec reads")
        # Keyed by the raw wire bytes, so the common case compares bytes and
        # never parses `type` or `v`.
        self._current = {
            name.encode(): (cls, msgspec.json.Decoder(cls), str(cls.VERSION).encode())
            for name, cls in self.types.items()
        }

    def decode(self, fields: Mapping[bytes, bytes]) -> Event | UnknownEvent:
        """Entry fields (as XREAD returns them) to the event; never raises."""
        current = self._current.get(fields.get(b"type", b""))
        if current is not None and fields.get(b"v") == current[2]:
            cls, decoder, _ = current
            try:
                return decoder.decode(fields.get(b"data", b""))
            except msgspec.DecodeError as exc:
                return UnknownEvent(cls.__name__, cls.VERSION, str(exc))
        return self._decode_other(fields)

    def _decode_other(self, fields: Mapping[bytes, bytes]) -> Event | UnknownEvent:
        name = fields.get(b"type", b"").decode(errors="replace")
        try:
            version = int(fields.get(b"v", b"0"))
        except ValueError:  # not a number, not UTF-8, or too many digits
            version = 0
        cls = self.types.get(name)
        if cls is None:
            return UnknownEvent(name, version, "unknown type")
        if version > cls.VERSION:
            return UnknownEvent(name, version, f"newer than this replica's v{cls.VERSION}")
        if version < 1:
            return UnknownEvent(name, version, "no such version")
        data = fields.get(b"data", b"")
        try:
            if version == cls.VERSION:  # spelled differently, e.g. b"01"
                return self._current[name.encode()][1].decode(data)
            doc = msgspec.json.decode(data)
        except msgspec.DecodeError as exc:
            return UnknownEvent(name, version, str(exc))
        if not isinstance(doc, dict):
            return UnknownEvent(name, version, "data is not a JSON object")
        return self._upcast(cls, version, doc)

    def _upcast(self, cls: type[Event], version: int, doc: dict[str, Any]) -> Event | UnknownEvent:
        name = cls.__name__
        for v in range(version, cls.VERSION):
            try:
                doc = self.upcasters[(name, v)](doc)
            except _UPCAST_ERRORS as exc:
                return UnknownEvent(name, version, f"upcast v{v}: {type(exc).__name__}: {exc}")
        try:
            return msgspec.convert(doc, cls)
        except msgspec.ValidationError as exc:
            return UnknownEvent(name, version, f"upcast to v{cls.VERSION}: {exc}")


CODEC = Codec(EVENT_TYPES.values(), UPCASTERS)
_encoder = msgspec.json.Encoder()


def encode(event: Event, replica: str) -> dict[str, bytes]:
    """Stream entry fields for ``event``, at its class's version."""
    return {
        "type": type(event).__name__.encode(),
        "v": str(event.VERSION).encode(),
        "data": _encoder.encode(event),
        "replica": replica.encode(),
    }


def decode(fields: Mapping[bytes, bytes], codec: Codec = CODEC) -> Event | UnknownEvent:
    """Inverse of :func:`encode`; never raises on a malformed entry."""
    return codec.decode(fields)
