"""The kernel's "done writing" signals: IN_CLOSE_WRITE and IN_MOVED_TO.

watchfiles (the watcher's main notification source) reports creates,
modifications and deletes, never a close, so without this module "the
recorder is done" can only be guessed from quiet time (SETTLE_SECONDS,
STREAM_TIMEOUT_SECONDS). Here, on Linux, inotify says it: a file opened for
writing was closed (``closed``), or a file was renamed into a watched
directory (``moved_in``: writers that finish into a temp name and rename
into place). These are facts about a path, nothing more; the watcher decides
what they mean (``cefmp4.domain.watchrules``).

Why ``inotify_simple`` (2.0.1): it is a literal ctypes wrapper of the three
inotify calls, under 100 lines, no dependencies, BSD, maintained since 2016;
it hands back the file descriptor, so the asyncio integration (``add_reader``)
and the shutdown (close the fd) stay here, in plain sight.
``asyncinotify`` would do the same with its own event loop plumbing, which is
more to trust for no gain. It is a Linux-only dependency
(``sys_platform == 'linux'`` in pyproject); elsewhere ``watch`` raises
``Unavailable`` and the service works by quiet time alone.

Recursive: inotify watches one directory, so every directory under the root
gets its own watch (not following symlinks, skipping names ``skip`` refuses:
the watcher's temp/hidden rule), and a directory created or moved in later is
added when its event arrives, with its subtree. Files closed in a new
directory before its watch exists are missed; so are facts lost to a queue
overflow. Missing a fact costs only time: the settle and idle rules still
finish the file.

Limits: the per-user watch limit (``fs.inotify.max_user_watches``) or the
instance limit make ``watch`` raise ``Unavailable("limit")``; a new directory
that cannot be watched for the same reason ends ``facts`` with
``Unavailable("limit")``, so the caller can say the fast path is off instead
of silently covering only part of the tree.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Literal, Protocol

import msgspec
import structlog

log = structlog.get_logger(__name__)

How = Literal["closed", "moved_in"]
UnavailableReason = Literal["unsupported", "limit", "error"]


class CloseFact(msgspec.Struct, frozen=True):
    """``path`` (absolute, file system bytes) was closed after writing, or moved in."""

    path: bytes
    how: How


class Unavailable(Exception):
    """No close notifications: ``reason`` says why (a bounded word, for logs)."""

    def __init__(self, reason: UnavailableReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: UnavailableReason = reason
        self.detail = detail


# Names from inotify_simple's flags (the values are the kernel's, stable ABI).
_CLOSE_WRITE = 0x00000008
_MOVED_TO = 0x00000080
_CREATE = 0x00000100
_Q_OVERFLOW = 0x00004000
_IGNORED = 0x00008000
_ONLYDIR = 0x01000000
_DONT_FOLLOW = 0x02000000
_EXCL_UNLINK = 0x04000000
_ISDIR = 0x40000000
_MASK = _CLOSE_WRITE | _MOVED_TO | _CREATE | _ONLYDIR | _DONT_FOLLOW | _EXCL_UNLINK
_LIMIT_ERRNOS = (errno.ENOSPC, errno.EMFILE, errno.ENFILE)


class _Event(Protocol):
    @property
    def wd(self) -> int: ...
    @property
    def mask(self) -> int: ...
    @property
    def name(self) -> str: ...


class _INotify(Protocol):
    """What is used of ``inotify_simple.INotify`` (which has no type hints)."""

    def fileno(self) -> int: ...
    def add_watch(self, path: bytes, mask: int) -> int: ...
    def read(self, timeout: int | None = None) -> Iterable[_Event]: ...
    def close(self) -> None: ...


class CloseWatch:
    """One inotify instance over a tree. Use ``watch`` to make one."""

    def __init__(self, inotify: _INotify, root: bytes, skip: Callable[[bytes], bool]) -> None:
        self._inotify = inotify
        self._root = root
        self._skip = skip
        self._dirs: dict[int, bytes] = {}
        self._closed = False

    @property
    def watched(self) -> int:
        """How many directories are watched (one inotify watch each)."""
        return len(self._dirs)

    def add_tree(self, top: bytes) -> None:
        """Watch ``top`` and every directory below it; Unavailable("limit")
        when the kernel refuses for lack of watches."""
        stack = [top]
        while stack:
            directory = stack.pop()
            try:
                wd = self._inotify.add_watch(directory, _MASK)
            except OSError as exc:
                if exc.errno in _LIMIT_ERRNOS:
                    raise Unavailable("limit", f"inotify watch limit reached: {exc}") from exc
                if directory == top == self._root:
                    raise Unavailable("error", f"cannot watch WATCH_DIR: {exc}") from exc
                continue  # gone meanwhile, not a directory, no access: quiet time covers it
            self._dirs[wd] = directory
            try:
                with os.scandir(directory) as listing:
                    for entry in listing:
                        if entry.is_dir(follow_symlinks=False) and not self._skip(entry.name):
                            stack.append(entry.path)
            except OSError:
                continue

    def _read(self) -> list[CloseFact]:
        facts: list[CloseFact] = []
        for event in self._inotify.read(timeout=0):
            mask = int(event.mask)
            if mask & _Q_OVERFLOW:
                log.info("close notifications overflowed; those files finish by quiet time")
                continue
            if mask & _IGNORED:  # the directory went away (or was unmounted)
                self._dirs.pop(event.wd, None)
                continue
            directory = self._dirs.get(event.wd)
            if directory is None:
                continue
            name = os.fsencode(event.name)
            path = os.path.join(directory, name)
            if mask & _ISDIR:
                if mask & (_CREATE | _MOVED_TO) and not self._skip(name):
                    self.add_tree(path)
            elif mask & _CLOSE_WRITE:
                facts.append(CloseFact(path, "closed"))
            elif mask & _MOVED_TO:
                facts.append(CloseFact(path, "moved_in"))
        return facts

    async def facts(self) -> AsyncIterator[list[CloseFact]]:
        """Batches of facts as the kernel reports them, until cancelled or
        ``close``; Unavailable("limit") when a new directory cannot be watched."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        fd = self._inotify.fileno()
        loop.add_reader(fd, ready.set)
        try:
            while not self._closed:
                await ready.wait()
                ready.clear()
                batch = self._read()
                if batch:
                    yield batch
        finally:
            loop.remove_reader(fd)

    def close(self) -> None:
        """Release the inotify instance (and with it every watch). Idempotent."""
        if not self._closed:
            self._closed = True
            self._inotify.close()


def watch(root: bytes, skip: Callable[[bytes], bool]) -> CloseWatch:
    """Close notifications for every directory under ``root`` (see the module
    docstring); Unavailable when this platform or the kernel's limits do not
    allow them."""
    if not sys.platform.startswith("linux"):
        raise Unavailable("unsupported", f"inotify is Linux-only (platform {sys.platform})")
    try:
        import inotify_simple  # here, not at the top: a Linux-only dependency
    except ImportError as exc:
        raise Unavailable("unsupported", f"inotify_simple is not installed: {exc}") from exc
    try:
        inotify = inotify_simple.INotify(nonblocking=True)
    except OSError as exc:
        if exc.errno in _LIMIT_ERRNOS:
            raise Unavailable("limit", f"inotify instance limit reached: {exc}") from exc
        raise Unavailable("error", f"inotify_init failed: {exc}") from exc
    closes = CloseWatch(inotify, root, skip)  # its methods are those of _INotify
    try:
        closes.add_tree(root)
    except BaseException:
        closes.close()
        raise
    return closes
