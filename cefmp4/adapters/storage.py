"""The object store, as the rest of CefMP4 sees it.

A hand-written, narrow interface listing only the S3 calls the service makes,
so that a second backend (or a fault-injecting wrapper in a test) has little to
implement and one contract suite (``tests/contracts/storage.py``, run by
``tests/test_storage_contract.py`` against ``S3Store`` and ``MemoryStore``)
pins the behaviour we rely on. Each method's docstring is its contract.

Errors, for every method: implementations raise only the project's tree
(``cefmp4.domain.errors``). ``TransientError`` once their own retries are used
up (S3Store: network errors, timeouts, 5xx, SlowDown); ``DeploymentBlocked``
for credentials, permissions, clock skew or a missing bucket, unless the store
came from :meth:`ObjectStore.waiting_while_blocked`, whose calls wait instead;
``NoSuchUpload`` and ``NoSuchKey`` where a method says so; ``PermanentError``
(``reason="s3_rejected"`` with the S3 code in the message, unless a method
says otherwise) for any other refusal. A missing object is not an error for
the reading methods: they answer None.

"Idempotent" below means: calling again with the same arguments after a
success (or after a failure whose answer was lost) leaves the store as one
call would. Where real stores differ, the docstring says which way each goes;
callers must accept both.

The store is the source of truth for what is uploaded; the log's record of
parts is a cache that a reconcile re-derives from ``list_parts`` after a crash.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

import msgspec

from cefmp4.adapters.blocked import Blocked
from cefmp4.adapters.checksums import Bytes, Crc


class RemotePart(msgspec.Struct, frozen=True):
    number: int
    size: int
    etag: str  # without quotes
    checksum: str = ""  # tagged CRC (checksums.tag), when the store lists one


class RemoteUpload(msgspec.Struct, frozen=True):
    key: str
    upload_id: str
    initiated: datetime  # when the store created it (timezone-aware, UTC)


class ObjectInfo(msgspec.Struct, frozen=True):
    size: int
    etag: str
    checksum: str = ""  # the object's tagged full-object CRC, when the store reports one
    checksum_type: str = ""  # FULL_OBJECT or COMPOSITE, when reported


class ObjectStore(Protocol):
    bucket: str

    def waiting_while_blocked(self, blocked: Blocked) -> ObjectStore:
        """The same store (same bucket, same objects), whose calls wait while
        the deployment is blocked instead of raising ``DeploymentBlocked``.
        No I/O; the original store is unchanged."""
        ...

    async def ensure_bucket(self) -> None:
        """Create ``bucket`` unless it exists; idempotent, and an existing
        bucket keeps its objects. Raises ``DeploymentBlocked`` (e.g. 403 on
        HeadBucket) and ``TransientError`` like every method."""
        ...

    async def create_multipart(
        self, key: str, content_type: str, *, checksum: Crc | None = None
    ) -> str:
        """Start a multipart upload of ``key``; returns its upload id. With
        ``checksum`` the object gets that CRC as its FULL_OBJECT checksum:
        every part must then carry one of its kind (``upload_part``).

        Not idempotent: every call starts another upload, even of the same
        key (a retried call whose answer was lost leaves one behind, which
        ``consumers.uploads.Uploads.create`` aborts). Nothing is visible under
        ``key`` (``head_object``, ``list_keys``) until completion."""
        ...

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: Bytes, md5_b64: str, *,
        checksum: str = "", payload_sha256: str = "",
    ) -> str:  # fmt: skip
        """Store ``body`` as part ``number`` (1..10,000) of the upload; returns
        its ETag, which is the MD5 hex of ``body`` (without quotes) whichever
        checksum was sent (S3 unencrypted/SSE-S3, SeaweedFS, JuiceFS).

        ``md5_b64`` "" sends no Content-MD5; ``checksum`` (tagged CRC,
        ``checksums.tag``) is sent as ``x-amz-checksum-*`` and verified by
        the store like Content-MD5 (BadDigest). ``payload_sha256`` (hex, ""
        for none) is signed as the body's SHA-256 (SigV4
        ``x-amz-content-sha256``) instead of UNSIGNED-PAYLOAD; a store that
        ``probe_signed_payload`` passed refuses a body that does not match it
        (XAmzContentSHA256Mismatch, like BadDigest).

        Idempotent: a part sent again under the same number replaces the
        earlier one (completion uses the newest; SeaweedFS's ``list_parts``
        reports the earlier one as well). ``md5_b64`` is sent as Content-MD5:
        bytes damaged on the way are refused, ``PermanentError`` with
        ``BadDigest`` (``InvalidDigest`` for a value that is no MD5).
        Raises ``NoSuchUpload`` when ``upload_id`` is unknown, completed or
        aborted (or, on stores that check it, not an upload of ``key``:
        JuiceFS accepts the part). A part number outside 1..10,000 is a
        ``PermanentError`` (SeaweedFS: reason ``s3_invalid_part``; JuiceFS
        takes part 0). The size rule applies at completion, not here."""
        ...

    async def upload_part_copy(
        self, key: str, upload_id: str, number: int, source_key: str, offset: int, size: int
    ) -> str:
        """Part ``number`` of the upload becomes bytes ``[offset, offset + size)``
        of the object ``source_key`` in the same bucket, copied inside the store
        (UploadPartCopy: the bytes do not cross the network). Returns the part's
        ETag, the one ``list_parts`` reports and completion needs; unlike
        ``upload_part``'s it need not be the MD5 of the bytes (SeaweedFS returns
        an ETag of its own chunks), so callers record the MD5 they know.

        Idempotent like ``upload_part`` (the part is replaced). Raises like
        ``upload_part`` (``NoSuchUpload`` for a gone upload); a missing source
        object is ``NoSuchKey`` (a ``PermanentError``, reason ``s3_rejected``),
        a range not inside it another ``PermanentError`` (InvalidRange; JuiceFS
        InvalidArgument). ``size < 1`` is a ``ValueError``, raised before any
        request."""
        ...

    async def list_parts(self, key: str, upload_id: str) -> list[RemotePart]:
        """The parts the store holds for the upload, ascending by number,
        across as many pages as it takes; ``[]`` for an upload with none.
        A part sent twice may be listed twice on SeaweedFS (older first).
        Raises ``NoSuchUpload`` when the upload is unknown, completed or
        aborted. Reads only."""
        ...

    async def list_uploads(self, prefix: str) -> list[RemoteUpload]:
        """The multipart uploads in progress (neither completed nor aborted)
        whose key starts with ``prefix``, ascending by key, across as many
        pages as it takes; several uploads of one key are all listed (their
        order among themselves is not promised). ``initiated`` is timezone-
        aware UTC. ``[]`` when there are none. Reads only."""
        ...

    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[tuple[int, str]], *,
        part_checksums: dict[int, str] | None = None, checksum: str = "",
    ) -> str:  # fmt: skip
        """Join ``parts`` ((number, ETag) pairs, ascending) into the object
        ``key``, replacing any object there; returns the object's ETag:
        ``checksums.multipart_etag`` of the part ETags when they are MD5s.
        The upload is then gone. For an upload created with a ``checksum``:
        ``part_checksums`` (tagged, by number) name the parts too, and
        ``checksum`` is the object's FULL_OBJECT CRC, which the store verifies
        (a mismatch is a ``PermanentError``, BadDigest).

        Refusals leave the upload open as it was, and are ``PermanentError``:
        a named part the store lacks or holds under another ETag, reason
        ``s3_invalid_part`` (the finalizer's cue to list parts again);
        numbers not ascending (InvalidPartOrder) or a part but the last below
        5 MiB (EntityTooSmall; JuiceFS allows it), reason ``s3_rejected``.
        ``parts`` must not be empty (what stores answer differs).

        Not idempotent: completing a completed upload raises ``NoSuchUpload``
        (S3, JuiceFS, MemoryStore; the finalizer then recognises its object
        with ``head_object``) or returns the same ETag again (SeaweedFS).
        ``NoSuchUpload`` too for an unknown or aborted upload."""
        ...

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """End the upload without an object and drop its parts; afterwards
        every call on it raises ``NoSuchUpload`` and ``list_uploads`` omits it.

        Idempotent in effect, not in answer: aborting an upload that is gone
        already (aborted or completed) raises ``NoSuchUpload`` (S3, JuiceFS,
        MemoryStore) or does nothing (SeaweedFS), so callers that only want
        it gone suppress ``NoSuchUpload``. An unknown id is ``NoSuchUpload``.
        A completed object is not touched."""
        ...

    async def put_object(
        self, key: str, body: Bytes, md5_b64: str, content_type: str, *, checksum: str = "",
        payload_sha256: str = "",
    ) -> str:  # fmt: skip
        """Store ``body`` (may be empty) as the object ``key`` in one request,
        replacing any object there; returns its ETag, the MD5 hex of ``body``.
        Idempotent. Content-MD5 (unless ``md5_b64`` is ""), ``checksum`` and
        ``payload_sha256`` are checked as for ``upload_part`` (``PermanentError``,
        BadDigest / InvalidDigest; nothing is stored)."""
        ...

    async def probe_checksum(self, algorithm: Crc, scratch_key: str) -> str | None:
        """None when the store verifies ``algorithm`` end to end: a FULL_OBJECT
        multipart upload at ``scratch_key`` where a part with a wrong checksum
        is refused, the right one and the combined object checksum accepted,
        and ``head_object`` reports it; else why not (``S3_CHECKSUM=auto``
        then tries the next, and falls back to MD5). Leaves nothing behind,
        even after a lost answer. Outages raise as for any call."""
        ...

    async def clear_scratch(self, prefix: str) -> int:
        """Delete every object and abort every upload whose key starts with
        ``prefix`` (a probe's scratch keys: a process killed between a probe's
        write and its cleanup leaves them); returns how many went. Idempotent:
        something already gone is not an error. Nothing outside ``prefix`` is
        touched."""
        ...

    async def probe_signed_payload(self, scratch_key: str) -> str | None:
        """None when the store verifies a signed payload's SHA-256: a
        ``put_object`` at ``scratch_key`` whose bytes differ from the signed
        ``payload_sha256`` is refused and the right one accepted (the JuiceFS
        gateway does; SeaweedFS takes either); else why not. Leaves nothing
        behind. Outages raise as for any call."""
        ...

    async def head_object(self, key: str) -> ObjectInfo | None:
        """The object's size and ETag (as ``put_object`` or
        ``complete_multipart`` returned it), and its full-object CRC where the
        store reports one (``checksum``, tagged; "" otherwise); None if there
        is no object at ``key`` (an upload in progress is no object). Reads only."""
        ...

    async def list_keys(self, prefix: str, start_after: str = "") -> list[str]:
        """Every object key under ``prefix`` that sorts after ``start_after``
        (which need not exist), ascending (S3's order: UTF-8 bytes), across as
        many pages as it takes; ``[]`` when there are none. Uploads in
        progress are not objects. Reads only."""
        ...

    async def get_object(self, key: str) -> bytes | None:
        """The object's whole body (``b""`` for an empty object); None if
        there is no object at ``key``. Reads only; a body cut off while being
        read is read again (S3Store), never returned short."""
        ...
