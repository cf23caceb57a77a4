"""The ``finalizers`` group: turn an idle stream into one byte-exact object.

On ``StreamIdle`` the file is compared with the moment the watcher called it
idle; if it changed since, nothing happens (the watcher has reported the
change and will call it idle again). Otherwise every part is read once more,
in order: its checksum (the recorded CRC, or MD5 for parts that have none) is
compared with the recorded one, so bytes the recorder patched after they were
sent (the ``mdat`` size at offset ~40, a rewritten ``moov``, a faststart shift
of the whole file) are sent again under the same part number. A part read
while the file was quiet and already as it is now (``PartUploaded.file_size``
and ``file_mtime_ns`` equal the idle stat) cannot have changed and is not read
again. With ``SIDECAR_SHA256`` every byte is read and the SHA-256 of the whole
file computed on the way. The tail goes up as the last part, the file is
checked once more to be unchanged, the upload is completed - with a CRC, the
store verifies the FULL_OBJECT checksum combined from the part CRCs - and the
object's size (and checksum, where HEAD reports one) verified. Only then is
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

from cefmp4.adapters import checksums, files
from cefmp4.adapters.checksums import multipart_etag
from cefmp4.adapters.leases import Fence
from cefmp4.domain.errors import NoSuchUpload, PermanentError, StreamEnded
from cefmp4.domain.events import Event, StreamCompleted, StreamIdle
from cefmp4.domain.filerules import FileStat
from cefmp4.domain.partplan import Span, final_parts, fits_single_put
from consumers.deps import Deps
from consumers.uploads import (
    CONTENT_TYPE,
    Chunk,
    Sent,
    Uploads,
    check_size,
    first_failure,
    matches,
)
from projections.streams import Part, StreamState

log = structlog.get_logger(__name__)


class FileMoved(Exception):
    """The file changed during finalization; wait for the next StreamIdle."""


def read_since(part: Part, idle: StreamIdle) -> bool:
    """The part was read while the file was quiet and already had the size
    and mtime it has now (idle, and ``_unchanged`` since): nothing wrote to
    the file after the read, so the bytes sent are the file's."""
    return part.file_size == idle.size and part.file_mtime_ns == idle.mtime_ns


def same_bytes(known: Part, chunk: Chunk) -> bool:
    """Like with like: the CRC the store verified when the part has one, else
    the local CRC recorded with it (md5/none mode), else its MD5."""
    if checksums.untag(known.checksum) is not None:
        return chunk.checksum == known.checksum
    if checksums.untag(known.crc) is not None:
        return chunk.crc == known.crc
    return bool(known.md5) and chunk.md5_hex == known.md5


def needs_md5(known: Part | None, continues: bool) -> bool:
    """The ``md5`` for a finalizer's read (``Uploads.read``): where only an
    MD5 can tell the bytes (a part recorded with no CRC, a continuation's copy
    check); a compare by CRC or a part not sent yet needs none of its own."""
    if continues:
        return True
    if known is None:
        return False
    return checksums.untag(known.checksum) is None and checksums.untag(known.crc) is None


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
        plan = self._deps.plan_of(s)
        if current.size == 0:
            raise StreamEnded("empty", "the file stayed empty until the idle timeout")
        check_size(current.size, plan)
        if s.upload_id is None and fits_single_put(current.size, plan):
            etag, sha256, checksum = await self._put_small(s, idle)
            parts = 0
        else:
            etag, sha256, parts, checksum = await self._complete_multipart(
                s, idle, final_parts(current.size, plan), fence
            )
        if parts == 0 and checksum and self._deps.config.s3_checksum == "auto":
            # One PutObject whose CRC the store verified on the very bytes it
            # stored (it accepted the header; the start-up probe showed that
            # this store refuses a wrong one): that answer is the proof, and
            # a HEAD would only repeat it.
            stored = checksum
        else:
            stored = await self._verify_stored(s.key, current.size, checksum)
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
                checksum=stored,
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

    async def _verify_stored(self, key: str, size: int, checksum: str) -> str:
        """HEAD the completed object: its size must be the file's and its
        checksum, where the store reports one, the one sent. Returns that
        checksum ("" where the store reports none)."""
        info = await self._deps.store.head_object(key)
        if info is None or info.size != size:
            raise PermanentError(
                f"object {key} has size {info and info.size}, file has {size}",
                reason="verify_failed",
            )
        if checksum and info.checksum and info.checksum != checksum:
            raise PermanentError(
                f"object {key} has checksum {info.checksum}, the file {checksum}",
                reason="verify_failed",
            )
        return info.checksum

    async def _put_small(self, s: StreamState, idle: StreamIdle) -> tuple[str, str, str]:
        """PutObject with the same checksum a part would carry; (ETag,
        SHA-256 or "", the tagged CRC or "")."""
        algorithm = await self._uploads.algorithm()
        chunk = await self._uploads.read(s, Span(1, 0, idle.size), algorithm, send=True)
        try:
            sha256 = ""
            if self._deps.config.sidecar_sha256:  # sha256 mode read it already
                sha256 = chunk.sha256_hex or await asyncio.to_thread(
                    checksums.sha256_hex, chunk.data
                )
            self._unchanged(s, idle)
            md5_b64 = "" if chunk.checksum else chunk.md5_b64
            etag = await self._deps.store.put_object(
                s.key, chunk.data, md5_b64, CONTENT_TYPE, checksum=chunk.checksum,
                payload_sha256=chunk.sha256_hex,
            )  # fmt: skip
        finally:
            self._uploads.release(chunk)
        self._deps.metrics.uploaded("single", idle.size, self._deps.now())
        return etag, sha256, chunk.checksum

    async def _complete_multipart(
        self, s: StreamState, idle: StreamIdle, spans: list[Span], fence: Fence
    ) -> tuple[str, str, int, str]:
        """(ETag, SHA-256 or "", parts, the object's tagged CRC or "")."""
        upload_id = await self._uploads.ensure_upload(s, fence)
        for attempt in (1, 2):
            try:
                parts = await self._uploads.reconcile(s, upload_id, idle.size, fence)
                sent, sha256 = await self._verify_and_send(s, upload_id, spans, parts, idle, fence)
            except NoSuchUpload:
                upload_id = await self._uploads.restart_upload(s, fence)
                sent, sha256 = await self._verify_and_send(s, upload_id, spans, {}, idle, fence)
            self._unchanged(s, idle)
            layout = [(sp.number, sent[sp.number].etag) for sp in spans]
            # The server checks the object against the combination of the part
            # CRCs: no byte is read for it, and a part it holds other than we
            # think fails the completion instead of making a wrong object.
            checksum = checksums.combine_tagged((sent[sp.number].checksum, sp.size) for sp in spans)
            part_sums = {sp.number: sent[sp.number].checksum for sp in spans} if checksum else None
            await fence.lease.check()  # a replica that lost the stream must not complete it
            try:
                etag = await self._complete(s, upload_id, layout, part_sums, checksum or "")
                return etag, sha256, len(spans), checksum or ""
            except PermanentError as exc:
                if exc.reason != "s3_invalid_part" or attempt == 2:
                    raise
                # The store does not have a part the log says it has: list the
                # parts again, send what is missing, and try once more.
                log.warning("InvalidPart at completion; reconciling", stream_id=s.stream_id)
                self._uploads.forget(s)
                s = (await self._deps.projection.catch_up()).streams[s.stream_id]
        raise AssertionError("unreachable")

    async def _complete(
        self,
        s: StreamState,
        upload_id: str,
        layout: list[tuple[int, str]],
        part_checksums: dict[int, str] | None,
        checksum: str,
    ) -> str:
        try:
            return await self._deps.store.complete_multipart(
                s.key, upload_id, layout, part_checksums=part_checksums, checksum=checksum
            )
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
        idle: StreamIdle,
        fence: Fence,
    ) -> tuple[dict[int, Sent], str]:
        """Read every part that may have changed, in order: send the missing
        ones, compare the sent ones with their recorded checksum and send again
        those whose bytes changed. Returns what the store holds and the file's
        SHA-256 ("" unless SIDECAR_SHA256).

        With SIDECAR_SHA256 every part is read, and the hash runs in its own
        thread one part behind the checksums (both release the GIL), so the
        two cores hash at once; a chunk stays lent until both are done with it.
        """
        algorithm = await self._uploads.algorithm_of(s, upload_id)
        whole = hashlib.sha256() if self._deps.config.sidecar_sha256 else None
        sent: dict[int, Sent] = {}
        limit = asyncio.Semaphore(self._deps.config.part_concurrency)
        hashing: asyncio.Future[None] | None = None
        hashed: Chunk | None = None
        try:
            with first_failure():
                async with asyncio.TaskGroup() as group:
                    for span in spans:
                        known = parts.get(span.number)
                        if not matches(known, span):
                            known = None
                        if known is not None and whole is None and read_since(known, idle):
                            sent[span.number] = Sent(known.etag, known.checksum)
                            continue
                        md5 = needs_md5(known, s.continues is not None)
                        if hashing is not None and hashed is not None:
                            # Before taking another buffer: holding this one
                            # while waiting for room (MAX_PARTS_IN_FLIGHT)
                            # could leave every finalizer waiting for another.
                            await hashing
                            self._uploads.release(hashed)
                            hashed = None
                        chunk = await self._uploads.read(
                            s, span, algorithm, send=known is None, md5=md5
                        )
                        try:
                            if whole is not None:
                                chunk.users += 1
                                hashed = chunk
                                hashing = asyncio.ensure_future(
                                    asyncio.to_thread(whole.update, chunk.data)
                                )
                            if known is not None:
                                if same_bytes(known, chunk):
                                    sent[span.number] = Sent(known.etag, known.checksum)
                                    continue
                                log.info(
                                    "part changed after upload; sending again",
                                    stream_id=s.stream_id,
                                    part=span.number,
                                )
                            await limit.acquire()
                            chunk.users += 1
                            group.create_task(self._send(s, upload_id, chunk, sent, limit, fence))
                        finally:
                            self._uploads.release(chunk)
                    if hashing is not None:
                        await hashing
        finally:
            # A hash thread that may still read its buffer keeps it until it
            # is done; then it is lent again (its room under the cap with it).
            if hashed is not None:
                if hashing is None or hashing.done():
                    self._uploads.release(hashed)
                else:
                    left = hashed
                    hashing.add_done_callback(lambda _: self._uploads.release(left))
        return sent, "" if whole is None else whole.hexdigest()

    async def _send(
        self,
        s: StreamState,
        upload_id: str,
        chunk: Chunk,
        sent: dict[int, Sent],
        limit: asyncio.Semaphore,
        fence: Fence,
    ) -> None:
        try:
            sent[chunk.span.number] = await self._uploads.send_chunk(
                s, upload_id, chunk, "final", fence
            )
        finally:
            self._uploads.release(chunk)
            limit.release()
