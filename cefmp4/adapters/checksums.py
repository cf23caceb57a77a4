"""The digests S3 computes over what we send, computed on our side too.

S3 answers an UploadPart with the part's MD5 as its ETag and a completed
multipart object with the MD5 of the part MD5s plus ``-N``. The uploader sends
each part's MD5 (Content-MD5) so the server rejects a body that changed on the
way, and the finalizer and ``cefmp4 verify`` compare what S3 reports with what
these functions compute from the file. They live next to the storage interface
because they are its arithmetic; they do no I/O.
"""

from __future__ import annotations

import base64
import hashlib


def md5_of(data: bytes) -> tuple[str, str]:
    """(hex, base64) MD5; hashlib drops the GIL, so run it in a thread."""
    digest = hashlib.md5(data, usedforsecurity=False).digest()
    return digest.hex(), base64.b64encode(digest).decode()


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
