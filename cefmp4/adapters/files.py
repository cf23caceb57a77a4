"""The file system edge: look at, stat and read byte ranges of recordings.

Paths come in wire form (``cefmp4.domain.pathnames``) and are turned back into the
file system's bytes here, so nothing above this module handles raw names.

OS errors are translated into what they mean for a stream: gone (the watcher
will report the deletion), unreadable (a permanent failure of the stream), or
changed under us (a short read: the file shrank; the watcher will report it).
Reads use ``pread``/``preadv`` on a fresh descriptor so concurrent part reads of
one file need no shared offset; ``read_into`` fills a caller's (reused) buffer,
so reading a part allocates nothing.

Nothing here blocks on a special file: ``look`` and ``stat`` only stat, and
``read_range`` opens with ``O_NONBLOCK`` (a path that raced into a FIFO opens
at once instead of waiting for a writer) and refuses what ``fstat`` of the
open descriptor says is not a regular file, before reading a byte.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat as statmod

import msgspec

from cefmp4.domain import filerules
from cefmp4.domain.errors import CefError, PermanentError
from cefmp4.domain.filerules import FileStat
from cefmp4.domain.pathnames import to_fs

_GONE = (FileNotFoundError, NotADirectoryError)


class FileGone(CefError):
    """The file no longer exists."""


class FileUnreadable(PermanentError):
    reason = "unreadable"


class FileShrank(CefError):
    """Fewer bytes than expected: the file was truncated while we read it."""


class Skipped(msgspec.Struct, frozen=True):
    """A path the watcher will not read (``cefmp4.domain.filerules``), and why."""

    reason: filerules.SkipReason
    detail: str = ""


def _error(path: str, what: str, exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "E?")
    return f"cannot {what} {path}: [{name}] {exc.strerror or exc}"


def _kind(mode: int) -> filerules.Kind:
    if statmod.S_ISREG(mode):
        return "regular"
    if statmod.S_ISDIR(mode):
        return "directory"
    return "special"


def _inside(real: bytes, root: bytes) -> bool:
    return real == root or real.startswith(root.rstrip(b"/") + b"/")


def look(path: str, root: bytes, follow: filerules.FollowSymlinks) -> FileStat | Skipped | None:
    """What the watcher sees at ``path``: a recording's stat, a path it must
    skip, or None (nothing there, or a directory). ``root`` is WATCH_DIR,
    resolved, as bytes. Blocking (stat and realpath, never an open)."""
    fs = to_fs(path)
    try:
        st = os.lstat(fs)
        via_link = statmod.S_ISLNK(st.st_mode)
        if via_link:
            st = os.stat(fs)  # the target: a dangling link is "nothing there"
        real = os.path.realpath(fs)
    except _GONE:
        return None
    except OSError as exc:  # EACCES on a directory, ELOOP, EIO, ENAMETOOLONG ...
        raise FileUnreadable(_error(path, "stat", exc)) from exc
    # A directory on the way may be the link (the walk never descends into
    # one, but a notification or an old record may name such a path).
    via_link = via_link or real != os.path.abspath(fs)
    decision = filerules.admit(
        _kind(st.st_mode), via_link=via_link, inside=_inside(real, root), follow=follow
    )
    match decision:
        case filerules.Skip(reason=reason):
            return Skipped(reason, os.fsdecode(real) if via_link else "")
        case filerules.Ignore():
            return None
    return FileStat(st.st_size, st.st_mtime_ns, st.st_ino)


def stat(path: str) -> FileStat | None:
    """Stat ``path`` (following links); None when it does not exist (or is
    not a regular file)."""
    try:
        st = os.stat(to_fs(path))
    except _GONE:
        return None
    except OSError as exc:
        raise FileUnreadable(_error(path, "stat", exc)) from exc
    if not statmod.S_ISREG(st.st_mode):
        return None
    return FileStat(st.st_size, st.st_mtime_ns, st.st_ino)


def open_regular(path: str) -> int:
    """A read-only descriptor of the regular file at ``path``, never blocking
    (``O_NONBLOCK``: a FIFO opens at once and is refused by ``fstat``)."""
    try:
        fd = os.open(to_fs(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except _GONE as exc:
        raise FileGone(path) from exc
    except OSError as exc:  # EACCES, EISDIR, ENXIO (a socket), ELOOP ...
        raise FileUnreadable(_error(path, "open", exc)) from exc
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise FileUnreadable(_error(path, "stat", exc)) from exc
    if not statmod.S_ISREG(mode):
        os.close(fd)
        raise FileUnreadable(f"cannot read {path}: not a regular file")
    return fd


def read_range(path: str, offset: int, size: int) -> bytes:
    """Exactly ``size`` bytes at ``offset``; blocking, call it in a thread."""
    fd = open_regular(path)
    try:
        chunks: list[bytes] = []
        got = 0
        while got < size:
            chunk = os.pread(fd, size - got, offset + got)
            if not chunk:
                raise FileShrank(f"{path}: wanted {size} bytes at {offset}, got {got}")
            chunks.append(chunk)
            got += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except OSError as exc:
        raise FileUnreadable(_error(path, "read", exc)) from exc
    finally:
        os.close(fd)


class Read(msgspec.Struct, frozen=True):
    """What ``read_into`` saw: the file's stat taken after the bytes were read."""

    after: FileStat


def read_into(path: str, offset: int, buffer: memoryview) -> Read:
    """Fill ``buffer`` (a writable, byte-format view; all of it) with the
    bytes at ``offset``, with ``preadv`` straight into it, then ``fstat`` the
    same descriptor: a caller that knows the file was quiet before the read
    can tell from ``after`` later that these bytes cannot have changed.
    Blocking, call it in a thread."""
    fd = open_regular(path)
    try:
        size = len(buffer)
        got = 0
        while got < size:
            n = os.preadv(fd, [buffer[got:]], offset + got)
            if n == 0:
                raise FileShrank(f"{path}: wanted {size} bytes at {offset}, got {got}")
            got += n
        st = os.fstat(fd)
        return Read(FileStat(st.st_size, st.st_mtime_ns, st.st_ino))
    except OSError as exc:
        raise FileUnreadable(_error(path, "read", exc)) from exc
    finally:
        os.close(fd)


class Buffers:
    """Read buffers handed out and taken back, so a part read fills memory
    that is already mapped instead of a fresh allocation (page faults and
    zeroing for every byte). While parts are being moved at most ``keep``
    idle buffers wait for the next read; once none is lent any more they are
    all dropped, so memory follows the parts in flight and an idle service
    holds none.

    With ``limit``, at most that many are lent at once: a ``take`` beyond it
    waits for a ``give`` (first come, first served), so the memory of parts
    in flight is bounded for the whole process, however many streams move.

    Used from the event loop (``take``/``give`` are not thread-safe); the
    bytes are filled in threads. A buffer is never resized (views of it may
    still exist), only dropped.
    """

    def __init__(self, keep: int, limit: int | None = None) -> None:
        self._free: list[bytearray] = []
        self._keep = keep
        self._lent = 0
        self._room = None if limit is None else asyncio.Semaphore(limit)

    async def take(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes (the smallest idle one that
        fits); waits while ``limit`` buffers are lent."""
        if self._room is not None:
            await self._room.acquire()
        self._lent += 1
        fits = [b for b in self._free if len(b) >= size]
        if not fits:
            # Every idle one is too small for the parts now moving (a file seen
            # large after live ones, part 1 before the larger rest): drop them,
            # so that memory stays the parts in flight, not those plus these.
            self._free.clear()
            return bytearray(size)
        best = min(fits, key=len)
        self._free.remove(best)
        return best

    def give(self, buffer: bytearray) -> None:
        self._lent -= 1
        if self._room is not None:
            self._room.release()
        if self._lent == 0:
            self._free.clear()
            return
        self._free.append(buffer)
        if len(self._free) > self._keep:
            self._free.remove(min(self._free, key=len))

    @property
    def idle(self) -> int:
        return len(self._free)

    @property
    def lent(self) -> int:
        return self._lent
