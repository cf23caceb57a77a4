"""The ``metadata`` group: describe each completed recording in a JSON sidecar.

On ``StreamCompleted`` ffprobe inspects the local file and a sidecar goes to
``<object key>.metadata.json``, next to the video. ffprobe is not trusted for
completeness (it reports a full duration for a truncated faststart file); that
verdict comes from the box walk recorded in the completion (``mp4_complete``).
When ffprobe fails or the content is not an MP4, the sidecar still goes up,
with ``duration_seconds: null`` and the reason. PutObject to a fixed key makes
writing it twice harmless.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from datetime import datetime
from typing import Any

import msgspec
import structlog

from cefmp4.deps import Deps
from cefmp4.events import Event, MetadataWritten, StreamCompleted
from cefmp4.pathnames import to_fs
from projections.streams import StreamState

log = structlog.get_logger(__name__)

FFPROBE_TIMEOUT_SECONDS = 60.0


class Probe(msgspec.Struct, frozen=True):
    duration_seconds: float | None
    container: dict[str, Any] | None
    streams: list[dict[str, Any]]
    error: str | None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def summarize(ffprobe_json: bytes) -> Probe:
    """Pure: ffprobe's JSON -> the sidecar's duration and codec summary."""
    try:
        raw = msgspec.json.decode(ffprobe_json)
    except msgspec.DecodeError as exc:
        return Probe(None, None, [], f"ffprobe output is not JSON: {exc}")
    fmt = raw.get("format") or {}
    try:
        duration: float | None = float(fmt["duration"])
    except (KeyError, TypeError, ValueError):
        duration = None
    container = {
        "format_name": fmt.get("format_name"),
        "format_long_name": fmt.get("format_long_name"),
        "bit_rate": int(fmt["bit_rate"]) if str(fmt.get("bit_rate", "")).isdigit() else None,
        "nb_streams": fmt.get("nb_streams"),
    }
    keep = (
        "index", "codec_type", "codec_name", "profile", "width", "height",
        "pix_fmt", "avg_frame_rate", "sample_rate", "channels", "bit_rate",
    )  # fmt: skip
    streams = [{k: st[k] for k in keep if k in st} for st in raw.get("streams", [])]
    error = None if duration is not None else "ffprobe reported no duration"
    return Probe(duration, container, streams, error)


def sidecar(
    s: StreamState, completed: StreamCompleted, probe: Probe, prefix: str, now: datetime
) -> dict[str, Any]:
    """Pure: the sidecar document (the seed's fields plus sha256, mp4 verdict, codecs)."""
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
    return {
        "stream_id": s.stream_id,
        "original_file_path": s.path,
        "relative_path": s.rel_path,
        "s3_bucket": completed.bucket,
        "s3_key_prefix": f"{prefix}{s.stream_id}/",
        "s3_key": completed.key,
        "total_size_bytes": completed.size,
        "etag": completed.etag,
        "sha256": completed.sha256,
        "duration_seconds": probe.duration_seconds,
        "processed_at_utc": _iso(now),
        "stream_started_at_utc": _iso(s.started_at),
        "stream_completed_at_utc": _iso(completed.at),
        "mp4_complete": completed.mp4 == "complete",
        "mp4_structure": completed.mp4,
        "mp4_structure_reason": completed.mp4_reason or None,
        "container": probe.container,
        "streams": probe.streams,
        "ffprobe_error": probe.error,
        "chunks": chunks,
    }


class MetadataWriter:
    group = "metadata"
    wants: tuple[type[Event], ...] = (StreamCompleted,)

    def __init__(self, deps: Deps) -> None:
        self._deps = deps

    async def probe(self, path: str) -> Probe:
        """``path`` in wire form; ffprobe gets the file's own bytes, behind
        ``file:`` so no name (``-x.mp4``, ``concat:...``) reads as an option
        or a protocol."""
        try:
            proc = await asyncio.create_subprocess_exec(
                self._deps.config.ffprobe_path, "-v", "error", "-print_format", "json",
                "-show_format", "-show_streams", b"file:" + to_fs(path),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
        except OSError as exc:
            return Probe(None, None, [], f"cannot run ffprobe: {exc}")
        try:
            async with asyncio.timeout(FFPROBE_TIMEOUT_SECONDS):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return Probe(None, None, [], f"ffprobe timed out after {FFPROBE_TIMEOUT_SECONDS}s")
        if proc.returncode != 0:
            message = err.decode(errors="replace").strip()[-500:]
            return Probe(None, None, [], f"ffprobe exit {proc.returncode}: {message}")
        return summarize(out)

    async def handle(self, event: Event) -> None:
        assert isinstance(event, StreamCompleted)
        s = (await self._deps.projection.catch_up()).streams.get(event.stream_id)
        if s is None or s.metadata_key is not None:
            return
        if s.completion is None or s.completion.at != event.at:
            # A second completion (racing finalizers): the first one stands in
            # the projection, and the sidecar must describe that one.
            return
        probe = await self.probe(s.path)
        if probe.error:
            log.warning(
                "ffprobe could not describe the recording",
                stream_id=s.stream_id,
                path=s.path,
                error=probe.error,
            )
        doc = sidecar(s, event, probe, self._deps.config.s3_key_prefix, self._deps.now())
        body = msgspec.json.format(msgspec.json.encode(doc), indent=2)
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
