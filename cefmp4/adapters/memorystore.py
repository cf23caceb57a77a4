"""An :class:`~cefmp4.adapters.storage.ObjectStore` in memory, for fast tests.

It keeps S3's rules where the service could break them: Content-MD5 is
checked, part numbers are 1..10,000, non-last parts must be at least 5 MiB at
completion, a part's ETag is its MD5 and a completed object's the multipart
ETag (``checksums.multipart_etag``), and an upload is gone (``NoSuchUpload``)
for every call once it was completed or aborted. Where real stores differ
(SeaweedFS completes or aborts a finished upload again without complaint)
it takes the strictest answer, so a handler that works here does not rely on
a lenient backend. ``tests/contracts/storage.py`` is the suite it passes
together with ``S3Store``.

Not for production: no persistence, one process, and no ``Blocked`` waits (a
memory store is never blocked). Every call yields to the event loop once, so
concurrent parts interleave as they would over the network.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cefmp4.adapters import checksums
from cefmp4.adapters.blocked import Blocked
from cefmp4.adapters.checksums import Bytes, Crc, md5_of, multipart_etag
from cefmp4.adapters.storage import ObjectInfo, RemotePart, RemoteUpload
from cefmp4.domain.errors import NoSuchKey, NoSuchUpload, PermanentError
from cefmp4.domain.events import FailReason

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last
MAX_PART_NUMBER = 10_000


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Upload:
    key: str
    initiated: datetime
    parts: dict[int, tuple[bytes, str]] = field(default_factory=dict)  # number -> (body, etag)
    checksum: Crc | None = None  # the FULL_OBJECT CRC it was created with


def _rejected(code: str, message: str, reason: FailReason = "s3_rejected") -> PermanentError:
    # The S3 code leads the message, as S3Store's translate() writes it.
    return PermanentError(f"s3 {code}: {message}", reason=reason)


class MemoryStore:
    def __init__(
        self,
        bucket: str = "memory",
        *,
        now: Callable[[], datetime] = _utcnow,
        min_part_size: int = MIN_PART_SIZE,
    ) -> None:
        self.bucket = bucket
        self._now = now
        self._min_part_size = min_part_size
        self._objects: dict[str, tuple[bytes, str]] = {}  # key -> (body, etag)
        self._checksums: dict[str, str] = {}  # key -> the object's tagged CRC, if it has one
        self._uploads: dict[str, _Upload] = {}
        self._ids = itertools.count(1)

    def waiting_while_blocked(self, blocked: Blocked) -> MemoryStore:
        return self  # never blocked: nothing to wait for

    async def ensure_bucket(self) -> None:
        await asyncio.sleep(0)  # the bucket exists from the start

    async def create_multipart(
        self, key: str, content_type: str, *, checksum: Crc | None = None
    ) -> str:
        await asyncio.sleep(0)
        upload_id = f"mem-{next(self._ids)}"
        self._uploads[upload_id] = _Upload(key, self._now(), checksum=checksum)
        return upload_id

    def _upload(self, key: str, upload_id: str) -> _Upload:
        upload = self._uploads.get(upload_id)
        if upload is None or upload.key != key:
            raise NoSuchUpload(f"s3 NoSuchUpload: no upload {upload_id} of {key}")
        return upload

    @staticmethod
    def _check_number(number: int) -> None:
        if not 1 <= number <= MAX_PART_NUMBER:
            raise _rejected("InvalidArgument", f"part number {number} is not in 1..10000")

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: Bytes, md5_b64: str, *,
        checksum: str = "", payload_sha256: str = "",
    ) -> str:  # fmt: skip
        await asyncio.sleep(0)
        upload = self._upload(key, upload_id)
        self._check_number(number)
        etag = _checked(body, md5_b64, checksum, payload_sha256)
        upload.parts[number] = (bytes(body), etag)
        return etag

    async def upload_part_copy(
        self, key: str, upload_id: str, number: int, source_key: str, offset: int, size: int
    ) -> str:
        if size < 1:
            raise ValueError(f"cannot copy an empty range into part {number}")
        await asyncio.sleep(0)
        upload = self._upload(key, upload_id)
        self._check_number(number)
        source = self._objects.get(source_key)
        if source is None:
            raise NoSuchKey(f"s3 NoSuchKey: no object {source_key}")
        if offset < 0 or offset + size > len(source[0]):
            raise _rejected("InvalidRange", f"bytes {offset}+{size} of {len(source[0])}")
        body = source[0][offset : offset + size]
        etag = md5_of(body)[0]  # AWS's answer; SeaweedFS's differs (see the contract)
        upload.parts[number] = (body, etag)
        return etag

    async def list_parts(self, key: str, upload_id: str) -> list[RemotePart]:
        await asyncio.sleep(0)
        upload = self._upload(key, upload_id)
        return [RemotePart(n, len(body), etag) for n, (body, etag) in sorted(upload.parts.items())]

    async def list_uploads(self, prefix: str) -> list[RemoteUpload]:
        await asyncio.sleep(0)
        found = [
            RemoteUpload(u.key, upload_id, u.initiated)
            for upload_id, u in self._uploads.items()
            if u.key.startswith(prefix)
        ]
        return sorted(found, key=lambda u: (u.key.encode(), u.initiated))

    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[tuple[int, str]], *,
        part_checksums: dict[int, str] | None = None, checksum: str = "",
    ) -> str:  # fmt: skip
        await asyncio.sleep(0)
        upload = self._upload(key, upload_id)
        if not parts:
            raise _rejected("MalformedXML", "no parts to complete")
        numbers = [n for n, _ in parts]
        if any(a >= b for a, b in itertools.pairwise(numbers)):
            raise _rejected("InvalidPartOrder", f"part numbers {numbers} are not ascending")
        bodies: list[bytes] = []
        for number, etag in parts:
            held = upload.parts.get(number)
            if held is None or held[1] != etag.strip('"'):
                raise _rejected(
                    "InvalidPart", f"no part {number} with ETag {etag}", "s3_invalid_part"
                )
            bodies.append(held[0])
        if any(len(body) < self._min_part_size for body in bodies[:-1]):
            raise _rejected("EntityTooSmall", "a part but the last is below the minimum size")
        etags = [upload.parts[n][1] for n in numbers]
        etag = multipart_etag(etags) or f"{md5_of(b''.join(bodies))[0]}-{len(etags)}"
        whole = b"".join(bodies)
        crc = "" if upload.checksum is None else checksums.checksum_of(upload.checksum, whole)
        if checksum and checksum != crc:
            raise _rejected(
                "BadDigest", f"the object's checksum is {crc or 'none'}, not {checksum}"
            )
        self._objects[key] = (whole, etag)
        self._checksums.pop(key, None)
        if crc:
            self._checksums[key] = crc
        del self._uploads[upload_id]
        return etag

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await asyncio.sleep(0)
        self._upload(key, upload_id)
        del self._uploads[upload_id]

    async def put_object(
        self, key: str, body: Bytes, md5_b64: str, content_type: str, *, checksum: str = "",
        payload_sha256: str = "",
    ) -> str:  # fmt: skip
        await asyncio.sleep(0)
        etag = _checked(body, md5_b64, checksum, payload_sha256)
        self._objects[key] = (bytes(body), etag)
        self._checksums.pop(key, None)
        if checksum:
            self._checksums[key] = checksum
        return etag

    async def probe_checksum(self, algorithm: Crc, scratch_key: str) -> str | None:
        await asyncio.sleep(0)
        return None  # it verifies every CRC it is given, like S3

    async def clear_scratch(self, prefix: str) -> int:
        await asyncio.sleep(0)
        keys = [k for k in self._objects if k.startswith(prefix)]
        uploads = [i for i, u in self._uploads.items() if u.key.startswith(prefix)]
        for key in keys:
            del self._objects[key]
            self._checksums.pop(key, None)
        for upload_id in uploads:
            del self._uploads[upload_id]
        return len(keys) + len(uploads)

    async def probe_signed_payload(self, scratch_key: str) -> str | None:
        await asyncio.sleep(0)
        return None  # it checks every payload_sha256 it is given, like the JuiceFS gateway

    async def head_object(self, key: str) -> ObjectInfo | None:
        await asyncio.sleep(0)
        held = self._objects.get(key)
        if held is None:
            return None
        crc = self._checksums.get(key, "")
        return ObjectInfo(len(held[0]), held[1], crc, "FULL_OBJECT" if crc else "")

    async def list_keys(self, prefix: str, start_after: str = "") -> list[str]:
        await asyncio.sleep(0)
        after = start_after.encode()
        return sorted(
            (k for k in self._objects if k.startswith(prefix) and k.encode() > after),
            key=str.encode,
        )

    async def get_object(self, key: str) -> bytes | None:
        await asyncio.sleep(0)
        held = self._objects.get(key)
        return None if held is None else held[0]


def _checked(body: Bytes, md5_b64: str, checksum: str, payload_sha256: str) -> str:
    """The body's MD5 hex (its ETag), after the checks of what came with it:
    Content-MD5 unless ``md5_b64`` is "", the tagged CRC ``checksum`` if any,
    the signed ``payload_sha256`` if any (as a store that checks signatures)."""
    # hashlib itself, not checksums.sha256_hex: a store checks with its own
    # hash, so a wrong digest on the service's side cannot hide here.
    if payload_sha256 and hashlib.sha256(body).hexdigest() != payload_sha256:
        raise _rejected("XAmzContentSHA256Mismatch", "the signed SHA-256 does not match the body")
    found = checksums.untag(checksum)
    if found is not None and checksums.checksum_of(found[0], body) != checksum:
        raise _rejected("BadDigest", f"the {found[0]} does not match the body")
    return _checked_md5(body, md5_b64) if md5_b64 else md5_of(body)[0]


def _checked_md5(body: Bytes, md5_b64: str) -> str:
    """The body's MD5 hex, after S3's Content-MD5 checks (InvalidDigest, BadDigest)."""
    try:
        sent = base64.b64decode(md5_b64, validate=True)
    except (binascii.Error, ValueError):
        sent = b""
    if len(sent) != 16:
        raise _rejected("InvalidDigest", "the Content-MD5 is not a base64 MD5")
    md5_hex, md5_b64_actual = md5_of(body)
    if base64.b64encode(sent).decode() != md5_b64_actual:
        raise _rejected("BadDigest", "the Content-MD5 does not match the body")
    return md5_hex
