"""Real MP4 fixtures and simulators of how recorders write them.

Two halves:

* **Sources** (synchronous, ffmpeg via subprocess): ``make_mp4`` encodes a
  real H.264 + AAC recording (``testsrc`` video, ``sine`` audio) in the
  regular, faststart or fragmented layout, optionally with a high bitrate on
  seeded noise so a file of roughly ``size_hint_mb`` MiB appears in well under
  a second. Every flag that would embed something variable is pinned
  (``+bitexact``, a fixed noise seed), so the same call gives the same bytes.
  A missing ffmpeg raises: a test suite that silently skips its only real
  media is worse than a red one.

* **Recorder simulators** (async): each opens ``dst`` once and writes into it
  the way a family of real recorders does, flushing after every write so an
  observer sees each step, and sleeping ``delay`` between chunks. File I/O
  runs in a worker thread (``asyncio.to_thread``) because a real recorder is
  another process: the service under test shares this event loop and must
  keep running, and observing, while a big write is in flight.

  ``record_mdat_patch``
      OBS / NVR style: the mdat size field is written as 0, the payload is
      appended, and the real size is patched back in place at the end.
  ``record_faststart``
      ffmpeg ``+faststart``: the regular file is appended, looks finished,
      and is then rewritten in place from offset 0 with ``moov`` first.
  ``record_append``
      Plain append of already final bytes.
  ``truncate_and_rewrite``
      A recorder restarting under the same name: ``O_TRUNC`` then new bytes.

Layout observed with ffmpeg 5.1 (what the simulators reproduce): the regular
file is ``ftyp(32) free(8) mdat moov``, so the mdat header sits at offset 40
and the 8-byte ``free`` is the reserve ffmpeg turns into a 64-bit mdat header
when the payload passes 4 GiB. Faststart is ``ftyp moov free mdat``: the same
length as the regular file, but every byte after ``ftyp`` changes.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

import msgspec

from cefmp4.domain.mp4 import Box, iter_child_boxes, iter_top_level_boxes

MIB = 1024 * 1024

# x264 "ultrafast" on full-entropy noise overshoots its bitrate target by
# about a quarter, so aim low to land near the requested size.
_BITRATE_OVERSHOOT = 1.25
_FFMPEG_TIMEOUT_S = 60.0


def ffmpeg_path() -> str:
    """Path of ffmpeg, or RuntimeError: tests must fail, not skip, without it."""
    found = shutil.which("ffmpeg")
    if found is None:
        raise RuntimeError("ffmpeg is not on PATH; install it (apt-get install -y ffmpeg)")
    return found


def _run_ffmpeg(args: list[str]) -> None:
    cmd = [ffmpeg_path(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True, timeout=_FFMPEG_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"ffmpeg failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stderr.decode(errors='replace')}"
        )


_BITEXACT = ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact"]


def _ffmpeg_args(
    dst: Path, *, seconds: float, faststart: bool, fragmented: bool, size_hint_mb: float | None
) -> list[str]:
    """The ffmpeg argument list for ``make_mp4`` (pure, so it can be inspected)."""
    if faststart and fragmented:
        raise ValueError("faststart and fragmented are mutually exclusive")
    if seconds <= 0:
        raise ValueError("seconds must be positive")
    if size_hint_mb is None:
        video_in = "testsrc=size=320x240:rate=25"
        rate: list[str] = []
    else:
        # Noise defeats compression, so the bitrate, not the content, sets the
        # size; 720p leaves headroom up to ~300 Mbit/s before x264 saturates.
        video_in = "testsrc=size=1280x720:rate=25,noise=alls=100:allf=t+u:all_seed=12345"
        bps = int(size_hint_mb * MIB * 8 / seconds / _BITRATE_OVERSHOOT)
        rate = ["-b:v", str(bps), "-maxrate", str(bps), "-bufsize", str(bps)]
    movflags: list[str] = []
    if faststart:
        movflags = ["-movflags", "+faststart"]
    elif fragmented:
        movflags = ["-movflags", "frag_keyframe+empty_moov"]
    return [
        *("-f", "lavfi", "-i", video_in),
        *("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"),
        *("-t", f"{seconds:.3f}", "-map", "0:v", "-map", "1:a"),
        # A keyframe every second gives fragmented output several fragments.
        *("-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-pix_fmt", "yuv420p"),
        *rate,
        *("-c:a", "aac", "-b:a", "64k"),
        *_BITEXACT,
        *movflags,
        str(dst),
    ]


def make_mp4(
    dst: Path,
    *,
    seconds: float,
    faststart: bool = False,
    fragmented: bool = False,
    size_hint_mb: float | None = None,
) -> Path:
    """Encode a real H.264 + AAC MP4 into ``dst`` and return ``dst``."""
    _run_ffmpeg(
        _ffmpeg_args(
            dst,
            seconds=seconds,
            faststart=faststart,
            fragmented=fragmented,
            size_hint_mb=size_hint_mb,
        )
    )
    return dst


def _remux_faststart_args(src: Path, dst: Path) -> list[str]:
    return ["-i", str(src), "-map", "0", "-c", "copy", *_BITEXACT, "-movflags", "+faststart",
            str(dst)]  # fmt: skip


def remux_faststart(src: Path, dst: Path) -> Path:
    """Write the faststart version of ``src`` (stream copy) to ``dst``."""
    _run_ffmpeg(_remux_faststart_args(src, dst))
    return dst


class Mp4Sources(msgspec.Struct, frozen=True):
    """The generated recordings a test session shares."""

    regular: Path  # ftyp free mdat moov
    faststart: Path  # the same recording remuxed: ftyp moov free mdat
    fragmented: Path  # ftyp moov(mvex) (moof mdat)* mfra
    large: Path  # regular layout, ~12 MiB: spans several 5 MiB parts


def build_sources(root: Path) -> Mp4Sources:
    """Generate every shared source under ``root`` (a session temp dir)."""
    root.mkdir(parents=True, exist_ok=True)
    regular = make_mp4(root / "regular.mp4", seconds=2)
    return Mp4Sources(
        regular=regular,
        faststart=remux_faststart(regular, root / "faststart.mp4"),
        fragmented=make_mp4(root / "fragmented.mp4", seconds=3, fragmented=True),
        large=make_mp4(root / "large.mp4", seconds=2, size_hint_mb=12),
    )


def chunk_offset_entries(buf: bytes | bytearray) -> list[tuple[int, int]]:
    """``(file position, width)`` of every stco/co64 entry, for mutation tests."""
    entries: list[tuple[int, int]] = []
    level: list[Box] = [b for b in iter_top_level_boxes(buf) if b.type == "moov"]
    for name in ("moov", "trak", "mdia", "minf", "stbl"):
        level = [c for p in level if p.type == name for c in iter_child_boxes(buf, p)]
    for table in level:
        if table.type not in ("stco", "co64"):
            continue
        width = 8 if table.type == "co64" else 4
        (count,) = struct.unpack_from(">I", buf, table.payload_offset + 4)
        first = table.payload_offset + 8
        entries.extend((first + i * width, width) for i in range(count))
    return entries


def mdat_size_fields(buf: bytes | bytearray) -> list[tuple[int, bytes]]:
    """``(position, bytes)`` of each top-level mdat's size field as finally written."""
    fields: list[tuple[int, bytes]] = []
    for box in iter_top_level_boxes(buf):
        if box.type != "mdat":
            continue
        # With a 64-bit largesize the 32-bit field stays 1 and the patch goes
        # into the 8 bytes after the type, as ffmpeg does past 4 GiB.
        start, width = (box.offset + 8, 8) if box.header_size >= 16 else (box.offset, 4)
        fields.append((start, bytes(buf[start : start + width])))
    return fields


class _Sink:
    """The recorder's open file. Every method blocks; call via asyncio.to_thread."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    @classmethod
    def create(cls, path: Path) -> _Sink:
        """Open ``path`` like a recorder does: created or truncated (O_TRUNC)."""
        # Closed by _Sink.close, which every simulator calls in a finally.
        return cls(open(path, "wb"))

    def write(self, data: bytes | memoryview, offset: int | None = None) -> None:
        if offset is not None:
            self._f.seek(offset)
        self._f.write(data)
        # Flush so an observer polling the file sees every step of the pattern.
        self._f.flush()

    def truncate(self, size: int) -> None:
        self._f.truncate(size)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


async def _write_chunks(
    sink: _Sink, data: bytes | bytearray, *, offset: int, chunk: int, delay: float
) -> None:
    """Write ``data`` at ``offset`` in ``chunk``-sized pieces, sleeping in between."""
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        await asyncio.to_thread(sink.write, view[start : start + chunk], offset + start)
        # sleep(0) still yields, so observers get a turn even at full speed.
        await asyncio.sleep(delay)


async def record_mdat_patch(
    src: Path,
    dst: Path,
    *,
    chunk: int,
    delay: float,
    before_patch: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Write ``src`` with every mdat size zeroed, then patch the sizes back in place.

    ``before_patch`` runs once everything else is on disk and only the size
    patch is missing: the state a crash of the recorder would leave behind.
    """
    final = await asyncio.to_thread(src.read_bytes)
    fields = mdat_size_fields(final)
    if not fields:
        raise ValueError(f"{src} has no mdat box to patch")
    placeholder = bytearray(final)
    for pos, real in fields:
        placeholder[pos : pos + len(real)] = bytes(len(real))
    sink = await asyncio.to_thread(_Sink.create, dst)
    try:
        await _write_chunks(sink, placeholder, offset=0, chunk=chunk, delay=delay)
        if before_patch is not None:
            await before_patch()
        for pos, real in fields:
            await asyncio.to_thread(sink.write, real, pos)
    finally:
        await asyncio.to_thread(sink.close)


async def _remux_faststart_async(src: Path, dst: Path) -> None:
    cmd = [ffmpeg_path(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
           *_remux_faststart_args(src, dst)]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), _FFMPEG_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg faststart remux failed: {stderr.decode(errors='replace')}")


async def record_faststart(
    src_regular: Path,
    dst: Path,
    *,
    chunk: int,
    delay: float,
    faststart_version: Path | None = None,
    rewrite_delay: float = 0.0,
) -> None:
    """Append the regular file, then rewrite it in place from offset 0 with moov first.

    The faststart bytes come from ``faststart_version`` when given (cheap and
    shared in tests), otherwise from an ffmpeg stream-copy remux. The rewrite
    goes through the same handle, as ffmpeg's second pass does, at full speed
    by default (``rewrite_delay``); the file is then cut to the new length in
    case the rewritten layout is shorter.
    """
    regular = await asyncio.to_thread(src_regular.read_bytes)
    sink = await asyncio.to_thread(_Sink.create, dst)
    try:
        await _write_chunks(sink, regular, offset=0, chunk=chunk, delay=delay)
        if faststart_version is not None:
            rewritten = await asyncio.to_thread(faststart_version.read_bytes)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                remuxed = Path(tmp) / "faststart.mp4"
                await _remux_faststart_async(src_regular, remuxed)
                rewritten = await asyncio.to_thread(remuxed.read_bytes)
        await _write_chunks(sink, rewritten, offset=0, chunk=chunk, delay=rewrite_delay)
        if len(rewritten) < len(regular):
            await asyncio.to_thread(sink.truncate, len(rewritten))
    finally:
        await asyncio.to_thread(sink.close)


async def record_append(src: Path, dst: Path, *, chunk: int, delay: float) -> None:
    """Append ``src`` to a fresh ``dst`` in chunks: the simplest growing file."""
    data = await asyncio.to_thread(src.read_bytes)
    sink = await asyncio.to_thread(_Sink.create, dst)
    try:
        await _write_chunks(sink, data, offset=0, chunk=chunk, delay=delay)
    finally:
        await asyncio.to_thread(sink.close)


async def truncate_and_rewrite(
    src: Path, dst: Path, *, chunk: int | None = None, delay: float = 0.0
) -> None:
    """Open ``dst`` with O_TRUNC (a restarting recorder) and write ``src`` into it.

    All at once by default; with ``chunk`` the new content grows like
    ``record_append``, starting from an emptied file.
    """
    data = await asyncio.to_thread(src.read_bytes)
    sink = await asyncio.to_thread(_Sink.create, dst)
    try:
        await _write_chunks(sink, data, offset=0, chunk=chunk or max(len(data), 1), delay=delay)
    finally:
        await asyncio.to_thread(sink.close)


# -- writers that say when they are done (the close fast path) ------------


def strip_mfra(data: bytes) -> bytes:
    """A fragmented recording without its closing ``mfra`` (``+skip_trailer``,
    or a recorder that never writes one): the fragments only."""
    mfra = [b for b in iter_top_level_boxes(data) if b.type == "mfra"]
    if not mfra:
        raise ValueError("no mfra box to strip")
    return data[: mfra[-1].offset]


async def record_reopen_append(pieces: list[bytes], dst: Path, *, delay: float = 0.0) -> None:
    """An append-per-chunk recorder: for each piece open ``dst`` for append,
    write it, close (each close is an IN_CLOSE_WRITE), then sleep ``delay``.
    The first piece creates (truncates) the file."""

    def append(piece: bytes, mode: str) -> None:
        with dst.open(mode) as f:
            f.write(piece)

    for n, piece in enumerate(pieces):
        await asyncio.to_thread(append, piece, "wb" if n == 0 else "ab")
        await asyncio.sleep(delay)


async def record_then_rename(src: Path, dst: Path, *, chunk: int, delay: float) -> None:
    """Write into a hidden temp name next to ``dst`` (which the service
    ignores), then rename it into place: IN_MOVED_TO, no close of ``dst``."""
    tmp = dst.with_name(f".{dst.name}.part")
    await record_append(src, tmp, chunk=chunk, delay=delay)
    await asyncio.to_thread(tmp.rename, dst)
