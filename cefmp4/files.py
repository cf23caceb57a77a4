"""The file system edge: stat and read byte ranges of recordings.

OS errors are translated into what they mean for a stream: gone (the watcher
will report the deletion), unreadable (a permanent failure of the stream), or
changed under us (a short read: the file shrank; the watcher will report it).
Reads use ``pread`` on a fresh descriptor so concurrent part reads of one file
need no shared offset.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from cefmp4.errors import CefError, PermanentError


class FileGone(CefError):
    """The file no longer exists."""


class FileUnreadable(PermanentError):
    reason = "unreadable"


class FileShrank(CefError):
    """Fewer bytes than expected: the file was truncated while we read it."""


class FileStat(msgspec.Struct, frozen=True):
    size: int
    mtime_ns: int
    inode: int


def stat(path: str | Path) -> FileStat | None:
    """Stat ``path``; None when it does not exist (or is not a regular file)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError as exc:
        raise FileUnreadable(f"cannot stat {path}: {exc}") from exc
    if not os.path.isfile(path):
        return None
    return FileStat(st.st_size, st.st_mtime_ns, st.st_ino)


def read_range(path: str | Path, offset: int, size: int) -> bytes:
    """Exactly ``size`` bytes at ``offset``; blocking, call it in a thread."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise FileGone(str(path)) from exc
    except (PermissionError, IsADirectoryError) as exc:
        raise FileUnreadable(f"cannot open {path}: {exc}") from exc
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
        raise FileUnreadable(f"cannot read {path}: {exc}") from exc
    finally:
        os.close(fd)
