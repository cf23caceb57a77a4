"""The one text form of file-system paths inside the service (the *wire form*).

A Linux file name is any bytes but NUL and ``/``; JSON, Redis, S3 keys, logs
and terminals want text. So every path the watcher walks is turned into its
wire form once, at the edge, and that string is what events, the projection,
snapshots and object keys carry; every place that touches the file system
turns it back (``cefmp4.adapters.files``, the MP4 check, the ffprobe argument).

The rule: the path's bytes read as UTF-8, where each of these is written as
``%XX`` (two uppercase hex digits per byte):

* every byte that is not part of valid UTF-8 (a Latin-1 ``é`` from an SMB
  share is the byte ``E9``: ``caf\\xe9.mp4`` -> ``caf%E9.mp4``);
* ``%`` itself (``%25``), which is what makes the form reversible;
* control characters: C0 (``\\x00``-``\\x1f``: newline, tab, escape ...),
  DEL and C1 (U+0080-U+009F, as their two UTF-8 bytes), so a name can never
  split a log line or drive a terminal;
* U+FFFE and U+FFFF, which XML 1.0 (S3's listing responses) cannot carry.

Everything else, including non-ASCII letters in valid UTF-8, spaces and
leading dashes, is itself: names without those characters are unchanged, so
ordinary paths read the same in events, keys and ``ls``. The form is
lossless: ``to_fs(to_wire(b)) == b`` for every path. ``to_fs`` is lenient
with strings that are not canonical (a lone ``%``, lowercase hex, a path
recorded before this rule existed): what is not a ``%XX`` escape is taken
literally.

C1 and the two non-characters go beyond "C0 and DEL": both are valid UTF-8,
so leaving them would break the "output contains no control characters"
(a C1 CSI is a terminal escape in some emulators) and "is a valid S3 listing
entry" properties for no gain; escaping them costs nothing in reversibility.
"""

from __future__ import annotations

import os
import re

# Characters of the decoded text that are written as escapes; U+DC80-U+DCFF
# are the bytes that were not valid UTF-8 (Python's surrogateescape).
_ESCAPED = re.compile("[%\x00-\x1f\x7f-\x9f\ufffe\uffff\udc80-\udcff]")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # one byte that was not valid UTF-8
        return f"%{code - 0xDC00:02X}"
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))


def to_wire(fs_path: str | bytes) -> str:
    """The wire form of a file-system path (bytes, or str as ``os`` gives it:
    decoded with the file-system encoding and ``surrogateescape``)."""
    raw = os.fsencode(fs_path) if isinstance(fs_path, str) else fs_path
    text = raw.decode("utf-8", "surrogateescape")
    return _ESCAPED.sub(_escape, text)


def to_fs(wire: str) -> bytes:
    """The file-system path (bytes, for ``os`` calls) of a wire-form path."""
    raw = wire.encode("utf-8", "surrogateescape")
    if b"%" not in raw:
        return raw
    return _ESCAPE.sub(lambda m: bytes.fromhex(m.group(1).decode()), raw)


def to_fs_str(wire: str) -> str:
    """``to_fs`` as the str ``os`` would have given (for APIs that want str)."""
    return os.fsdecode(to_fs(wire))
