"""The object store, as the rest of CefMP4 sees it.

A hand-written, narrow interface listing only the S3 calls the service makes,
so that a second backend (or a fault-injecting wrapper in a test) has little to
implement and one contract test suite (``tests/test_storage_contract.py``) can
pin the behaviour we rely on. Implementations raise only the project's error
tree: ``TransientError`` (retry), ``DeploymentBlocked`` (unless waited out),
``NoSuchUpload``, ``PermanentError``.

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
    checksum: str = ""  # tagged (checksums.tag), when the store reports one


class RemoteUpload(msgspec.Struct, frozen=True):
    key: str
    upload_id: str
    initiated: datetime  # when the store created it (timezone-aware, UTC)


class ObjectInfo(msgspec.Struct, frozen=True):
    size: int
    etag: str
    checksum: str = ""  # the object's tagged CRC, when the store reports one
    checksum_type: str = ""  # FULL_OBJECT or COMPOSITE, when reported


class ObjectStore(Protocol):
    bucket: str

    def waiting_while_blocked(self, blocked: Blocked) -> ObjectStore:
        """The same store, whose calls wait while the deployment is blocked."""
        ...

    async def ensure_bucket(self) -> None: ...

    async def create_multipart(
        self, key: str, content_type: str, *, checksum: Crc | None = None
    ) -> str:
        """With ``checksum``, an upload whose object gets that CRC as a
        FULL_OBJECT checksum: every part must then carry one of its kind."""
        ...

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: Bytes, md5_b64: str, *,
        checksum: str = "",
    ) -> str:  # fmt: skip
        """``md5_b64`` "" sends no Content-MD5; ``checksum`` (tagged) is sent
        for the store to verify. Returns the part's ETag."""
        ...

    async def upload_part_copy(
        self, key: str, upload_id: str, number: int, source_key: str, offset: int, size: int
    ) -> str:
        """Part ``number`` of the upload becomes bytes ``[offset, offset + size)``
        of the object ``source_key`` in the same bucket, copied inside the store
        (UploadPartCopy: the bytes do not cross the network). Returns the part's
        ETag, the one ``list_parts`` reports and completion needs; unlike
        ``upload_part``'s it need not be the MD5 of the bytes (SeaweedFS returns
        an ETag of its own chunks), so callers record the MD5 they know. Raises
        like ``upload_part``; a missing source object is a ``PermanentError``
        with reason ``s3_nosuchkey``, a range outside it another
        ``PermanentError``."""
        ...

    async def list_parts(self, key: str, upload_id: str) -> list[RemotePart]: ...

    async def list_uploads(self, prefix: str) -> list[RemoteUpload]: ...

    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[tuple[int, str]], *,
        part_checksums: dict[int, str] | None = None, checksum: str = "",
    ) -> str:  # fmt: skip
        """``part_checksums`` (tagged, by part number) and ``checksum`` (the
        object's FULL_OBJECT CRC, which the store verifies) for an upload
        created with a ``checksum``."""
        ...

    async def abort_multipart(self, key: str, upload_id: str) -> None: ...

    async def put_object(
        self, key: str, body: Bytes, md5_b64: str, content_type: str, *, checksum: str = ""
    ) -> str: ...

    async def probe_checksum(self, algorithm: Crc, scratch_key: str) -> str | None:
        """None when the store verifies ``algorithm`` end to end (a FULL_OBJECT
        multipart upload at ``scratch_key``: a part with a wrong checksum is
        rejected, the right one and the combined object checksum accepted);
        else why not. Leaves nothing behind. Outages raise as usual."""
        ...

    async def head_object(self, key: str) -> ObjectInfo | None: ...

    async def list_keys(self, prefix: str, start_after: str = "") -> list[str]:
        """Every object key under ``prefix`` that sorts after ``start_after``,
        ascending (S3's order: UTF-8 bytes), across as many pages as it takes."""
        ...

    async def get_object(self, key: str) -> bytes | None:
        """The object's whole body; None if there is no object at ``key``."""
        ...
