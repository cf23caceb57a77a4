"""Object keys of recordings: ``<S3_KEY_PREFIX><stream_id>/<relative path>``.

The relative path is in wire form (``cefmp4.domain.pathnames``), so a key is always
valid UTF-8 with no control characters. S3 allows 1,024 bytes of UTF-8 per
key, and the sidecar's key is the recording's plus ``.metadata.json``; so a
recording's key may use ``MAX_KEY_BYTES`` = 1,010 bytes. A longer one (deep
directory trees on a share) is shortened, deterministically: the prefix, the
stream id and the extension stay, the middle of the relative path is cut (at
character boundaries, never inside a ``%XX`` escape) and replaced by
``~`` and the first 8 hex digits of the SHA-256 of the whole relative path.
The stream id alone already makes keys unique per stream; the hash keeps two
long paths of one stream history apart for a human reading a listing. The
full path is never lost: ``FileSeen.rel_path`` and the sidecar carry it.
"""

from __future__ import annotations

import hashlib

S3_KEY_LIMIT = 1024
SIDECAR_SUFFIX = ".metadata.json"
MAX_KEY_BYTES = S3_KEY_LIMIT - len(SIDECAR_SUFFIX)
# Longer "extensions" are part of the name, not an extension worth keeping.
MAX_EXTENSION_BYTES = 16
_MARKER_BYTES = 1 + 8


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def extension(rel: str) -> str:
    """``.mp4`` of ``a/b.mp4``; empty when the last component has none."""
    name = rel.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    if dot <= 0 or _size(name[dot:]) > MAX_EXTENSION_BYTES:
        return ""
    return name[dot:]


def _escape_start(text: str, i: int) -> int:
    """``i`` moved back to the start of a ``%XX`` escape it falls inside."""
    for back in (1, 2):
        if i - back >= 0 and text[i - back] == "%":
            return i - back
    return i


def _head(text: str, budget: int) -> str:
    """The longest prefix of ``text`` within ``budget`` bytes, escapes whole."""
    used = 0
    end = 0
    for ch in text:
        used += _size(ch)
        if used > budget:
            break
        end += 1
    return text[: _escape_start(text, end)]


def _tail(text: str, budget: int) -> str:
    """The longest suffix of ``text`` within ``budget`` bytes, escapes whole."""
    used = 0
    start = len(text)
    for ch in reversed(text):
        used += _size(ch)
        if used > budget:
            break
        start -= 1
    moved = _escape_start(text, start)
    if moved != start:  # the cut fell inside an escape: drop the whole escape
        start = moved + 3
    return text[start:]


def object_key(prefix: str, stream_id: str, rel: str, *, limit: int = MAX_KEY_BYTES) -> str:
    """The key of the recording at ``rel`` (wire form); at most ``limit`` bytes.

    Raises ValueError when prefix and stream id alone leave no room (config
    validation keeps S3_KEY_PREFIX far below that).
    """
    head = f"{prefix}{stream_id}/"
    key = head + rel
    if _size(key) <= limit:
        return key
    ext = extension(rel)
    stem = rel[: len(rel) - len(ext)]
    room = limit - _size(head) - _MARKER_BYTES - _size(ext)
    if room < 0:
        raise ValueError(f"key prefix {head!r} leaves no room for a path within {limit} bytes")
    marker = "~" + hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    front = _head(stem, (room + 1) // 2)
    back = _tail(stem[len(front) :], room - _size(front))
    return head + front + marker + back + ext
