"""The ``finalizers`` group: turn an idle stream into one byte-exact object.

On ``StreamIdle`` the file is compared with the moment the watcher called it
idle; if it changed since, nothing happens (the watcher has reported the
change and will call it idle again). Otherwise every part is read once more,
in order: its MD5 is compared with the recorded one, so bytes the recorder
patched after they were sent (the ``mdat`` size at offset ~40, a rewritten
``moov``, a faststart shift of the whole file) are sent again under the same
part number, and the SHA-256 of the whole file is computed on the way. The
tail goes up as the last part, the file is checked once more to be unchanged,
the upload is completed and the object's size verified with HEAD. Only then is
``StreamCompleted`` written.

Idempotence: a completion that already happened (crash before the event) is
recognised by NoSuchUpload + an object of the right size; a small file goes up
with one PutObject to the stream's own key, so repeating it is harmless.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import structlog

from cefmp4.adapters import files
from cefmp4.adapters.checksums import md5_of, multipart_etag
from cefmp4.adapters.leases import Fence
from cefmp4.domain.errors import NoSuchUpload, PermanentError, StreamEnded
from cefmp4.domain.events import Event, StreamCompleted, StreamIdle
from cefmp4.domain.filerules import FileStat
from cefmp4.domain.partplan import Span, final_parts, fits_single_put
from consumers.deps import Deps
from consumers.uploads import (
    CONTENT_TYPE,
    Uploads,
    check_size,
    first_failure,
    matches,
)
from projections.streams import Part, StreamState

log = structlog.get_logger(__name__)


class FileMoved(Exception):
    """The file changed during finalization; wait for the next StreamIdle."""


class Finalizer:
    group = "finalizers"
    wants: tuple[type[Event], ...] = (StreamIdle,)

    def __init__(self, deps: Deps, uploads: Uploads) -> None:
        self._deps = deps
        self._uploads = uploads

    async def handle(self, event: Event) -> None:
        assert isinstance(event, StreamIdle)
        async with self._uploads.leased(event.stream_id) as held:
            if held is None:
                return
            s, fence = held
            started = time.monotonic()
            async with self._uploads.stream_slots:
                # Unreadable, empty, too large, ...: raised for the supervisor.
                try:
                    await self._finalize(s, event, fence)
                except (FileMoved, files.FileGone, files.FileShrank) as exc:
                    log.info(
                        "file changed during finalization; resuming",
                        stream_id=s.stream_id,
                        why=str(exc),
                    )
                    return
            self._deps.metrics.finalize_seconds.observe(time.monotonic() - started)

    def _unchanged(self, s: StreamState, idle: StreamIdle) -> FileStat:
        current = files.stat(s.path)
        if current is None:
            raise files.FileGone(s.path)
        if (current.size, current.mtime_ns, current.inode) != (idle.size, idle.mtime_ns, s.inode):
            raise FileMoved(f"{s.path} changed since it went idle")
        return current

    async def _finalize(self, s: StreamState, idle: StreamIdle, fence: Fence) -> None:
        current = self._unchanged(s, idle)
        chunk = self._deps.config.chunk_size_bytes
        if current.size == 0:
            raise StreamEnded("empty", "the file stayed empty until the idle timeout")
        check_size(current.size, chunk)
        if s.upload_id is None and fits_single_put(current.size, chunk):
            etag, sha256 = await self._put_small(s, idle)
            parts = 0
        else:
            etag, sha256, parts = await self._complete_multipart(
                s, idle, final_parts(current.size, chunk), fence
            )
        info = await self._deps.store.head_object(s.key)
        if info is None or info.size != current.size:
            raise PermanentError(
                f"object {s.key} has size {info and info.size}, file has {current.size}",
                reason="verify_failed",
            )
        completed_at = self._deps.now()
        await self._deps.emit(
            StreamCompleted(
                stream_id=s.stream_id,
                at=completed_at,
                bucket=s.bucket,
                key=s.key,
                size=current.size,
                etag=etag,
                sha256=sha256,
                mtime_ns=current.mtime_ns,
                parts=parts,
                mp4=idle.mp4,
                mp4_reason=idle.mp4_reason,
            ),
            fence,
        )
        self._deps.metrics.completed_stream(
            idle.mp4, seen=s.started_at, idle=idle.at, changed_ns=idle.mtime_ns, at=completed_at
        )
        log.info(
            "stream completed",
            stream_id=s.stream_id,
            key=s.key,
            size=current.size,
            parts=parts,
            mp4=idle.mp4,
        )

    async def _put_small(self, s: StreamState, idle: StreamIdle) -> tuple[str, str]:
        data = await asyncio.to_thread(files.read_range, s.path, 0, idle.size)
        sha256 = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        _, md5_b64 = await asyncio.to_thread(md5_of, data)
        self._unchanged(s, idle)
        etag = await self._deps.store.put_object(s.key, data, md5_b64, CONTENT_TYPE)
        self._deps.metrics.uploaded("single", len(data), self._deps.now())
        return etag, sha256

    async def _complete_multipart(
        self, s: StreamState, idle: StreamIdle, spans: list[Span], fence: Fence
    ) -> tuple[str, str, int]:
        upload_id = await self._uploads.ensure_upload(s, fence)
        for attempt in (1, 2):
            try:
                parts = await self._uploads.reconcile(s, upload_id, idle.size, fence)
                etags, sha256 = await self._verify_and_send(s, upload_id, spans, parts, fence)
            except NoSuchUpload:
                upload_id = await self._uploads.restart_upload(s, fence)
                etags, sha256 = await self._verify_and_send(s, upload_id, spans, {}, fence)
            self._unchanged(s, idle)
            layout = [(sp.number, etags[sp.number]) for sp in spans]
            await fence.lease.check()  # a replica that lost the stream must not complete it
            try:
                return await self._complete(s, upload_id, layout), sha256, len(spans)
            except PermanentError as exc:
                if exc.reason != "s3_invalid_part" or attempt == 2:
                    raise
                # The store does not have a part the log says it has: list the
                # parts again, send what is missing, and try once more.
                log.warning("InvalidPart at completion; reconciling", stream_id=s.stream_id)
                self._uploads.forget(s)
                s = (await self._deps.projection.catch_up()).streams[s.stream_id]
        raise AssertionError("unreachable")

    async def _complete(self, s: StreamState, upload_id: str, layout: list[tuple[int, str]]) -> str:
        try:
            return await self._deps.store.complete_multipart(s.key, upload_id, layout)
        except NoSuchUpload:
            # Completed before a crash swallowed our StreamCompleted? Then the
            # object is there with the multipart ETag of exactly these parts.
            # (A copied part's ETag need not be an MD5 - SeaweedFS - so then
            # only the size check after completion can tell.)
            info = await self._deps.store.head_object(s.key)
            expected = multipart_etag([e for _, e in layout])
            if info is None or (expected is not None and info.etag != expected):
                raise
            return info.etag

    async def _verify_and_send(
        self,
        s: StreamState,
        upload_id: str,
        spans: list[Span],
        parts: dict[int, Part],
        fence: Fence,
    ) -> tuple[dict[int, str], str]:
        """Read every part once, in order: send the missing ones, compare the sent
        ones with their recorded MD5 and send again those whose bytes changed.

        The whole-file SHA-256 runs in its own thread one part behind the
        per-part MD5 (hashlib releases the GIL), so the two cores hash at once.
        """
        whole = hashlib.sha256()
        etags: dict[int, str] = {}
        limit = asyncio.Semaphore(self._deps.config.part_concurrency)
        hashing: asyncio.Future[None] | None = None
        with first_failure():
            async with asyncio.TaskGroup() as group:
                for span in spans:
                    data = await asyncio.to_thread(files.read_range, s.path, span.offset, span.size)
                    if hashing is not None:
                        await hashing
                    hashing = asyncio.ensure_future(asyncio.to_thread(whole.update, data))
                    known = parts.get(span.number)
                    if matches(known, span):
                        assert known is not None
                        md5_hex, _ = await asyncio.to_thread(md5_of, data)
                        if md5_hex == known.md5:
                            etags[span.number] = known.etag
                            continue
                        log.info(
                            "part changed after upload; sending again",
                            stream_id=s.stream_id,
                            part=span.number,
                        )
                    await limit.acquire()
                    group.create_task(self._send(s, upload_id, span, data, etags, limit, fence))
                if hashing is not None:
                    await hashing
        return etags, whole.hexdigest()

    async def _send(
        self,
        s: StreamState,
        upload_id: str,
        span: Span,
        data: bytes,
        etags: dict[int, str],
        limit: asyncio.Semaphore,
        fence: Fence,
    ) -> None:
        try:
            etags[span.number] = await self._uploads.send_bytes(
                s, upload_id, span, data, "final", fence
            )
        finally:
            limit.release()
