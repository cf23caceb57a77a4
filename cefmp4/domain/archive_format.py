"""The event archive's on-disk format: raw log entries, segments, segment keys.

Pure functions only (no I/O); ``cefmp4.adapters.archive`` does the S3 side.

Entries
-------
A :class:`RawEntry` is one log entry exactly as Redis holds it, with nothing
decoded: ``id``, ``type``, ``v``, ``replica`` and ``data``, the event's JSON
kept verbatim as ``msgspec.Raw``. The archive is an audit trail, so it must
keep entries this version cannot decode (a newer type or schema) as they
are. Two repairs keep every segment line valid JSON (:func:`raw_entry`):
``data`` that is not valid JSON is stored as a JSON *string* of its text,
and valid JSON loses the whitespace around it and, if it still contains a
newline (whitespace from a foreign writer), is re-encoded compactly; neither
changes a value, and the service's own entries have no such whitespace. A ``v`` that is not an
integer becomes ``0`` (what ``cefmp4.domain.events.decode`` reads it as).

Segments
--------
A segment is the gzip (level 6, ``mtime`` 0) of JSON lines, one entry per
line, in id order::

    {"id":"1700000000000-0","type":"FileSeen","v":1,"replica":"h-1","data":{...}}

``data`` is the entry's JSON object embedded as is, not a string holding
JSON, so ``zcat segment | jq .data.stream_id`` works. The same bytes for the
same entries (fixed ``mtime``), so writing a segment twice is harmless.

Keys
----
``<prefix><first id>_<last id>.jsonl.gz`` with both ids written as
``<ms>-<seq>``, each part zero-padded to 20 digits (any 64-bit value), e.g.
``cefmp4-events/00000001700000000000-00000000000000000000_000...-...0041.jsonl.gz``.
Fixed width makes the lexicographic order S3 lists in the order of first
ids (then last ids), and the last id in the name lets a reader skip a
segment, and the archiver learn how far the archive goes, from the listing
alone, without fetching anything.

Entry ids
---------
Compared as ``(ms, seq)`` integer pairs (:func:`parse_id`), the order Redis
gives them. :func:`fresh` is the one place that drops what was already seen:
entries must come out strictly increasing, each id once, however segments
(or an archive and the live log) overlap.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterable, Mapping

import msgspec

from cefmp4.domain.entryids import EntryId, format_id, parse_id

SEGMENT_SUFFIX = ".jsonl.gz"
COMPRESS_LEVEL = 6
_ID_DIGITS = 20
_PADDED_ID = rf"(\d{{{_ID_DIGITS}}})-(\d{{{_ID_DIGITS}}})"
_SEGMENT_NAME = re.compile(rf"{_PADDED_ID}_{_PADDED_ID}{re.escape(SEGMENT_SUFFIX)}")


class RawEntry(msgspec.Struct, frozen=True):
    """One log entry as stored, ``data`` undecoded (see the module docstring)."""

    id: str
    type: str
    v: int
    replica: str
    data: msgspec.Raw


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(RawEntry)
_raw_decoder = msgspec.json.Decoder(msgspec.Raw)
_any_decoder = msgspec.json.Decoder()


# -- entry ids -----------------------------------------------------------------


def fresh(entries: Iterable[RawEntry], after: EntryId) -> tuple[list[RawEntry], EntryId]:
    """The entries with an id greater than ``after`` and than every entry
    before them (so strictly increasing, each id once), and the new ``after``."""
    kept: list[RawEntry] = []
    for entry in entries:
        entry_id = parse_id(entry.id)
        if entry_id > after:
            kept.append(entry)
            after = entry_id
    return kept, after


# -- entries -------------------------------------------------------------------


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode(errors="replace")


def raw_entry(entry_id: str, fields: Mapping[bytes, bytes]) -> RawEntry:
    """The :class:`RawEntry` for a stream entry's fields; never raises."""
    data = fields.get(b"data", b"")
    try:
        _raw_decoder.decode(data)  # validates the JSON without building objects
    except msgspec.DecodeError:
        data = _encoder.encode(_text(data))
    else:
        data = data.strip(b" \t\r\n")  # JSON whitespace: a reader's Raw would not keep it
        if b"\n" in data:
            data = _encoder.encode(_any_decoder.decode(data))
    try:
        version = int(fields.get(b"v", b"0"))
    except ValueError:
        version = 0
    return RawEntry(
        entry_id,
        _text(fields.get(b"type")),
        version,
        _text(fields.get(b"replica")),
        msgspec.Raw(data),
    )


def encode_lines(entries: Iterable[RawEntry]) -> bytes:
    """JSON lines, one entry per line (also the ``cefmp4 events --json`` output)."""
    return _encoder.encode_lines(list(entries))


# -- segments ------------------------------------------------------------------


def encode_segment(entries: Iterable[RawEntry]) -> bytes:
    return gzip.compress(encode_lines(entries), compresslevel=COMPRESS_LEVEL, mtime=0)


def decode_segment(body: bytes) -> list[RawEntry]:
    """Inverse of :func:`encode_segment` (msgspec.DecodeError or OSError if damaged)."""
    return _decoder.decode_lines(gzip.decompress(body))


def _padded(entry_id: str) -> str:
    ms, seq = parse_id(entry_id)
    return f"{ms:0{_ID_DIGITS}d}-{seq:0{_ID_DIGITS}d}"


def segment_key(prefix: str, first_id: str, last_id: str) -> str:
    """The object key of the segment holding ``first_id`` .. ``last_id``."""
    return f"{prefix}{_padded(first_id)}_{_padded(last_id)}{SEGMENT_SUFFIX}"


def parse_segment_key(prefix: str, key: str) -> tuple[str, str] | None:
    """``(first_id, last_id)`` of a segment key; None for any other key."""
    if not key.startswith(prefix):
        return None
    match = _SEGMENT_NAME.fullmatch(key, len(prefix))
    if match is None:
        return None
    a, b, c, d = (int(part) for part in match.groups())
    return format_id((a, b)), format_id((c, d))
