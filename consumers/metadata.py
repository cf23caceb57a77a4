"""The ``metadata`` group: describe each completed recording in a JSON sidecar.

On ``StreamCompleted`` the local file is described and a sidecar goes to
``<object key>.metadata.json``, next to the video. The description is
ffprobe's, or (``METADATA_PROBE=auto``, the default) read from the MP4's own
boxes when they give every field ffprobe would (``cefmp4.domain.mp4meta``):
one ffprobe process per recording was most of the cost of a backlog of
small files. ffprobe is not trusted for
completeness (it reports a full duration for a truncated faststart file); that
verdict comes from the box walk recorded in the completion (``mp4_complete``).
When ffprobe fails or the content is not an MP4, the sidecar still goes up,
with ``duration_seconds: null`` and the reason. PutObject to a fixed key makes
writing it twice harmless.

The recording comes from outside, and so does ffprobe's description of it:
a hostile or broken file can carry thousands of streams or tags. Every step
is bounded: ffprobe's stdout is read up to ``FFPROBE_MAX_OUTPUT_BYTES`` (the
process is killed beyond), only the summary's fields are decoded (tags and
side data are skipped, not built), at most ``MAX_STREAMS_LISTED`` streams and
``MAX_CHUNKS_LISTED`` chunks are listed (with the totals), strings are cut
at ``MAX_STRING_CHARS``, and ``encode_sidecar`` guarantees the document is at
most ``SIDECAR_MAX_BYTES``, dropping the variable parts under a
``"truncated": true`` marker if it must. The identity fields (stream id,
bucket, key, size, ETag, SHA-256) are never touched.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import math
from datetime import datetime
from typing import Any

import msgspec
import structlog

from cefmp4.adapters import checksums, mp4files
from cefmp4.domain import mp4meta
from cefmp4.domain.events import Continues, Event, MetadataWritten, StreamCompleted
from cefmp4.domain.pathnames import to_fs
from consumers.deps import Deps
from projections.streams import Part, StreamState

log = structlog.get_logger(__name__)

FFPROBE_TIMEOUT_SECONDS = 60.0
# Far above any real description (a few KiB per stream), far below memory
# trouble; ffprobe is killed if it writes more.
FFPROBE_MAX_OUTPUT_BYTES = 16 * 1024 * 1024
FFPROBE_STDERR_TAIL_BYTES = 4096
# The encoded sidecar never exceeds this. It holds every chunk of a recording
# in the part plan's first tier (MAX_CHUNKS_LISTED parts, ~180 bytes each)
# plus MAX_STREAMS_LISTED streams with room to spare, so only a hostile or
# absurd description ever reaches the last-resort truncation.
SIDECAR_MAX_BYTES = 256 * 1024
MAX_STRING_CHARS = 1024
MAX_STREAMS_LISTED = 64
MAX_CHUNKS_LISTED = 1000
# Never shortened or dropped, whatever the limit forces out.
IDENTITY_FIELDS = (
    "stream_id", "s3_bucket", "s3_key_prefix", "s3_key", "total_size_bytes", "etag", "sha256",
)  # fmt: skip


class Probe(msgspec.Struct, frozen=True):
    duration_seconds: float | None
    container: dict[str, Any] | None
    streams: list[dict[str, Any]]  # at most MAX_STREAMS_LISTED
    error: str | None
    streams_total: int = 0  # how many ffprobe described


class _FfprobeStream(msgspec.Struct):
    """The summary's fields of one ffprobe stream; decoding into this skips
    everything else (tags, dispositions, side data) without building it."""

    index: Any = msgspec.UNSET
    codec_type: Any = msgspec.UNSET
    codec_name: Any = msgspec.UNSET
    profile: Any = msgspec.UNSET
    width: Any = msgspec.UNSET
    height: Any = msgspec.UNSET
    pix_fmt: Any = msgspec.UNSET
    avg_frame_rate: Any = msgspec.UNSET
    sample_rate: Any = msgspec.UNSET
    channels: Any = msgspec.UNSET
    bit_rate: Any = msgspec.UNSET


class _FfprobeFormat(msgspec.Struct):
    duration: Any = None
    format_name: Any = None
    format_long_name: Any = None
    bit_rate: Any = None
    nb_streams: Any = None


class _FfprobeOutput(msgspec.Struct):
    streams: list[_FfprobeStream] = []
    format: _FfprobeFormat | None = None


def clip(text: str, limit: int = MAX_STRING_CHARS) -> str:
    """Pure: ``text`` cut to ``limit`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _scalar(value: Any) -> Any:
    """A JSON scalar as is (strings clipped); anything nested is UNSET."""
    if isinstance(value, str):
        return clip(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return msgspec.UNSET


def _text(value: Any) -> str | None:
    return clip(value) if isinstance(value, str) else None


def _duration(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) else None


def _count(value: Any) -> int | None:
    """An integer as ffprobe writes it (a number or a string of digits)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    # Bounded: int() refuses over 4300 digits, and isdigit() admits non-ASCII.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    return None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def summarize(ffprobe_json: bytes) -> Probe:
    """Pure: ffprobe's JSON -> the sidecar's duration and codec summary."""
    try:
        raw = msgspec.json.decode(ffprobe_json, type=_FfprobeOutput)
    except msgspec.DecodeError as exc:  # ValidationError included: a JSON of another shape
        return Probe(None, None, [], clip(f"ffprobe output is not JSON: {exc}"))
    fmt = raw.format or _FfprobeFormat()
    duration = _duration(fmt.duration)
    container = {
        "format_name": _text(fmt.format_name),
        "format_long_name": _text(fmt.format_long_name),
        "bit_rate": _count(fmt.bit_rate),
        "nb_streams": _count(fmt.nb_streams),
    }
    streams = [
        {
            name: v
            for name in _FfprobeStream.__struct_fields__
            if (v := _scalar(getattr(st, name))) is not msgspec.UNSET
        }
        for st in raw.streams[:MAX_STREAMS_LISTED]
    ]
    error = None if duration is not None else "ffprobe reported no duration"
    return Probe(duration, container, streams, error, streams_total=len(raw.streams))


def checksum_field(tagged: str) -> dict[str, str] | None:
    """The sidecar's ``checksum``: the object's full-object CRC as the store
    reports it (HEAD, after the store verified it at upload), in S3's names
    and encoding; None when the store reports none (md5/none mode)."""
    found = checksums.untag(tagged)
    if found is None:
        return None
    algorithm, value = found
    return {"algorithm": checksums.S3_NAME[algorithm], "type": "FULL_OBJECT", "value": value}


def sidecar(
    s: StreamState,
    completed: StreamCompleted,
    probe: Probe,
    prefix: str,
    now: datetime,
    checksum: str = "",
) -> dict[str, Any]:
    """Pure: the sidecar document (the seed's fields plus the object's
    checksum, sha256 when computed, mp4 verdict, codecs). At most
    MAX_CHUNKS_LISTED chunks, the first ones; ``chunks_total`` says how many
    the object has. ``encode_sidecar`` makes it fit the limit."""
    if completed.parts == 0:
        chunks = [
            {
                "part_number": 1,
                "size_bytes": completed.size,
                "etag": completed.etag,
                "uploaded_at_utc": _iso(completed.at),
            }
        ]
    else:
        chunks = [
            {
                "part_number": p.number,
                "size_bytes": p.size,
                "etag": p.etag,
                "uploaded_at_utc": _iso(p.uploaded_at),
            }
            for n in range(1, completed.parts + 1)
            if (p := s.parts.get(n)) is not None
        ]
    extra = {} if s.continues is None else _continuation(s.continues, s.parts, chunks)
    return {
        "stream_id": s.stream_id,
        "original_file_path": s.path,
        "relative_path": s.rel_path,
        "s3_bucket": completed.bucket,
        "s3_key_prefix": f"{prefix}{s.stream_id}/",
        "s3_key": completed.key,
        "total_size_bytes": completed.size,
        "etag": completed.etag,
        "sha256": completed.sha256 or None,  # "": SIDECAR_SHA256 was off
        "checksum": checksum_field(checksum),
        "duration_seconds": probe.duration_seconds,
        "processed_at_utc": _iso(now),
        "stream_started_at_utc": _iso(s.started_at),
        "stream_completed_at_utc": _iso(completed.at),
        "mp4_complete": completed.mp4 == "complete",
        "mp4_structure": completed.mp4,
        "mp4_structure_reason": completed.mp4_reason or None,
        "container": probe.container,
        "streams": probe.streams,
        "streams_total": probe.streams_total,
        "ffprobe_error": None if probe.error is None else clip(probe.error),
        "chunks": chunks[:MAX_CHUNKS_LISTED],
        "chunks_total": len(chunks),
        "truncated": False,
        **extra,
    }


def _continuation(
    c: Continues, parts: dict[int, Part], chunks: list[dict[str, Any]]
) -> dict[str, Any]:
    """A continuation's sidecar names the object it extends (which stays as it
    was: a prefix of this one), and each chunk says whether it was copied from
    that object inside S3 rather than sent."""
    for chunk in chunks:
        part = parts.get(chunk["part_number"])
        chunk["copied"] = part is not None and part.copied
    return {"continues": {"stream_id": c.stream_id, "s3_key": c.key, "size_bytes": c.size}}


def _encode(doc: dict[str, Any]) -> bytes:
    return msgspec.json.format(msgspec.json.encode(doc), indent=2)


def _without_probe_detail(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "container": None, "streams": [], "truncated": True}


def _without_chunks(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "chunks": [], "truncated": True}


def _clipped_text(doc: dict[str, Any]) -> dict[str, Any]:
    # Everything left that is not identity is a string or a scalar; cut the
    # strings (paths, reasons) hard. Identity fields are bounded by S3 itself
    # (keys <= 1024 bytes, fixed-size hashes) and stay as they are.
    short = MAX_STRING_CHARS // 8
    return {
        k: clip(v, short) if isinstance(v, str) and k not in IDENTITY_FIELDS else v
        for k, v in doc.items()
    }


def encode_sidecar(doc: dict[str, Any], limit: int = SIDECAR_MAX_BYTES) -> bytes:
    """Pure: the sidecar as indented JSON, at most ``limit`` bytes.

    Normally ``doc`` fits as it is. Otherwise the variable parts go, one step
    at a time, until it fits: ffprobe's container and streams, then the chunk
    list, then long strings outside the identity fields; ``truncated`` turns
    true and the ``*_total`` counts stay. With identity fields as S3 bounds
    them, the last step always fits the default limit.
    """
    body = _encode(doc)
    for step in (_without_probe_detail, _without_chunks, _clipped_text):
        if len(body) <= limit:
            break
        doc = step(doc)
        body = _encode(doc)
    return body


async def _read_at_most(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, bool]:
    """Read to EOF but no more than ``limit`` bytes; (data, reached EOF)."""
    data = bytearray()
    while chunk := await stream.read(min(1 << 16, limit + 1 - len(data))):
        data += chunk
        if len(data) > limit:
            return bytes(data[:limit]), False
    return bytes(data), True


async def _tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    """Read to EOF; the last ``keep`` bytes."""
    tail = b""
    while chunk := await stream.read(1 << 16):
        tail = (tail + chunk)[-keep:] if keep else b""
    return tail


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
        proc.kill()


async def run_ffprobe(
    executable: str,
    path: str | bytes,
    *,
    max_output: int = FFPROBE_MAX_OUTPUT_BYTES,
) -> Probe:
    """ffprobe's summary of ``path``; every failure is a Probe with an error."""
    try:
        proc = await asyncio.create_subprocess_exec(
            executable, "-v", "error", "-print_format", "json",
            "-show_format", "-show_streams", path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except OSError as exc:
        return Probe(None, None, [], clip(f"cannot run ffprobe: {exc}"))
    assert proc.stdout is not None and proc.stderr is not None
    # stderr is drained all along (a full pipe would stall ffprobe) but
    # only its tail kept; stdout is read up to the cap, then ffprobe dies.
    stderr = asyncio.create_task(_tail(proc.stderr, FFPROBE_STDERR_TAIL_BYTES))
    try:
        async with asyncio.timeout(FFPROBE_TIMEOUT_SECONDS):
            out, whole = await _read_at_most(proc.stdout, max_output)
            if not whole:
                _kill(proc)
                # asyncio reports the exit only once every pipe is at EOF:
                # read what the dead process left in the pipe, keep nothing.
                await _tail(proc.stdout, 0)
            err = await stderr
            await proc.wait()
    except TimeoutError:
        _kill(proc)
        await proc.wait()
        return Probe(None, None, [], f"ffprobe timed out after {FFPROBE_TIMEOUT_SECONDS:g}s")
    finally:
        stderr.cancel()
        if proc.returncode is None:  # cancelled (shutdown): leave no ffprobe behind
            _kill(proc)
    if not whole:
        return Probe(None, None, [], f"ffprobe output exceeds {max_output} bytes")
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip()[-500:]
        return Probe(None, None, [], f"ffprobe exit {proc.returncode}: {message}")
    return summarize(out)


def from_boxes(description: mp4meta.BoxDescription) -> Probe:
    """Pure: the boxes' description as the Probe ffprobe's summary would be."""
    streams = description.streams[:MAX_STREAMS_LISTED]
    return Probe(
        description.duration_seconds,
        description.container,
        streams,
        None,
        streams_total=len(description.streams),
    )


async def boxes_probe(path: str) -> Probe | mp4meta.Undescribed:
    """The boxes' Probe of ``path`` (wire form), or why they do not settle it.
    A file that cannot be read is left to ffprobe, which reports the error."""
    try:
        # A thread: a long recording's moov is megabytes of sample tables.
        described = await asyncio.to_thread(mp4files.describe_file, to_fs(path))
    except OSError as exc:
        return mp4meta.Undescribed(f"cannot read: {exc}")
    if isinstance(described, mp4meta.Undescribed):
        return described
    return from_boxes(described)


class MetadataWriter:
    group = "metadata"
    wants: tuple[type[Event], ...] = (StreamCompleted,)

    def __init__(self, deps: Deps) -> None:
        self._deps = deps

    async def probe(self, path: str, mp4: str = "complete") -> Probe:
        """``path`` in wire form; ffprobe gets the file's own bytes, behind
        ``file:`` so no name (``-x.mp4``, ``concat:...``) reads as an option
        or a protocol. ``mp4`` is the completion's structure verdict: only a
        complete file's boxes are trusted to describe it."""
        mode = self._deps.config.metadata_probe
        if mode != "ffprobe":
            described = await boxes_probe(path) if mp4 == "complete" else None
            if isinstance(described, Probe):
                return described
            if mode == "boxes":
                why = described.reason if described is not None else f"mp4 structure {mp4}"
                return Probe(None, None, [], clip(f"the MP4 boxes do not describe it: {why}"))
        return await run_ffprobe(self._deps.config.ffprobe_path, b"file:" + to_fs(path))

    async def handle(self, event: Event) -> None:
        assert isinstance(event, StreamCompleted)
        s = (await self._deps.projection.catch_up()).streams.get(event.stream_id)
        if s is None or s.metadata_key is not None:
            return
        if s.completion is None or s.completion.at != event.at:
            # A second completion (racing finalizers): the first one stands in
            # the projection, and the sidecar must describe that one.
            return
        probe = await self.probe(s.path, event.mp4)
        if probe.error:
            log.warning(
                "ffprobe could not describe the recording",
                stream_id=s.stream_id,
                path=s.path,
                error=probe.error,
            )
        # The object's checksum as the store holds it: what it verified, not
        # what we meant to send. The finalizer's HEAD recorded it; a completion
        # logged before it did (or by a store that reports none) asks again.
        checksum = event.checksum
        if not checksum:
            info = await self._deps.store.head_object(event.key)
            checksum = "" if info is None else info.checksum
        doc = sidecar(s, event, probe, self._deps.config.s3_key_prefix, self._deps.now(), checksum)
        body = encode_sidecar(doc)
        md5_b64 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        key = f"{event.key}.metadata.json"
        await self._deps.store.put_object(key, body, md5_b64, "application/json")
        await self._deps.emit(
            MetadataWritten(
                stream_id=s.stream_id,
                at=self._deps.now(),
                key=key,
                duration_seconds=probe.duration_seconds,
                error=probe.error,
            )
        )
        self._deps.metrics.sidecars.labels("ok" if probe.error is None else "error").inc()
        log.info(
            "sidecar written",
            stream_id=s.stream_id,
            key=key,
            duration_seconds=probe.duration_seconds,
        )
