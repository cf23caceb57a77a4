"""S3 (and S3-compatible) implementation of :class:`cefmp4.adapters.storage.ObjectStore`.

Design notes
------------
* One aiobotocore client per process, injected; the pool is sized for the
  parts that may be in flight at once.
* Integrity: every part carries the checksum the caller computed
  (``x-amz-checksum-crc64nvme``/``-crc32c``, or ``Content-MD5``;
  ``cefmp4.adapters.checksums``), so the server rejects bytes that were
  damaged in transit. That makes botocore's own work redundant: the SigV4
  payload hash is off (``payload_signing_enabled=False`` is honoured over
  plain HTTP too: ``x-amz-content-sha256: UNSIGNED-PAYLOAD``,
  ``tests/test_checksum_modes.py`` checks the headers) and its default CRC32
  is only computed when an operation requires one and we sent none.
* Part bodies are handed over as a seekable file over the part's bytes
  (``PartBody``), so no layer makes a second full copy of a part in flight:
  a ``bytes`` body would become a ``BytesIO`` that aiohttp un-shares, and a
  ``bytearray`` one (passed through by botocore and aiohttp as is) is written
  to the transport at once, whose buffer on Python 3.11 copies whatever the
  socket did not take.
* botocore's own retries are off; transient failures are retried here with
  the project's policy, around a per-request timeout so a stalled connection
  cannot hang a stream. The timeout of a request with a body grows with the
  body (``request_timeout``): a slow link is not a stalled one, and botocore's
  ``read_timeout`` already catches a socket that makes no progress at all.
* Every library exception is translated to the project's tree at this edge.
  Credential, permission, clock and bucket errors are ``DeploymentBlocked``:
  with a :class:`~cefmp4.adapters.blocked.Blocked` the call waits, in place, until S3
  accepts again (a missing bucket is created again first); without one (the
  ``gc`` command, contract tests) the error surfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import Any, TypeVar

import aiohttp
import aiohttp.payload
import botocore.auth
import botocore.exceptions as bexc
from botocore.auth import S3SigV4Auth
from botocore.config import Config as BotoConfig

from cefmp4.adapters import checksums
from cefmp4.adapters.blocked import Blocked
from cefmp4.adapters.checksums import Bytes, Crc
from cefmp4.adapters.retry import transient
from cefmp4.adapters.storage import ObjectInfo, RemotePart, RemoteUpload
from cefmp4.domain.errors import (
    BlockCause,
    CefError,
    DeploymentBlocked,
    NoSuchKey,
    NoSuchUpload,
    PermanentError,
    TransientError,
)

T = TypeVar("T")

_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "OperationAborted",
        "503",
        "500",
        "502",
        "504",
    }
)


# S3 answers these to every request of a deployment whose keys, policy, clock
# or bucket are wrong: no recording is at fault, so none is failed for them.
_BLOCKED_CODES: dict[str, BlockCause] = {
    "InvalidAccessKeyId": "credentials",
    "SignatureDoesNotMatch": "credentials",
    "ExpiredToken": "credentials",
    "InvalidToken": "credentials",
    "TokenRefreshRequired": "credentials",
    "AccessDenied": "permissions",
    "AllAccessDisabled": "permissions",
    "AccountProblem": "permissions",
    "403": "permissions",  # a HEAD has no body, so no code: just the status
    "RequestTimeTooSkewed": "clock_skew",
    "NoSuchBucket": "no_bucket",
}

# A body that did not arrive as it was hashed (CRC / Content-MD5, signed SHA-256).
_DAMAGE_CODES = frozenset({"BadDigest", "XAmzContentSHA256Mismatch"})
# Every code translate() gives a kind or reason of its own; any other 4xx is a
# PermanentError("s3_rejected").
SPECIAL_CODES = frozenset(
    {"NoSuchUpload", "NoSuchKey", "InvalidPart", *_DAMAGE_CODES, *_TRANSIENT_CODES, *_BLOCKED_CODES}
)

# A floor on the throughput we wait for: a request with a body gets
# S3_TIMEOUT_SECONDS plus the time this rate needs for it (a 5 MiB part +20 s,
# a 5 GiB part ~5.7 h). A slower link than this is treated as stalled.
MIN_THROUGHPUT_BYTES_PER_SECOND = 256 * 1024


def request_timeout(base: float, body_size: int) -> float:
    """The asyncio timeout for one request carrying ``body_size`` bytes."""
    return base + body_size / MIN_THROUGHPUT_BYTES_PER_SECOND


def boto_config(*, pool: int, timeout: float) -> BotoConfig:
    return BotoConfig(
        signature_version="s3v4",
        s3={"addressing_style": "path", "payload_signing_enabled": False},
        # total_max_attempts: botocore's max_attempts counts *retries*.
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=min(timeout, 10.0),
        read_timeout=timeout,
        max_pool_connections=pool,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


class Damaged(TransientError):
    """The body's checksum (CRC, Content-MD5 or the signed SHA-256) did not
    match what arrived:
    damaged in transit, so it is sent again (from the same buffer). If every
    attempt is refused the bytes are not what we hashed: ``_call`` turns it
    into a ``PermanentError`` (``s3_rejected``)."""


def translate(exc: BaseException) -> Exception:
    """Map a library exception to TransientError / DeploymentBlocked /
    NoSuchUpload / NoSuchKey / PermanentError (the S3 code stays in the message)."""
    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = f"s3 {code or status}: {error.get('Message', exc)}"
        if code == "NoSuchUpload":
            return NoSuchUpload(message)
        if code == "NoSuchKey":
            return NoSuchKey(message)
        if code in _DAMAGE_CODES:
            return Damaged(message)
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientError(message)
        cause = _BLOCKED_CODES.get(code) or ("permissions" if not code and status == 403 else None)
        if cause is not None:
            return DeploymentBlocked(message, cause=cause)
        if code == "InvalidPart":
            return PermanentError(message, reason="s3_invalid_part")
        return PermanentError(message, reason="s3_rejected")
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return DeploymentBlocked(f"s3 credentials: {exc}", cause="credentials")
    if isinstance(
        exc,
        bexc.HTTPClientError
        | bexc.ConnectionError
        | aiohttp.ClientError
        | TimeoutError
        | ConnectionError,
    ):
        return TransientError(f"s3 connection: {type(exc).__name__}: {exc}")
    if isinstance(exc, bexc.BotoCoreError):
        return PermanentError(f"s3 client: {exc}", reason="s3_client_error")
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


# Each write to the connection copies this much of a part: the copy, not a
# view, is what the transport keeps (Python >= 3.12 queues what it is given
# without copying), so a part's buffer can be lent again the moment its
# request ends, even if the connection still flushes. Small enough that the
# copies in flight stay a rounding error next to the parts themselves: 128 KiB
# peaked 2 MiB lower than 256 KiB in the throughput bench, at the same CPU
# per GiB (64 KiB and 1 MiB were no better).
WRITE_CHUNK = 128 * 1024


class PartBody(aiohttp.payload.Payload):
    """A part's bytes as both botocore and aiohttp want them, without copies.

    To botocore it is a file with a length; to aiohttp it is a ``Payload`` it
    writes as is, in ``WRITE_CHUNK`` copies straight from the buffer. Any
    file-like body would instead be read in a worker thread per 256 KiB (an
    executor round trip each, a third of the upload's CPU), and a ``bytes``
    body becomes a BytesIO that aiohttp un-shares: a second copy of every
    part in flight.

    ``sha256``: the hex SHA-256 the caller computed of these bytes (in the
    thread that read them); the request is then signed with it
    (``PresignedPayloadAuth``), and a store that checks signatures refuses
    a body that does not match it.
    """

    _autoclose = True  # holds no file or socket: nothing to close

    def __init__(self, data: Bytes, *, sha256: str = "") -> None:
        super().__init__(data, content_type="application/octet-stream")
        self._view = memoryview(data).cast("B")
        self._size = len(self._view)
        self._pos = 0
        self.sha256 = sha256

    # botocore's side: a seekable file (it reads only to hash, which the
    # signer below never needs to).
    def read(self, size: int = -1) -> bytes:
        total = len(self._view)
        end = total if size is None or size < 0 else min(total, self._pos + size)
        data = bytes(self._view[self._pos : max(end, self._pos)])
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return len(self._view)

    # aiohttp's side: a payload written from the start every time it is asked
    # (aiohttp may send it again on a fresh connection).
    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a part body is binary")

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        view = self._view if content_length is None else self._view[:content_length]
        for start in range(0, len(view), WRITE_CHUNK):
            await writer.write(bytes(view[start : start + WRITE_CHUNK]))


class PresignedPayloadAuth(S3SigV4Auth):  # type: ignore[misc]
    """SigV4 for S3 that signs a ``PartBody``'s precomputed SHA-256.

    botocore's own S3 signers always hash the body themselves, on the event
    loop (the CRT one through a Python read callback per chunk): half a
    CPU-second per GiB that blocks the loop, for a digest the reading thread
    can compute in parallel. Every other request (and a body without a
    digest) is signed as botocore would, UNSIGNED-PAYLOAD per the client's
    config. Chosen per UploadPart/PutObject by ``_presigned_when_asked``.
    """

    def payload(self, request: Any) -> str:
        body = getattr(request, "data", None)
        if isinstance(body, PartBody) and body.sha256:
            return body.sha256
        return str(super().payload(request))


# The name under which botocore finds the signer above. botocore looks
# signers up by name in its one table (``AUTH_TYPE_MAPS``); adding a name of
# our own changes nothing that botocore or another client signs.
PRESIGNED_SIGNER = "cefmp4-s3v4-presigned"


def _presigned_when_asked(signature_version: str, **_: Any) -> str | None:
    """A ``choose-signer`` handler: plain SigV4 (``s3v4``, what ``boto_config``
    asks for) UploadPart and PutObject go through ``PresignedPayloadAuth``;
    anything else (S3 Express, SigV4a, unsigned) as botocore chose. It runs
    before botocore's own handlers, so a bucket that needs SigV4a by ARN (a
    multi-region access point, which S3_BUCKET_NAME cannot name) would not get
    it. ``test_a_signed_body_carries_its_sha256_and_only_it_is_signed`` fails
    if this signer is not the one used (the digest would be dropped)."""
    return PRESIGNED_SIGNER if signature_version == "s3v4" else None


def _etag(value: str) -> str:
    return value.strip('"')


def _integrity(md5_b64: str, checksum: str) -> dict[str, str]:
    """The request parameters that carry a body's checksum: ``Content-MD5``
    and/or the tagged CRC's ``x-amz-checksum-*`` (botocore then adds none)."""
    params = {"ContentMD5": md5_b64} if md5_b64 else {}
    found = checksums.untag(checksum)
    if found is not None:
        params[checksums.PARAMETER[found[0]]] = found[1]
    return params


def _full_object(algorithm: Crc) -> dict[str, str]:
    return {"ChecksumAlgorithm": checksums.S3_NAME[algorithm], "ChecksumType": "FULL_OBJECT"}


def _checksum(reply: dict[str, Any]) -> str:
    """The tagged CRC in a reply (HEAD, a ListParts part), or ""."""
    for algorithm in checksums.CRCS:
        value = reply.get(checksums.PARAMETER[algorithm])
        if value and "-" not in str(value):  # "...-N" is a COMPOSITE one: not ours
            return f"{algorithm}:{value}"
    return ""


class S3Store:
    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        timeout: float,
        attempts: int = 8,
        list_page_size: int = 1000,
        blocked: Blocked | None = None,
    ) -> None:
        self._s3 = client
        botocore.auth.AUTH_TYPE_MAPS.setdefault(PRESIGNED_SIGNER, PresignedPayloadAuth)
        for operation in ("UploadPart", "PutObject"):  # the calls with a PartBody
            client.meta.events.register_first(
                f"choose-signer.s3.{operation}", _presigned_when_asked,
                unique_id=f"cefmp4-presigned-{operation}",
            )  # fmt: skip
        self.bucket = bucket
        self._timeout = timeout
        self._attempts = attempts
        self._list_page_size = list_page_size  # S3's maximum; smaller only in tests
        self._blocked = blocked

    def waiting_while_blocked(self, blocked: Blocked) -> S3Store:
        """This store (same client), whose calls wait out ``DeploymentBlocked``."""
        other = copy.copy(self)
        other._blocked = blocked
        return other

    async def _call(self, op: Callable[[], Awaitable[T]], *, body_size: int = 0) -> T:
        async def attempts() -> T:
            try:
                return await self._attempts_of(op, request_timeout(self._timeout, body_size))
            except Damaged as exc:
                raise PermanentError(str(exc), reason="s3_rejected") from exc

        if self._blocked is None:
            return await attempts()
        return await self._blocked.through(attempts, repair=self._repair)

    async def _attempts_of(
        self, op: Callable[[], Awaitable[T]], seconds: float, *, raw: bool = False
    ) -> T:
        """``op`` under the transient retry policy, each try limited to ``seconds``;
        ``raw``: one try, a ``ClientError`` raised as it is, for the caller to read."""
        async for attempt in transient(attempts=1 if raw else self._attempts):
            with attempt:
                try:
                    async with asyncio.timeout(seconds):
                        return await op()
                except bexc.ClientError as exc:
                    if raw:
                        raise
                    raise translate(exc) from exc
                except (bexc.BotoCoreError, aiohttp.ClientError, OSError) as exc:
                    raise translate(exc) from exc
                except TimeoutError as exc:
                    raise TransientError(f"s3 request timed out after {seconds:.0f}s") from exc
        raise AssertionError("unreachable: tenacity reraises")

    async def _repair(self, cause: BlockCause) -> None:
        """A missing bucket is created again (someone deleted it, or it was never
        made); whether that worked, the blocked call's next try tells."""
        if cause == "no_bucket":
            with contextlib.suppress(CefError):
                await self._attempts_of(self._ensure_bucket, self._timeout)

    async def ensure_bucket(self) -> None:
        await self._call(self._ensure_bucket)

    async def _ensure_bucket(self) -> None:
        try:
            await self._s3.head_bucket(Bucket=self.bucket)
        except bexc.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            try:
                await self._s3.create_bucket(Bucket=self.bucket)
            except bexc.ClientError as create_exc:
                code = create_exc.response.get("Error", {}).get("Code")
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    async def create_multipart(
        self, key: str, content_type: str, *, checksum: Crc | None = None
    ) -> str:
        extra = {} if checksum is None else _full_object(checksum)
        reply = await self._call(
            lambda: self._s3.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType=content_type, **extra
            )
        )
        return str(reply["UploadId"])

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: Bytes, md5_b64: str, *,
        checksum: str = "", payload_sha256: str = "",
    ) -> str:  # fmt: skip
        reply = await self._call(
            lambda: self._s3.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=PartBody(body, sha256=payload_sha256),
                **_integrity(md5_b64, checksum),
            ),
            body_size=len(body),
        )
        return _etag(reply["ETag"])

    async def upload_part_copy(
        self, key: str, upload_id: str, number: int, source_key: str, offset: int, size: int
    ) -> str:
        if size < 1:
            raise ValueError(f"cannot copy an empty range into part {number}")
        reply = await self._call(
            lambda: self._s3.upload_part_copy(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                CopySource={"Bucket": self.bucket, "Key": source_key},
                CopySourceRange=f"bytes={offset}-{offset + size - 1}",  # inclusive end
            )
        )
        return _etag(reply["CopyPartResult"]["ETag"])

    async def list_parts(self, key: str, upload_id: str) -> list[RemotePart]:
        parts: list[RemotePart] = []
        marker = 0
        while True:
            reply = await self._call(
                lambda m=marker: self._s3.list_parts(  # type: ignore[misc]
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumberMarker=m
                )
            )
            parts += [
                RemotePart(int(p["PartNumber"]), int(p["Size"]), _etag(p["ETag"]), _checksum(p))
                for p in reply.get("Parts", [])
            ]
            if not reply.get("IsTruncated"):
                return parts
            marker = int(reply["NextPartNumberMarker"])

    async def list_uploads(self, prefix: str) -> list[RemoteUpload]:
        uploads: list[RemoteUpload] = []
        key_marker, id_marker = "", ""
        while True:
            kwargs: dict[str, str] = {"Bucket": self.bucket, "Prefix": prefix}
            if key_marker:
                kwargs |= {"KeyMarker": key_marker, "UploadIdMarker": id_marker}
            reply = await self._call(lambda kw=kwargs: self._s3.list_multipart_uploads(**kw))  # type: ignore[misc]
            uploads += [
                RemoteUpload(u["Key"], u["UploadId"], u["Initiated"].astimezone(UTC))
                for u in reply.get("Uploads", [])
            ]
            if not reply.get("IsTruncated"):
                return uploads
            key_marker = reply.get("NextKeyMarker", "")
            id_marker = reply.get("NextUploadIdMarker", "")
            if not key_marker:
                return uploads

    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[tuple[int, str]], *,
        part_checksums: dict[int, str] | None = None, checksum: str = "",
    ) -> str:  # fmt: skip
        sums = part_checksums or {}
        layout = {
            "Parts": [
                {"PartNumber": n, "ETag": f'"{etag}"', **_integrity("", sums.get(n, ""))}
                for n, etag in parts
            ]
        }
        extra = _integrity("", checksum)
        if extra:
            extra["ChecksumType"] = "FULL_OBJECT"
        reply = await self._call(
            lambda: self._s3.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload=layout, **extra
            )
        )
        return _etag(reply["ETag"])

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await self._call(
            lambda: self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        )

    async def put_object(
        self, key: str, body: Bytes, md5_b64: str, content_type: str, *, checksum: str = "",
        payload_sha256: str = "",
    ) -> str:  # fmt: skip
        reply = await self._call(
            lambda: self._s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=PartBody(body, sha256=payload_sha256),
                ContentType=content_type,
                **_integrity(md5_b64, checksum),
            ),
            body_size=len(body),
        )
        return _etag(reply["ETag"])

    async def probe_checksum(self, algorithm: Crc, scratch_key: str) -> str | None:
        body = b"cefmp4 checksum probe\n" * 64
        right = checksums.checksum_of(algorithm, body)
        wrong = checksums.checksum_of(algorithm, body + b"!")
        try:
            upload_id = await self.create_multipart(
                scratch_key, "application/octet-stream", checksum=algorithm
            )
        except PermanentError as exc:
            return f"CreateMultipartUpload with {algorithm}: {exc}"
        completed = False
        try:

            def wrong_part() -> Awaitable[Any]:
                return self._s3.upload_part(  # type: ignore[no-any-return]
                    Bucket=self.bucket, Key=scratch_key, UploadId=upload_id, PartNumber=1,
                    Body=PartBody(body), **_integrity("", wrong),
                )  # fmt: skip

            if not await self._refuses(wrong_part, len(body)):
                return f"the store accepted a part whose {algorithm} is wrong"
            try:
                etag = await self.upload_part(scratch_key, upload_id, 1, body, "", checksum=right)
                await self.complete_multipart(
                    scratch_key, upload_id, [(1, etag)], part_checksums={1: right}, checksum=right
                )
            except PermanentError as exc:
                return f"a FULL_OBJECT {algorithm} upload: {exc}"
            completed = True
            info = await self.head_object(scratch_key)
            if info is None or info.checksum != right:
                return f"HEAD reports {info and info.checksum!r}, not the object's {algorithm}"
            return None
        finally:
            await self._clean_probe(scratch_key, upload_id, completed)

    async def clear_scratch(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("clear_scratch needs a prefix: it deletes what starts with it")
        gone = 0
        for key in await self.list_keys(prefix):
            await self._delete(key)  # a missing key is no error: idempotent as it is
            gone += 1
        for upload in await self.list_uploads(prefix):
            with contextlib.suppress(NoSuchUpload):
                await self.abort_multipart(upload.key, upload.upload_id)
                gone += 1
        return gone

    async def _delete(self, key: str) -> None:
        await self._call(lambda: self._s3.delete_object(Bucket=self.bucket, Key=key))

    async def probe_signed_payload(self, scratch_key: str) -> str | None:
        body = b"cefmp4 signed payload probe\n" * 64
        right = checksums.sha256_hex(body)
        damaged = body[:-1] + b"!"
        try:

            def damaged_put() -> Awaitable[Any]:
                return self._s3.put_object(  # type: ignore[no-any-return]
                    Bucket=self.bucket, Key=scratch_key, Body=PartBody(damaged, sha256=right)
                )

            if not await self._refuses(damaged_put, len(body)):
                return "the store accepted a body whose signed SHA-256 is wrong"
            try:
                await self.put_object(
                    scratch_key, body, "", "application/octet-stream", payload_sha256=right
                )
            except PermanentError as exc:
                return f"a signed PutObject: {exc}"
            return None
        finally:
            with contextlib.suppress(CefError):
                await self._delete(scratch_key)

    async def _clean_probe(self, key: str, upload_id: str, completed: bool) -> None:
        """The probe's object or upload goes, and any other upload of its key
        (a create retried after its answer was lost made a second one)."""
        with contextlib.suppress(CefError):
            if completed:
                await self._delete(key)
            else:
                await self.abort_multipart(key, upload_id)
        with contextlib.suppress(CefError):
            for other in await self.list_uploads(key):
                if other.key == key:
                    with contextlib.suppress(CefError):
                        await self.abort_multipart(key, other.upload_id)

    async def _refuses(self, send: Callable[[], Awaitable[Any]], size: int) -> bool:
        """Whether the store answers ``send``, a body whose checksum is wrong,
        with a 4xx (BadDigest, as S3 does), once: the retries would take it
        for damage."""
        try:
            await self._attempts_of(send, request_timeout(self._timeout, size), raw=True)
        except bexc.ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if 400 <= status < 500 and status not in (403, 429):
                return True
            raise translate(exc) from exc
        return False

    async def head_object(self, key: str) -> ObjectInfo | None:
        async def op() -> ObjectInfo | None:
            try:
                # ChecksumMode: the object's CRC, if it has one (the sidecar's proof).
                reply = await self._s3.head_object(
                    Bucket=self.bucket, Key=key, ChecksumMode="ENABLED"
                )
            except bexc.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            return ObjectInfo(
                int(reply["ContentLength"]),
                _etag(reply["ETag"]),
                _checksum(reply),
                str(reply.get("ChecksumType") or ""),
            )

        return await self._call(op)

    async def list_keys(self, prefix: str, start_after: str = "") -> list[str]:
        """ListObjectsV2 page after page; each page starts after the last key of
        the one before (``StartAfter``, not the continuation token, so one
        mechanism serves the caller's ``start_after`` and the pagination, and a
        retried page is the same request)."""
        keys: list[str] = []
        after = start_after
        while True:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": prefix,
                "MaxKeys": self._list_page_size,
            }
            if after:
                kwargs["StartAfter"] = after
            reply = await self._call(lambda kw=kwargs: self._s3.list_objects_v2(**kw))  # type: ignore[misc]
            page = [str(item["Key"]) for item in reply.get("Contents", [])]
            keys += page
            if not page or not reply.get("IsTruncated"):
                return keys
            after = page[-1]

    async def get_object(self, key: str) -> bytes | None:
        """GetObject, the body read inside the same timeout and retry (a body
        cut off mid-read is retried as a whole)."""

        async def op() -> bytes | None:
            try:
                reply = await self._s3.get_object(Bucket=self.bucket, Key=key)
            except bexc.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            async with reply["Body"] as stream:
                body: bytes = await stream.read()
            return body

        return await self._call(op)
