"""Read a recording's boxes from disk for the pure MP4 rules.

``cefmp4.domain.mp4`` and ``mp4meta`` judge any ``Source`` (a length and
slices). Here a ``Source`` is an open file read with ``os.pread``, one call
per slice, never ``mmap``: a recorder that restarts with ``O_TRUNC`` while a
mapping is live turns the next page access into SIGBUS, which kills the whole
service, whereas a short ``pread`` reads as "the file shrank". Each function
opens the path with ``O_NONBLOCK`` (a path that turned into a FIFO must not
block the open waiting for a writer; it is refused as not a regular file)
and lets OSError propagate.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from cefmp4.domain import mp4, mp4meta

Path = str | bytes | os.PathLike[str]


class PreadSource:
    """Slicing over an open file descriptor, one ``pread`` per slice. The
    length is fixed at construction; a slice past what the file still holds
    comes back short."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, key: slice, /) -> bytes:
        start, stop, _ = key.indices(self._size)
        if stop <= start:
            return b""
        return os.pread(self._fd, stop - start, start)


@contextmanager
def opened(path: Path) -> Iterator[PreadSource]:
    """The regular file at ``path`` as a ``Source`` of its current size."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fsdecode(path))
        yield PreadSource(fd, st.st_size)
    finally:
        os.close(fd)


def check_file(path: Path) -> mp4.Mp4Verdict:
    """``mp4.check_structure`` of the file at ``path`` as it is right now."""
    with opened(path) as src:
        if len(src) == 0:
            return mp4.Mp4Verdict(mp4.Mp4Status.INCOMPLETE, "empty file")
        return mp4.check_structure(src)


def file_ends_with_mfra(path: Path) -> bool:
    """``mp4.ends_with_mfra`` of the file at ``path`` (header reads only)."""
    with opened(path) as src:
        return mp4.ends_with_mfra(src)


def describe_file(path: Path) -> mp4meta.BoxDescription | mp4meta.Undescribed:
    """``mp4meta.describe_source`` of the file at ``path`` as it is now."""
    with opened(path) as src:
        return mp4meta.describe_source(src)
