"""Multipart mechanics shared by the uploader and the finalizer.

Every method is idempotent against the log *and* the store, because a message
may be handled twice and a process may die between any two steps:

* ``ensure_upload`` adopts a multipart upload that exists in the store but not
  in the log (crash after CreateMultipartUpload, before ``UploadStarted``)
  instead of creating a second one, and aborts any extra.
* ``reconcile`` runs once per stream per process: parts the store has but the
  log lacks are checked against the file (MD5 = ETag) and recorded, or left to
  be sent again. The store is the truth; the log's parts are its cache.
* ``send`` reads, hashes and uploads parts, ``PART_CONCURRENCY`` at a time per
  stream; memory is bounded by the parts in flight. A part of a continuation
  (``StreamState.continues``) whose bytes the continued object already holds
  at the same span is copied inside the store instead (``copy_unchanged``):
  read and hashed locally, never sent.
* ``failer`` is the consumer supervisor's one way to end a stream: it aborts
  the upload (so nothing is left open), logs, records why and counts it.
  Handlers never fail a stream themselves; they raise (``StreamEnded`` and
  the other ``PermanentError`` kinds) and the supervisor calls it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager

import structlog

from cefmp4.adapters import files
from cefmp4.adapters.checksums import md5_of
from cefmp4.adapters.leases import Fence
from cefmp4.domain.errors import NoSuchKey, NoSuchUpload, PermanentError, StreamEnded
from cefmp4.domain.events import Continues, FailReason, PartUploaded, StreamFailed, UploadStarted
from cefmp4.domain.partplan import Span, max_object_size, part_offset, part_size
from consumers.deps import Deps
from projections.streams import Part, StreamState

log = structlog.get_logger(__name__)
CONTENT_TYPE = "video/mp4"


@contextmanager
def first_failure() -> Iterator[None]:
    """Unwrap a TaskGroup's ExceptionGroup: callers decide on the kind of
    failure (NoSuchUpload, FileGone, ...); the first one is the cause and the
    other tasks were cancelled because of it."""
    try:
        yield
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None


def check_size(size: int, chunk: int) -> None:
    """Raise ``StreamEnded("too_large")`` for a file that can never be one
    object, before a byte of it is read (the uploader and the finalizer both ask)."""
    limit = max_object_size(chunk)
    if size > limit:
        raise StreamEnded("too_large", f"{size} bytes exceed the object size limit {limit}")


def matches(part: Part | None, span: Span) -> bool:
    """A recorded part stands for ``span`` only if it covers the same bytes."""
    return part is not None and part.offset == span.offset and part.size == span.size


def unchanged_in(continues: Continues | None, span: Span, md5_hex: str) -> bool:
    """Whether the continued object holds exactly these bytes as the same part:
    same span under its own plan (so a changed CHUNK_SIZE_BYTES copies
    nothing) and the MD5 it recorded for that part equals the local bytes'.
    The recorded MD5s are what the finalizer verified against the file before
    it completed that object, so this proves the copy without reading it."""
    if continues is None or continues.part_size < 1:
        return False
    if not 1 <= span.number <= len(continues.part_md5s):
        return False
    offset = part_offset(span.number, continues.part_size)
    size = min(part_size(span.number, continues.part_size), continues.size - offset)
    same_span = (offset, size) == (span.offset, span.size)
    return same_span and continues.part_md5s[span.number - 1] == md5_hex


class Uploads:
    """The multipart mechanics the uploader and the finalizer share (see the
    module docstring); one per process, since it remembers which uploads were
    reconciled.

    :param deps: config, store, projection, stream leases and metrics.
    """

    def __init__(self, deps: Deps) -> None:
        self._deps = deps
        self._reconciled: set[tuple[str, str]] = set()
        self._streams = asyncio.Semaphore(deps.config.max_concurrent_streams)

    @property
    def stream_slots(self) -> asyncio.Semaphore:
        """At most MAX_CONCURRENT_STREAMS streams move bytes at once."""
        return self._streams

    @asynccontextmanager
    async def leased(self, stream_id: str) -> AsyncIterator[tuple[StreamState, Fence] | None]:
        """Hold the stream's lease (``StreamLeases.hold``) and yield its current
        state and Fence, or None when there is nothing to do (unknown or
        ended). Raises ``StreamEnded`` when the watcher reported it gone from
        disk, whichever group notices: the supervisor then aborts the upload
        and records the end."""
        async with self._deps.stream_leases.hold(stream_id) as fence:
            s = (await self._deps.projection.catch_up()).streams.get(stream_id)
            if s is not None and not s.terminal and s.gone is not None:
                raise StreamEnded(s.gone, f"{s.path} {s.gone}")
            if s is None or s.terminal:
                yield None
            else:
                yield s, fence

    async def ensure_upload(self, s: StreamState, fence: Fence) -> str:
        if s.upload_id is not None:
            return s.upload_id
        store = self._deps.store
        mine = [u for u in await store.list_uploads(s.key) if u.key == s.key]
        if mine:
            upload_id = mine[0].upload_id
            for extra in mine[1:]:
                await self._abort_quietly(s.key, extra.upload_id, fence)
            log.info("adopting multipart upload found in store", stream_id=s.stream_id)
        else:
            upload_id = await self.create(s, fence)
        await self._deps.emit(
            UploadStarted(stream_id=s.stream_id, at=self._deps.now(), upload_id=upload_id), fence
        )
        return upload_id

    async def create(self, s: StreamState, fence: Fence) -> str:
        """CreateMultipartUpload, leaving no second upload behind: a create
        whose answer was lost is retried and makes one; keys are per stream
        and we hold the stream, so any other upload of the key is an orphan.

        The lease is checked first, as before complete and abort: a replica
        that lost the stream (paused past its TTL) would otherwise open an
        upload that nobody records, which stays open until gc."""
        await fence.lease.check()
        upload_id = await self._deps.store.create_multipart(s.key, CONTENT_TYPE)
        for other in await self._deps.store.list_uploads(s.key):
            if other.key == s.key and other.upload_id != upload_id:
                await self._abort_quietly(s.key, other.upload_id, fence)
        return upload_id

    async def restart_upload(self, s: StreamState, fence: Fence) -> str:
        """The store lost our upload (lifecycle rule, abort by hand): start over."""
        log.warning("multipart upload vanished; starting a new one", stream_id=s.stream_id)
        upload_id = await self.create(s, fence)
        await self._deps.emit(
            UploadStarted(stream_id=s.stream_id, at=self._deps.now(), upload_id=upload_id), fence
        )
        return upload_id

    async def reconcile(
        self, s: StreamState, upload_id: str, file_size: int, fence: Fence
    ) -> dict[int, Part]:
        """Parts known for ``upload_id`` after checking the store, once per
        process (and again after :meth:`forget`). A part the log records but
        the store lacks is dropped, so it is sent again."""
        if (s.stream_id, upload_id) in self._reconciled:
            return s.parts
        remote = await self._deps.store.list_parts(s.key, upload_id)
        in_store = {rp.number for rp in remote}
        parts = {n: p for n, p in s.parts.items() if n in in_store}
        for rp in remote:
            known = parts.get(rp.number)
            if known is not None and known.etag == rp.etag:
                continue
            if known is not None:
                del parts[rp.number]  # the log's part was replaced by a later send
            offset = self._offset_of(rp.number)
            if offset + rp.size > file_size:
                continue
            data = await asyncio.to_thread(files.read_range, s.path, offset, rp.size)
            md5_hex, _ = await asyncio.to_thread(md5_of, data)
            if md5_hex != rp.etag:
                continue  # stale bytes in the store: this part will be sent again
            span = Span(rp.number, offset, rp.size)
            event = await self._record_part(s, upload_id, span, rp.etag, md5_hex, fence)
            parts[rp.number] = Part(rp.number, offset, rp.size, rp.etag, md5_hex, event.at)
            log.info("adopted part found in store", stream_id=s.stream_id, part=rp.number)
        self._reconciled.add((s.stream_id, upload_id))
        return parts

    def forget(self, s: StreamState) -> None:
        """Reconcile again on next use: the store disagreed with us."""
        self._reconciled = {k for k in self._reconciled if k[0] != s.stream_id}

    def _offset_of(self, number: int) -> int:
        return part_offset(number, self._deps.config.chunk_size_bytes)

    async def send(
        self,
        s: StreamState,
        upload_id: str,
        spans: Iterable[Span],
        why: str,
        fence: Fence,
        *,
        give_way: Callable[[], Awaitable[bool]] | None = None,
    ) -> dict[int, str]:
        """Upload ``spans`` concurrently; returns part number -> ETag of those sent.

        ``give_way`` is asked before each part; once it says yes the remaining
        parts are left (to the finalizer, which reads each byte only once).
        """
        limit = asyncio.Semaphore(self._deps.config.part_concurrency)
        etags: dict[int, str] = {}

        async def one(span: Span) -> None:
            async with limit:
                if give_way is not None and await give_way():
                    return
                data = await asyncio.to_thread(files.read_range, s.path, span.offset, span.size)
                etags[span.number] = await self.send_bytes(s, upload_id, span, data, why, fence)

        with first_failure():
            async with asyncio.TaskGroup() as group:
                for span in spans:
                    group.create_task(one(span))
        return etags

    async def send_bytes(
        self, s: StreamState, upload_id: str, span: Span, data: bytes, why: str, fence: Fence
    ) -> str:
        md5_hex, md5_b64 = await asyncio.to_thread(md5_of, data)
        copied = await self.copy_unchanged(s, upload_id, span, md5_hex, fence)
        if copied is not None:
            return copied
        etag = await self._deps.store.upload_part(s.key, upload_id, span.number, data, md5_b64)
        await self._record_part(s, upload_id, span, etag, md5_hex, fence)
        self._deps.metrics.uploaded(why, span.size, self._deps.now())
        return etag

    async def _record_part(
        self,
        s: StreamState,
        upload_id: str,
        span: Span,
        etag: str,
        md5_hex: str,
        fence: Fence,
        *,
        copied: bool = False,
    ) -> PartUploaded:
        """The fact that the store holds ``span`` as part ``span.number``."""
        event = PartUploaded(
            stream_id=s.stream_id,
            at=self._deps.now(),
            upload_id=upload_id,
            part_number=span.number,
            offset=span.offset,
            size=span.size,
            etag=etag,
            md5=md5_hex,
            copied=copied,
        )
        await self._deps.emit(event, fence)
        return event

    async def copy_unchanged(
        self, s: StreamState, upload_id: str, span: Span, md5_hex: str, fence: Fence
    ) -> str | None:
        """Copy the part from the continued object if it holds these very
        bytes (``unchanged_in``); its ETag, or None when the part must be sent.

        A continued object that is gone (deleted by hand, a lifecycle rule)
        only costs the optimisation: the part is sent. The MD5 recorded is the
        one of the local bytes; the store's ETag of a copy need not be one.
        """
        c = s.continues
        if c is None or not unchanged_in(c, span, md5_hex):
            return None
        store = self._deps.store
        try:
            etag = await store.upload_part_copy(
                s.key, upload_id, span.number, c.key, span.offset, span.size
            )
        except NoSuchKey:
            log.warning("continued object is gone; sending the part", key=c.key, part=span.number)
            return None
        await self._record_part(s, upload_id, span, etag, md5_hex, fence, copied=True)
        self._deps.metrics.parts.labels("copied").inc()
        self._deps.metrics.bytes_copied.inc(span.size)
        return etag

    async def abort(self, s: StreamState, fence: Fence) -> None:
        """Abort the stream's upload, if any, so nothing is left open."""
        if s.upload_id is not None:
            await self._abort_quietly(s.key, s.upload_id, fence)

    async def _abort_quietly(self, key: str, upload_id: str, fence: Fence) -> None:
        await fence.lease.check()  # a replica that lost the stream must not abort it
        try:
            await self._deps.store.abort_multipart(key, upload_id)
        except NoSuchUpload:
            pass  # already gone: the outcome we wanted
        except PermanentError as exc:
            # Left for `cefmp4 gc` / the bucket's lifecycle rule; the failure
            # event still goes out so the stream does not hang.
            log.error("abort failed; upload left for gc", key=key, error=str(exc))


# The recorder's doing, not a loss: logged at INFO; every other reason at ERROR.
EXPECTED_ENDS: frozenset[FailReason] = frozenset({"deleted", "truncated"})


def failer(deps: Deps, uploads: Uploads) -> Callable[[str, FailReason, str], Awaitable[None]]:
    """The consumer supervisor's one way to end a stream without an object:
    abort its upload, log, append ``StreamFailed`` and count it."""

    async def fail(stream_id: str, reason: FailReason, detail: str) -> None:
        event = StreamFailed(stream_id=stream_id, at=deps.now(), reason=reason, detail=detail)
        async with deps.stream_leases.hold(stream_id) as fence:
            s = (await deps.projection.catch_up()).streams.get(stream_id)
            say = log.info if reason in EXPECTED_ENDS else log.error
            if s is not None and not s.terminal:
                await uploads.abort(s, fence)
                say("stream failed", stream_id=stream_id, path=s.path, reason=reason,
                    detail=detail)  # fmt: skip
                await deps.emit(event, fence)
                deps.metrics.failed.labels(reason).inc()
                return
        # Terminal already (e.g. the sidecar of a completed stream failed): the
        # event still records why; the fold keeps the completion. Not counted
        # as a failed stream: its object may well exist.
        say("failure after the stream ended", stream_id=stream_id, reason=reason, detail=detail)
        await deps.emit(event)

    return fail
