"""Is this MP4 finished? A pure, structural answer.

Recorders write MP4s in ways that make "the file stopped growing" a poor signal
of "the file is done": OBS and most NVRs write ``mdat`` with a size of 0 and
patch the real size back near offset 40 at the very end; ffmpeg's
``+faststart`` rewrites the whole file in place after it looks finished;
fragmented recorders append ``moof``/``mdat`` pairs forever. The uploader
therefore asks this module whether the bytes on disk form a *structurally
complete* MP4 before it finishes a stream after the short settle time.

Verdicts (``Mp4Status``)
    COMPLETE
        The top-level boxes tile the file exactly, there is exactly one
        ``moov``, its children (and the ``trak/mdia/minf/stbl`` path below
        them) tile their parents exactly, and every chunk offset in every
        ``stco``/``co64`` points into the payload of some top-level ``mdat``.
    FRAGMENTED
        A top-level ``moof``/``mfra``, or a ``moov`` that announces fragments
        with an ``mvex`` child. Such a file is playable at every fragment
        boundary and there is no "final patch" to wait for, so completeness is
        unknowable from the bytes; the caller finishes on its idle timeout.
        The ``mvex`` rule matters: ``empty_moov`` output starts with a moov
        that has no chunk offsets at all and would otherwise look complete.
    INCOMPLETE
        Started like an MP4 but is not (yet) consistent: a box of size 0 (the
        recorder has not patched it), a box running past the end of the file,
        no ``moov`` yet, a ``moov`` whose insides do not add up, offsets
        pointing outside every ``mdat``. Anything inconsistent *after* a
        plausible first box lands here rather than in INVALID, because a
        recorder in the middle of an in-place rewrite produces exactly such
        states, and waiting costs only time (the idle timeout still ends it).
    INVALID
        The file does not even start like an MP4: the first box header is not
        a known top-level box type with a sane size (random bytes, text, an
        MPEG-TS file). A file shorter than one header is INVALID only if no
        extension of it could be a plausible header; otherwise INCOMPLETE.

Finished when closed (``complete_when_closed``)
    When the writer closed the file (inotify's IN_CLOSE_WRITE, or a rename
    into place), a COMPLETE file is done, and so is a FRAGMENTED one that
    ends with a whole ``mfra`` (movie fragment random access) box: writers
    put it last, once, when they finish, and its closing ``mfro`` box repeats
    the ``mfra``'s size, so a matching pair cannot be a fragment in flight.
    A fragmented file without ``mfra`` stays unknowable and goes by the idle
    timeout. ``ends_with_mfra`` is separate from ``check_structure`` so the
    verdicts (and the settle rule built on them) are unchanged.

What this check cannot see: a payload rewritten in place under an unchanged,
already consistent box tree (the tail end of a faststart rewrite). The settle
time, during which the file must not change, covers that.

Design constraints
    * ``check_structure`` is pure and touches its input only through ``len()``
      and slicing, reading box headers and the ``stco``/``co64`` tables only,
      so a multi-gigabyte recording is never copied.
    * It never raises on any input, never loops forever (every step advances
      by at least one header), and does not recurse (the path to ``stco`` has
      a fixed depth).
    * There is no I/O here: ``cefmp4.adapters.mp4files`` reads a file with
      ``os.pread`` behind the same slicing interface (``Source``) instead of
      ``mmap``: a recorder that restarts
      with ``O_TRUNC`` while a mapping is live turns the next page access into
      SIGBUS, which kills the whole service, whereas a short ``pread`` simply
      reads as "the file shrank" and yields INCOMPLETE.
"""

from __future__ import annotations

import enum
import mmap
import struct
from collections.abc import Iterator
from typing import Protocol

import msgspec

__all__ = [
    "Box",
    "Mp4Status",
    "Mp4Verdict",
    "Source",
    "check_structure",
    "complete_when_closed",
    "ends_with_mfra",
    "iter_child_boxes",
    "iter_top_level_boxes",
]


class Mp4Status(enum.StrEnum):
    """How far along a recording is, judged by its box structure."""

    COMPLETE = "complete"  # safe to finish after the short settle time
    INCOMPLETE = "incomplete"  # recorder still writing / header not patched yet
    FRAGMENTED = "fragmented"  # moof/mfra present: completeness unknown, finish on idle timeout
    INVALID = "invalid"  # not an ISO-BMFF/MP4 at all (garbage, text, ...)


class Mp4Verdict(msgspec.Struct, frozen=True):
    """A status plus a short human-readable reason ("" when complete)."""

    status: Mp4Status
    reason: str


class Box(msgspec.Struct, frozen=True):
    """One parsed box: where it sits and how big its header is."""

    type: str  # the four type bytes decoded as latin-1, e.g. "moov"
    offset: int  # absolute offset of the box header in the buffer
    size: int  # whole box including header (largesize already resolved)
    header_size: int  # 8, 16 with largesize, +16 for "uuid" extended types

    @property
    def payload_offset(self) -> int:
        return self.offset + self.header_size

    @property
    def end(self) -> int:
        return self.offset + self.size


class Source(Protocol):
    """What the checker needs from a buffer: a length and slices. A slice
    may come back short (a file that shrank under a reader): the checks then
    answer as for a file that is not finished, never raise."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: slice, /) -> bytes | bytearray | memoryview: ...


class _Shrunk(Exception):
    """A slice came back short: the file shrank under us (pread source only)."""


class _Fault(msgspec.Struct, frozen=True):
    """Why a run of boxes does not tile its parent."""

    reason: str


# First-box vetting. A text file's first eight bytes are printable too ("Hell" +
# "o wo"), so printable alone is not enough; the first box must be one that
# real MP4/MOV files start with. ftyp/styp are small, so a huge one is garbage.
_FIRST_BOX_TYPES = (
    b"ftyp",
    b"styp",
    b"moov",
    b"mdat",
    b"free",
    b"skip",
    b"wide",
    b"pnot",
    b"pdin",
    b"uuid",
    b"sidx",
    b"moof",
    b"meta",
)
_BRAND_BOXES = (b"ftyp", b"styp")
_MAX_BRAND_BOX = 64 * 1024
_STBL_PATH = ("trak", "mdia", "minf", "stbl")


def _read(src: Source, start: int, stop: int) -> bytes:
    """Copy ``src[start:stop]`` (always small), insisting on every byte."""
    piece = bytes(src[start:stop])
    if len(piece) != stop - start:
        raise _Shrunk
    return piece


def _printable(raw: bytes) -> bool:
    return all(0x20 <= c <= 0x7E for c in raw)


def _header_size(box_type: bytes, largesize: bool) -> int:
    return (16 if largesize else 8) + (16 if box_type == b"uuid" else 0)


def _parse_box(src: Source, offset: int, end: int, *, top_level: bool) -> Box | _Fault:
    """Parse the box header at ``offset`` and check the box fits before ``end``."""
    if end - offset < 8:
        return _Fault(f"truncated box header at offset {offset}")
    size, raw_type = struct.unpack(">I4s", _read(src, offset, offset + 8))
    name = raw_type.decode("latin-1")
    if not _printable(raw_type):
        return _Fault(f"implausible box type {raw_type!r} at offset {offset}")
    if size == 0:
        # Legal ISO-BMFF ("extends to end of file"), but in a recording it means
        # the writer has not patched the real size back yet.
        if top_level:
            return _Fault(f"{name} box has size 0 (not patched yet)")
        return _Fault(f"{name} box at offset {offset} has size 0 inside a container")
    largesize = size == 1
    hsize = _header_size(raw_type, largesize)
    if end - offset < hsize:
        return _Fault(f"truncated {name} box header at offset {offset}")
    if largesize:
        (size,) = struct.unpack(">Q", _read(src, offset + 8, offset + 16))
    if size < hsize:
        return _Fault(f"{name} box at offset {offset} has impossible size {size}")
    if offset + size > end:
        where = "end of file" if top_level else "its parent"
        return _Fault(
            f"{name} box at offset {offset} runs past {where} "
            f"(needs {size} bytes, {end - offset} available)"
        )
    return Box(type=name, offset=offset, size=size, header_size=hsize)


def _tile(src: Source, start: int, end: int, *, top_level: bool) -> tuple[list[Box], _Fault | None]:
    """Boxes laid end to end over ``[start, end)``, plus the first reason they don't fit.

    Terminates: each accepted box advances ``offset`` by ``size >= 8``.
    """
    boxes: list[Box] = []
    offset = start
    while offset < end:
        parsed = _parse_box(src, offset, end, top_level=top_level)
        if isinstance(parsed, _Fault):
            return boxes, parsed
        boxes.append(parsed)
        offset = parsed.end
    return boxes, None


def _plausible_first_size(box_type: bytes, size: int, largesize: int | None) -> bool:
    """Could a first box of this type have this size? ``largesize`` None = not read yet."""
    if box_type in _BRAND_BOXES:
        return 16 <= size <= _MAX_BRAND_BOX
    if size == 1:
        return largesize is None or largesize >= _header_size(box_type, True)
    return size == 0 or size >= _header_size(box_type, False)


def _first_box_invalid(src: Source, n: int) -> Mp4Verdict | None:
    """INVALID if the file cannot be the start of an MP4, else None.

    A header prefix shorter than 8 (or 16 for largesize) bytes is judged by
    whether *some* completion of it would be plausible.
    """
    head = _read(src, 0, min(n, 16))
    raw_type = head[4:8]
    candidates = [t for t in _FIRST_BOX_TYPES if t.startswith(raw_type)]
    if not candidates:
        return Mp4Verdict(
            Mp4Status.INVALID, f"does not start with an MP4 box (first type {raw_type!r})"
        )
    if len(head) < 4:
        return None
    (size,) = struct.unpack(">I", head[:4])
    largesize: int | None = None
    if size == 1 and len(head) >= 16:
        (largesize,) = struct.unpack(">Q", head[8:16])
    if any(_plausible_first_size(cand, size, largesize) for cand in candidates):
        return None
    return Mp4Verdict(
        Mp4Status.INVALID, f"first box {raw_type!r} has implausible size {largesize or size}"
    )


def _fragment_reason(src: Source, boxes: list[Box]) -> str | None:
    """Why these top-level boxes belong to a fragmented file, or None."""
    for box in boxes:
        if box.type in ("moof", "mfra"):
            return f"top-level {box.type} box at offset {box.offset}"
        if box.type == "moov":
            children, fault = _tile(src, box.payload_offset, box.end, top_level=False)
            if fault is None and any(c.type == "mvex" for c in children):
                return "moov announces movie fragments (mvex)"
    return None


def _chunk_offset_tables(src: Source, moov: Box) -> tuple[list[Box], _Fault | None]:
    """All stco/co64 boxes on moov/trak/mdia/minf/stbl, requiring each level to tile."""
    level, fault = _tile(src, moov.payload_offset, moov.end, top_level=False)
    if fault is not None:
        return [], _Fault(f"moov: {fault.reason}")
    for name in _STBL_PATH:
        below: list[Box] = []
        for parent in (b for b in level if b.type == name):
            children, fault = _tile(src, parent.payload_offset, parent.end, top_level=False)
            if fault is not None:
                return [], _Fault(f"{name}: {fault.reason}")
            below.extend(children)
        level = below
    return [b for b in level if b.type in ("stco", "co64")], None


def _offsets_outside(src: Source, table: Box, mdats: list[tuple[int, int]]) -> str | None:
    """Why ``table``'s chunk offsets are not all inside an mdat payload, or None."""
    width = 8 if table.type == "co64" else 4
    body = table.payload_offset
    if table.end - body < 8:
        return f"{table.type} at offset {table.offset} is too short"
    (count,) = struct.unpack(">I", _read(src, body + 4, body + 8))
    if count * width > table.end - body - 8:
        return f"{table.type} at offset {table.offset} claims {count} entries that do not fit"
    if count == 0:
        return None
    if not mdats:
        return "chunk offsets present but no mdat box"
    offsets = struct.unpack(
        f">{count}{'Q' if width == 8 else 'I'}", _read(src, body + 8, body + 8 + count * width)
    )
    if len(mdats) == 1:
        # The common case (one mdat): two comparisons instead of one per chunk.
        lo, hi = mdats[0]
        bad = [o for o in (min(offsets), max(offsets)) if not lo <= o < hi]
    else:
        bad = [o for o in offsets if not any(lo <= o < hi for lo, hi in mdats)]
    if bad:
        return f"{table.type} chunk offset {bad[0]} lies outside every mdat payload"
    return None


def _check(src: Source) -> Mp4Verdict:
    n = len(src)
    if n == 0:
        return Mp4Verdict(Mp4Status.INCOMPLETE, "empty file")
    invalid = _first_box_invalid(src, n)
    if invalid is not None:
        return invalid
    boxes, fault = _tile(src, 0, n, top_level=True)
    # Fragments win over truncation: a growing fragmented file is always
    # "truncated", and the caller must treat it by idle timeout either way.
    fragmented = _fragment_reason(src, boxes)
    if fragmented is not None:
        return Mp4Verdict(Mp4Status.FRAGMENTED, fragmented)
    if fault is not None:
        return Mp4Verdict(Mp4Status.INCOMPLETE, fault.reason)
    moovs = [b for b in boxes if b.type == "moov"]
    if not moovs:
        return Mp4Verdict(Mp4Status.INCOMPLETE, "no moov box yet")
    if len(moovs) > 1:
        return Mp4Verdict(Mp4Status.INCOMPLETE, f"{len(moovs)} moov boxes")
    tables, fault = _chunk_offset_tables(src, moovs[0])
    if fault is not None:
        return Mp4Verdict(Mp4Status.INCOMPLETE, fault.reason)
    mdats = [(b.payload_offset, b.end) for b in boxes if b.type == "mdat"]
    for table in tables:
        outside = _offsets_outside(src, table, mdats)
        if outside is not None:
            return Mp4Verdict(Mp4Status.INCOMPLETE, outside)
    return Mp4Verdict(Mp4Status.COMPLETE, "")


def _as_bytes_view(
    buf: bytes | bytearray | memoryview | mmap.mmap | Source,
) -> bytes | bytearray | memoryview | mmap.mmap | Source:
    """Make ``len()`` and slices count bytes even for a typed memoryview."""
    if isinstance(buf, memoryview) and (buf.ndim != 1 or buf.itemsize != 1):
        # cast() needs a C-contiguous view; a strided one is rare enough to copy.
        return buf.cast("B") if buf.c_contiguous else memoryview(buf.tobytes())
    return buf


def check_structure(buf: bytes | bytearray | memoryview | mmap.mmap | Source) -> Mp4Verdict:
    """Judge ``buf`` (a whole file's bytes, a view of them, or a ``Source``
    over the file: ``cefmp4.adapters.mp4files``). Pure; never raises."""
    try:
        return _check(_as_bytes_view(buf))
    except _Shrunk:  # only a Source over a file can come back short
        return Mp4Verdict(Mp4Status.INCOMPLETE, "file shrank while being checked")


def iter_top_level_boxes(buf: bytes | bytearray | memoryview | mmap.mmap) -> Iterator[Box]:
    """Yield the top-level boxes from offset 0 while they tile the buffer.

    Stops silently at the first box that does not fit (truncated, size 0,
    implausible header); use ``check_structure`` to learn why.
    """
    try:
        view = _as_bytes_view(buf)
        boxes, _ = _tile(view, 0, len(view), top_level=True)
    except _Shrunk:
        return
    yield from boxes


def iter_child_boxes(buf: bytes | bytearray | memoryview | mmap.mmap, parent: Box) -> Iterator[Box]:
    """Yield the children of a container box while they tile its payload."""
    try:
        boxes, _ = _tile(_as_bytes_view(buf), parent.payload_offset, parent.end, top_level=False)
    except _Shrunk:
        return
    yield from boxes


# -- finished when closed -------------------------------------------------

_MFRO_SIZE = 16  # full box: header, version + flags, the mfra size


def _ends_with_mfra(src: Source) -> bool:
    boxes, fault = _tile(src, 0, len(src), top_level=True)
    if fault is not None or not boxes or boxes[-1].type != "mfra":
        return False
    mfra = boxes[-1]
    children, fault = _tile(src, mfra.payload_offset, mfra.end, top_level=False)
    if fault is not None or not children:
        return False
    mfro = children[-1]
    if mfro.type != "mfro" or mfro.size != _MFRO_SIZE or mfro.header_size != 8:
        return False
    (announced,) = struct.unpack(">I", _read(src, mfro.offset + 12, mfro.offset + 16))
    return bool(announced == mfra.size)


def ends_with_mfra(buf: bytes | bytearray | memoryview | mmap.mmap | Source) -> bool:
    """The top-level boxes tile ``buf`` and the last is an ``mfra`` whose
    children tile it and end with an ``mfro`` naming the ``mfra``'s size.
    Pure; never raises."""
    try:
        return _ends_with_mfra(_as_bytes_view(buf))
    except _Shrunk:
        return False


def complete_when_closed(verdict: Mp4Verdict, mfra: bool) -> bool:
    """Is a file the writer closed finished? ``verdict`` is its
    ``check_structure``, ``mfra`` its ``ends_with_mfra``."""
    if verdict.status is Mp4Status.COMPLETE:
        return True
    return verdict.status is Mp4Status.FRAGMENTED and mfra
