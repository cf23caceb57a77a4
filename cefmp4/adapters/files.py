"""The file system edge: look at, stat and read byte ranges of recordings.

Paths come in wire form (``cefmp4.domain.pathnames``) and are turned back into the
file system's bytes here, so nothing above this module handles raw names.

OS errors are translated into what they mean for a stream: gone (the watcher
will report the deletion), unreadable (a permanent failure of the stream), or
changed under us (a short read: the file shrank; the watcher will report it).
Reads use ``pread`` on a fresh descriptor so concurrent part reads of one file
need no shared offset.

Nothing here blocks on a special file: ``look`` and ``stat`` only stat, and
``read_range`` opens with ``O_NONBLOCK`` (a path that raced into a FIFO opens
at once instead of waiting for a writer) and refuses what ``fstat`` of the
open descriptor says is not a regular file, before reading a byte.
"""

from __future__ import annotations

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
