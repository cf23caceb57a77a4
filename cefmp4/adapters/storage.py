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


class RemotePart(msgspec.Struct, frozen=True):
    number: int
    size: int
    etag: str  # without quotes


class RemoteUpload(msgspec.Struct, frozen=True):
    key: str
    upload_id: str
    initiated: datetime  # when the store created it (timezone-aware, UTC)


class ObjectInfo(msgspec.Struct, frozen=True):
    size: int
    etag: str


class ObjectStore(Protocol):
    bucket: str

    def waiting_while_blocked(self, blocked: Blocked) -> ObjectStore:
        """The same store, whose calls wait while the deployment is blocked."""
        ...

    async def ensure_bucket(self) -> None: ...

    async def create_multipart(self, key: str, content_type: str) -> str: ...

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: bytes, md5_b64: str
    ) -> str: ...

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
        self, key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> str: ...

    async def abort_multipart(self, key: str, upload_id: str) -> None: ...

    async def put_object(self, key: str, body: bytes, md5_b64: str, content_type: str) -> str: ...

    async def head_object(self, key: str) -> ObjectInfo | None: ...

    async def list_keys(self, prefix: str, start_after: str = "") -> list[str]:
        """Every object key under ``prefix`` that sorts after ``start_after``,
        ascending (S3's order: UTF-8 bytes), across as many pages as it takes."""
        ...

    async def get_object(self, key: str) -> bytes | None:
        """The object's whole body; None if there is no object at ``key``."""
        ...
