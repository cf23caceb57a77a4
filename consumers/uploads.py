"""Multipart mechanics shared by the uploader and the finalizer.

Every method is idempotent against the log *and* the store, because a message
may be handled twice and a process may die between any two steps:

* ``ensure_upload`` adopts a multipart upload that exists in the store but not
  in the log (crash after CreateMultipartUpload, before ``UploadStarted``)
  instead of creating a second one, and aborts any extra.
* ``reconcile`` runs once per stream per process: parts the store has but the
  log lacks are checked against the file (the CRC the store lists, else MD5 =
  ETag) and recorded, or left to be sent again. The store is the truth; the
  log's parts are its cache.
* ``send`` reads, checksums and uploads parts, ``PART_CONCURRENCY`` at a time
  per stream, each read with ``preadv`` into a reused buffer (``read``);
  memory is bounded by the parts in flight. The checksum is the one
  ``S3_CHECKSUM`` resolves to (``algorithm``: probed once per process for
  ``auto``), except that an upload keeps the kind its recorded parts have. A part of a continuation
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
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import msgspec
import structlog

from cefmp4.adapters import checksums, files
from cefmp4.adapters.checksums import Algorithm, Mode, md5_of
from cefmp4.adapters.leases import Fence
from cefmp4.adapters.storage import ObjectStore
from cefmp4.domain.errors import NoSuchKey, NoSuchUpload, PermanentError, StreamEnded
from cefmp4.domain.events import Continues, FailReason, PartUploaded, StreamFailed, UploadStarted
from cefmp4.domain.filerules import FileStat
from cefmp4.domain.partplan import PartPlan, Span, max_object_size, part_offset, part_size
from consumers.deps import Deps
from projections.streams import Part, StreamState

log = structlog.get_logger(__name__)
CONTENT_TYPE = "video/mp4"

# A part read this long after the file's last change is recorded with the
# file's stat (PartUploaded.file_size/file_mtime_ns): a later write would move
# the mtime past it, whatever the file system's timestamp granularity (FAT's
# is 2 s). Wall clock against the file's mtime: a file server whose clock is
# behind by more than this could hide a write made just after the read.
QUIET_NS = 3_000_000_000

# The start of every checksum probe's scratch key, after S3_KEY_PREFIX (never
# a stream's key: those are "<prefix><stream id>/...").
PROBE_MARK = ".cefmp4-probe-"


async def resolve_checksum(
    store: ObjectStore, mode: Mode, scratch_prefix: str
) -> tuple[Algorithm, list[str]]:
    """The algorithm ``S3_CHECKSUM`` means against ``store``, and for ``auto``
    why each CRC it tried was refused: a forced mode is taken as is (a store
    that refuses it fails the uploads, loudly), ``auto`` takes the first CRC
    the store verifies end to end, else the signed SHA-256 if the store
    verifies that, else MD5. A forced sha256 is probed too, since a store
    that does not check signed payloads takes the parts unverified instead
    of refusing them: why goes in the list, for a warning.

    First it clears what earlier probes left under their scratch prefix: a
    process killed between a probe's write and its cleanup leaves an object
    or an upload there that nothing else would ever remove. (A replica
    probing at the same moment may see its probe object vanish; that probe
    then reports a failure and it takes the next checksum that verifies, a
    cost, never a wrong check.)"""
    scratch = f"{scratch_prefix}{PROBE_MARK}"
    cleared = await store.clear_scratch(scratch)
    if cleared:
        log.info("removed what an earlier checksum probe left", prefix=scratch, count=cleared)
    if mode == "sha256":
        why = await store.probe_signed_payload(f"{scratch}{uuid.uuid4().hex}")
        return mode, [] if why is None else [f"sha256: {why}"]
    if mode != "auto":
        return mode, []
    refused: list[str] = []
    for crc in checksums.CRCS:
        why = await store.probe_checksum(crc, f"{scratch}{uuid.uuid4().hex}")
        if why is None:
            return crc, refused
        refused.append(f"{crc}: {why}")
    why = await store.probe_signed_payload(f"{scratch}{uuid.uuid4().hex}")
    if why is None:
        return "sha256", refused
    refused.append(f"sha256: {why}")
    return "md5", refused


def upload_algorithm(parts: Iterable[Part], resolved: Algorithm) -> Algorithm:
    """What the parts of an existing upload are sent with: the kind its
    recorded parts have (S3 fixes it when the upload is created; parts from
    before S3_CHECKSUM carry none, so MD5), else what the process resolved."""
    for p in parts:
        found = checksums.untag(p.checksum)
        if found is not None:
            return found[0]
        return resolved if not checksums.is_crc(resolved) else "md5"
    return resolved


@dataclass
class Chunk:
    """A part's bytes in a lent buffer, with what reading them told."""

    span: Span
    buffer: bytearray
    data: memoryview  # the span's bytes, the start of ``buffer``
    algorithm: Algorithm  # the upload's: what a send of these bytes must carry
    crc: str  # tagged CRC, in every mode: the algorithm's, else a local CRC64NVME
    md5_hex: str  # "" unless asked for (``Uploads.send_chunk`` fills it when needed)
    md5_b64: str
    quiet: FileStat | None  # the stat after the read, if the file was quiet before
    sha256_hex: str = ""  # sha256 mode: what a send signs (filled like ``md5_hex``)
    users: int = 1  # ``Uploads.release`` hands the buffer back when the last one is done

    @property
    def checksum(self) -> str:
        """The tagged CRC sent with the part; "" unless the algorithm is one."""
        return self.crc if checksums.as_crc(self.algorithm) else ""

    @property
    def local_crc(self) -> str:
        """The CRC only this side knows (``PartUploaded.crc``): "" when it was sent."""
        return "" if self.checksum else self.crc


def _read_and_digest(
    path: str, inode: int, span: Span, buffer: bytearray, algorithm: Algorithm, md5: bool,
    sha256: bool,
) -> Chunk:  # fmt: skip
    started_ns = time.time_ns()
    data = memoryview(buffer)[: span.size]
    after = files.read_into(path, span.offset, data).after
    sent_crc = checksums.as_crc(algorithm)
    # A CRC in every mode (~20 GB/s): what a later re-read of these bytes is
    # compared with, where the store verifies only an MD5 or nothing.
    crc = checksums.checksum_of(sent_crc or "crc64nvme", data)
    md5_hex, md5_b64 = md5_of(data) if md5 else ("", "")
    sha256_hex = checksums.sha256_hex(data) if sha256 else ""
    still = after.inode == inode and after.mtime_ns < started_ns - QUIET_NS
    quiet = after if still else None
    return Chunk(span, buffer, data, algorithm, crc, md5_hex, md5_b64, quiet, sha256_hex)


@contextmanager
def first_failure() -> Iterator[None]:
    """Unwrap a TaskGroup's ExceptionGroup: callers decide on the kind of
    failure (NoSuchUpload, FileGone, ...); the first one is the cause and the
    other tasks were cancelled because of it."""
    try:
        yield
    except BaseExceptionGroup as group_error:
        raise group_error.exceptions[0] from None


def check_size(size: int, plan: PartPlan) -> None:
    """Raise ``StreamEnded("too_large")`` for a file that can never be one
    object, before a byte of it is read (the uploader and the finalizer both ask)."""
    limit = max_object_size(plan)
    if size > limit:
        raise StreamEnded("too_large", f"{size} bytes exceed the object size limit {limit}")


def matches(part: Part | None, span: Span) -> bool:
    """A recorded part stands for ``span`` only if it covers the same bytes."""
    return part is not None and part.offset == span.offset and part.size == span.size


def unchanged_in(continues: Continues | None, span: Span, md5_hex: str) -> bool:
    """Whether the continued object holds exactly these bytes as the same part:
    same span under its own plan (so a continuation cut differently copies
    nothing) and the MD5 it recorded for that part equals the local bytes'.
    The recorded MD5s are what the finalizer verified against the file before
    it completed that object, so this proves the copy without reading it."""
    if continues is None or continues.part_size < 1:
        return False
    if not 1 <= span.number <= len(continues.part_md5s):
        return False
    plan = continues.plan()
    offset = part_offset(span.number, plan)
    size = min(part_size(span.number, plan), continues.size - offset)
    same_span = (offset, size) == (span.offset, span.size)
    return same_span and continues.part_md5s[span.number - 1] == md5_hex


class Sent(msgspec.Struct, frozen=True):
    """A part as the store now holds it: completion names it by these."""

    etag: str
    checksum: str = ""  # tagged CRC, "" in md5/none mode


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
        # Idle buffers kept while parts move: a stream's parts in flight plus
        # the one a finalizer reads ahead with; at most MAX_PARTS_IN_FLIGHT
        # lent at once, across every stream and both groups.
        self.buffers = files.Buffers(
            deps.config.part_concurrency + 1, limit=deps.config.max_parts_in_flight
        )
        self._algorithm: Algorithm | None = None
        self._resolving = asyncio.Lock()

    async def algorithm(self) -> Algorithm:
        """``S3_CHECKSUM`` resolved against the store, once per process."""
        async with self._resolving:
            if self._algorithm is None:
                config = self._deps.config
                chosen, refused = await resolve_checksum(
                    self._deps.store, config.s3_checksum, config.s3_key_prefix
                )
                if config.s3_checksum == "sha256" and refused:
                    log.warning(
                        "checksum not verified by the store: parts go unchecked in transit",
                        mode=config.s3_checksum, refused=refused, hint="S3_CHECKSUM=auto",
                    )  # fmt: skip
                else:
                    log.info("checksum", mode=config.s3_checksum, algorithm=chosen, refused=refused)
                self._algorithm = chosen
            return self._algorithm

    async def algorithm_of(self, s: StreamState, upload_id: str) -> Algorithm:
        """The checksum kind of ``upload_id``'s parts (``upload_algorithm``);
        an upload the state does not know yet was created just now, with the
        resolved one."""
        resolved = await self.algorithm()
        parts = s.parts.values() if upload_id == s.upload_id else ()
        return upload_algorithm(parts, resolved)

    async def read(
        self, s: StreamState, span: Span, algorithm: Algorithm, *, send: bool, md5: bool = False
    ) -> Chunk:
        """Read ``span`` into a lent buffer with its CRC; hand it back with
        ``release``. ``send``: the read is for sending, so the digest
        ``algorithm`` sends comes with it (md5 mode's MD5, sha256 mode's
        signed SHA-256), hashed in the reading thread. A read only to compare
        (``send=False``) skips it: ``send_chunk`` computes it if the bytes
        turn out to need sending after all. ``md5``: the MD5 too, whatever the
        mode, to compare with a recorded part's MD5 or the store's ETag."""
        buffer = await self.buffers.take(span.size)
        want_md5 = md5 or (send and algorithm == "md5")
        want_sha256 = send and algorithm == "sha256"
        work = asyncio.ensure_future(
            asyncio.to_thread(
                _read_and_digest, s.path, s.inode, span, buffer, algorithm, want_md5, want_sha256
            )
        )
        try:
            return await asyncio.shield(work)
        except BaseException:
            # Cancelling the await does not stop the thread: the buffer is
            # lent again only once nothing can still write into it.
            work.add_done_callback(lambda done: self._give_after(done, buffer))
            raise

    def _give_after(self, done: asyncio.Future[Chunk], buffer: bytearray) -> None:
        if not done.cancelled():
            done.exception()  # retrieved: the caller already has its own error
        self.buffers.give(buffer)

    def release(self, chunk: Chunk) -> None:
        """One user is done with ``chunk``; after the last nothing may use
        ``chunk.data``, its buffer is lent again."""
        chunk.users -= 1
        if chunk.users == 0:
            self.buffers.give(chunk.buffer)

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
        algorithm = await self.algorithm()  # resolved at start; first, so the check is fresh
        await fence.lease.check()
        upload_id = await self._deps.store.create_multipart(
            s.key, CONTENT_TYPE, checksum=checksums.as_crc(algorithm)
        )
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
        algorithm = await self.algorithm_of(s, upload_id)
        for rp in remote:
            known = parts.get(rp.number)
            if known is not None and known.etag == rp.etag:
                continue
            if known is not None:
                del parts[rp.number]  # the log's part was replaced by a later send
            offset = part_offset(rp.number, self._deps.plan_of(s))
            if offset + rp.size > file_size:
                continue
            span = Span(rp.number, offset, rp.size)
            # Like with like: the store's CRC if it lists one, else its MD5 ETag.
            listed = checksums.untag(rp.checksum)
            chunk = await self.read(s, span, algorithm, send=False, md5=listed is None)
            try:
                same = (
                    chunk.checksum == rp.checksum if listed is not None
                    else chunk.md5_hex == rp.etag
                )  # fmt: skip
                if not same:
                    continue  # stale bytes in the store: this part will be sent again
                md5_hex = chunk.md5_hex or self._md5_from(rp.etag)
                event = await self._record_part(
                    s, upload_id, span, rp.etag, md5_hex, fence, checksum=chunk.checksum,
                    quiet=chunk.quiet, crc=chunk.local_crc,
                )  # fmt: skip
            finally:
                self.release(chunk)
            parts[rp.number] = Part(
                rp.number, offset, rp.size, rp.etag, md5_hex, event.at, checksum=event.checksum,
                file_size=event.file_size, file_mtime_ns=event.file_mtime_ns, crc=event.crc,
            )  # fmt: skip
            log.info("adopted part found in store", stream_id=s.stream_id, part=rp.number)
        self._reconciled.add((s.stream_id, upload_id))
        return parts

    def forget(self, s: StreamState) -> None:
        """Reconcile again on next use: the store disagreed with us."""
        self._reconciled = {k for k in self._reconciled if k[0] != s.stream_id}

    @staticmethod
    def _md5_from(etag: str) -> str:
        """The part MD5 the store's ETag states ("" when it is not one)."""
        return etag if checksums.looks_like_md5(etag) else ""

    async def send(
        self,
        s: StreamState,
        upload_id: str,
        spans: Iterable[Span],
        why: str,
        fence: Fence,
        *,
        give_way: Callable[[], Awaitable[bool]] | None = None,
    ) -> dict[int, Sent]:
        """Upload ``spans`` concurrently; returns part number -> what was sent.

        ``give_way`` is asked before each part; once it says yes the remaining
        parts are left (to the finalizer, which reads each byte only once).
        """
        limit = asyncio.Semaphore(self._deps.config.part_concurrency)
        sent: dict[int, Sent] = {}
        algorithm = await self.algorithm_of(s, upload_id)

        async def one(span: Span) -> None:
            async with limit:
                if give_way is not None and await give_way():
                    return
                # The digests a send needs, in the reading thread: the MD5 too
                # when a continuation may copy the part instead.
                chunk = await self.read(s, span, algorithm, send=True, md5=bool(s.continues))
                try:
                    sent[span.number] = await self.send_chunk(s, upload_id, chunk, why, fence)
                finally:
                    self.release(chunk)

        with first_failure():
            async with asyncio.TaskGroup() as group:
                for span in spans:
                    group.create_task(one(span))
        return sent

    async def send_chunk(
        self, s: StreamState, upload_id: str, chunk: Chunk, why: str, fence: Fence
    ) -> Sent:
        """Send a part read by ``read`` (with the upload's algorithm; with the
        MD5 too when the stream continues an object), or copy it from the
        continued object when that holds these very bytes."""
        span = chunk.span
        if chunk.algorithm == "md5" and not chunk.md5_b64:
            # Read only to compare (the finalizer), then found changed: the
            # Content-MD5 the store checks is computed now.
            chunk.md5_hex, chunk.md5_b64 = await asyncio.to_thread(md5_of, chunk.data)
        if chunk.algorithm == "sha256" and not chunk.sha256_hex:
            chunk.sha256_hex = await asyncio.to_thread(checksums.sha256_hex, chunk.data)
        if chunk.md5_hex:
            copied = await self.copy_unchanged(
                s, upload_id, span, chunk.md5_hex, fence, checksum=chunk.checksum
            )
            if copied is not None:
                return Sent(copied, chunk.checksum)
        etag = await self._deps.store.upload_part(
            s.key, upload_id, span.number, chunk.data, chunk.md5_b64 if not chunk.checksum else "",
            checksum=chunk.checksum, payload_sha256=chunk.sha256_hex,
        )  # fmt: skip
        md5_hex = chunk.md5_hex or self._md5_from(etag)
        if not md5_hex:
            # A store whose ETags are not MD5s (SSE-KMS): the MD5 the log keeps
            # for continuations and adoption is computed here after all.
            md5_hex, _ = await asyncio.to_thread(md5_of, chunk.data)
        await self._record_part(
            s, upload_id, span, etag, md5_hex, fence, checksum=chunk.checksum, quiet=chunk.quiet,
            crc=chunk.local_crc,
        )  # fmt: skip
        self._deps.metrics.uploaded(why, span.size, self._deps.now())
        return Sent(etag, chunk.checksum)

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
        checksum: str = "",
        quiet: FileStat | None = None,
        crc: str = "",
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
            checksum=checksum,
            file_size=None if quiet is None else quiet.size,
            file_mtime_ns=None if quiet is None else quiet.mtime_ns,
            crc=crc,
        )
        await self._deps.emit(event, fence)
        return event

    async def copy_unchanged(
        self, s: StreamState, upload_id: str, span: Span, md5_hex: str, fence: Fence, *,
        checksum: str = "",
    ) -> str | None:  # fmt: skip
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
        await self._record_part(
            s, upload_id, span, etag, md5_hex, fence, copied=True, checksum=checksum
        )
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
