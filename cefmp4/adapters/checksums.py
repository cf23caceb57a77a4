"""The digests S3 computes over what we send, computed on our side too.

Two families, chosen by ``S3_CHECKSUM`` (``resolve`` picks one for ``auto``):

* **CRC64NVME / CRC32C** (flexible checksums, ``awscrt``: several GB/s a
  core, where MD5 manages ~0.6). Each part carries ``x-amz-checksum-*`` so
  the server rejects a body damaged on the way; the upload is created as
  ``FULL_OBJECT``, so the checksum of the whole object is the CRC *combination*
  of the part CRCs (``combine``: no byte is read twice) and the server checks
  it at completion. That server-verified value is the object's integrity
  proof in the sidecar.
* **SHA-256 of the signed payload** (SigV4 ``x-amz-content-sha256``, computed
  here as the part is read: OpenSSL's SHA-NI path, 2.3x cheaper than MD5), for
  stores that verify signatures but no flexible checksum (the JuiceFS
  gateway). It proves each request's body, not the whole object: the local
  CRC64NVME recorded per part is what the finalizer re-checks.
* **MD5** (``Content-MD5``), for stores with neither: S3 answers
  an UploadPart with the part's MD5 as its ETag and a completed multipart
  object with the MD5 of the part MD5s plus ``-N``.

S3 (unencrypted or SSE-S3) and SeaweedFS return the MD5 ETags whichever
checksum was sent, so ``multipart_etag`` and ``cefmp4 verify`` keep comparing
ETags with MD5s computed from the file.

A checksum travels *tagged*: ``"crc64nvme:<base64 of the big-endian value>"``
(S3's header encoding), so a recorded value is only ever compared with one of
the same algorithm. They live next to the storage interface because they are
its arithmetic; they do no I/O.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from typing import Literal

from awscrt import checksums as crt

from cefmp4.domain.config import ChecksumMode

# What the digests read: a part in a reused buffer is a memoryview of it.
Bytes = bytes | bytearray | memoryview
Mode = ChecksumMode  # S3_CHECKSUM's values, as the config parses them
Algorithm = Literal["crc64nvme", "crc32c", "sha256", "md5", "none"]
Crc = Literal["crc64nvme", "crc32c"]
CRCS: tuple[Crc, ...] = ("crc64nvme", "crc32c")  # ``auto`` tries them in this order

_WIDTH: dict[Crc, int] = {"crc64nvme": 8, "crc32c": 4}
# The botocore parameter that carries each one (UploadPart, PutObject, Complete...).
PARAMETER: dict[Crc, str] = {"crc64nvme": "ChecksumCRC64NVME", "crc32c": "ChecksumCRC32C"}
S3_NAME: dict[Crc, str] = {"crc64nvme": "CRC64NVME", "crc32c": "CRC32C"}


def md5_of(data: Bytes) -> tuple[str, str]:
    """(hex, base64) MD5; hashlib drops the GIL, so run it in a thread."""
    digest = hashlib.md5(data, usedforsecurity=False).digest()
    return digest.hex(), base64.b64encode(digest).decode()


def sha256_hex(data: Bytes) -> str:
    """Hex SHA-256 (a signed payload's); hashlib drops the GIL, so run it in a thread."""
    return hashlib.sha256(data).hexdigest()


def is_crc(algorithm: str) -> bool:
    return algorithm in _WIDTH


def as_crc(algorithm: str) -> Crc | None:
    """``algorithm`` if it is one of the CRCs, else None."""
    return algorithm if algorithm in _WIDTH else None


def crc_value(algorithm: Crc, data: Bytes, previous: int = 0) -> int:
    """The CRC of ``data`` (continuing ``previous``); awscrt releases the GIL."""
    if algorithm == "crc64nvme":
        return int(crt.crc64nvme(data, previous))
    return int(crt.crc32c(data, previous))


def encode(algorithm: Crc, value: int) -> str:
    """S3's header form: base64 of the big-endian value."""
    return base64.b64encode(value.to_bytes(_WIDTH[algorithm], "big")).decode()


def decode(algorithm: Crc, text: str) -> int:
    raw = base64.b64decode(text, validate=True)
    if len(raw) != _WIDTH[algorithm]:
        raise ValueError(f"a {algorithm} checksum has {_WIDTH[algorithm]} bytes, not {len(raw)}")
    return int.from_bytes(raw, "big")


def tag(algorithm: Crc, value: int) -> str:
    return f"{algorithm}:{encode(algorithm, value)}"


def untag(tagged: str) -> tuple[Crc, str] | None:
    """(algorithm, base64 value) of a tagged checksum; None for "" or anything
    that is not a CRC this module knows (an old event, another mode)."""
    algorithm, sep, value = tagged.partition(":")
    if not sep or algorithm not in _WIDTH or not value:
        return None
    return algorithm, value


def checksum_of(algorithm: Crc, data: Bytes) -> str:
    """The tagged checksum of ``data``."""
    return tag(algorithm, crc_value(algorithm, data))


def combine(algorithm: Crc, parts: Iterable[tuple[int, int]]) -> int:
    """The CRC of the concatenation of blocks given as (crc, length), in order,
    without their bytes: what the server checks a FULL_OBJECT upload against."""
    join = crt.combine_crc64nvme if algorithm == "crc64nvme" else crt.combine_crc32c
    total: int | None = None
    for value, length in parts:
        total = value if total is None else int(join(total, value, length))
    return 0 if total is None else total


def combine_tagged(parts: Iterable[tuple[str, int]]) -> str | None:
    """``combine`` over tagged part checksums with their sizes; None when a
    part has none, or they are not all of one algorithm."""
    values: list[tuple[int, int]] = []
    algorithm: Crc | None = None
    for tagged, size in parts:
        found = untag(tagged)
        if found is None or (algorithm is not None and found[0] != algorithm):
            return None
        algorithm = found[0]
        values.append((decode(algorithm, found[1]), size))
    if algorithm is None:
        return None
    return tag(algorithm, combine(algorithm, values))


def multipart_etag(part_etags: list[str]) -> str | None:
    """S3's ETag of a completed multipart object: md5 of the part MD5s, '-N';
    None when a part's ETag is not an MD5 (a copied part on some stores)."""
    try:
        digests = b"".join(bytes.fromhex(e) for e in part_etags)
    except ValueError:
        return None
    if len(digests) != 16 * len(part_etags):
        return None
    return f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(part_etags)}"


def looks_like_md5(etag: str) -> bool:
    """Whether an ETag can be a part's MD5 (32 hex digits, no ``-N``)."""
    if len(etag) != 32:
        return False
    try:
        bytes.fromhex(etag)
    except ValueError:
        return False
    return True
