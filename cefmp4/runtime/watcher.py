"""The watcher: turns what happens to files under WATCH_DIR into events.

Sources of truth, in order of speed: ``watchfiles`` notifications (inotify, or
polling with ``WATCH_POLL=true`` for NFS/SMB mounts where inotify sees no
remote writes), a tick that re-stats every live recording (watchfiles reports
no close events, so "quiet for N seconds" is measured here), and a full rescan
every ``RESCAN_INTERVAL_SECONDS`` that catches anything the notifications
missed. On Linux, inotify's close signals (``cefmp4.adapters.closes``:
IN_CLOSE_WRITE, IN_MOVED_TO) say when a writer is done; a close fact wakes
the tick for that path at once and feeds ``decide`` (``closed_for``), which
may then call the file idle before the settle time (see ``watchrules``). The
fact holds only for the (size, mtime, inode) of the first stat taken after
it; any later change voids it. Without close signals (WATCH_POLL, not Linux,
the inotify limits) everything works by quiet time, as logged once and shown
by ``cefmp4_close_notifications`` = 0. At start it scans first, so files that
arrived while the service was down are picked up.

Every look at a path goes through the pure ``watchrules.decide``; this module
only does the I/O around it: stat, the MP4 box walk (in a thread, cached per
(size, mtime)), and appending the events.

Cost: a tick looks at the open streams and the paths notifications named,
nothing else, so it is O(live). A rescan is O(files on disk): the walk and
every stat run in a worker thread (a slow NFS server blocks that thread, not
the event loop), and the decisions are made in batches of ``BATCH`` paths
with a yield between them, so the loop never stalls for long. Paths the
projection has a finished record for but the walk did not find are stat'ed
once more before they are forgotten: a listing that missed a file (NFS
attribute caches) cannot make the service forget a file that is there. The
per-path memory of this process (last signature, when it last changed, which
idle was reported, the MP4 verdict) is kept only for paths with an open
stream.

Hostile names and files. Paths are handled in wire form
(``cefmp4.domain.pathnames``) from the moment they are walked: any bytes the file
system allows become one reversible, printable string, so no name can fail
to encode into an event. What a ``*.mp4`` entry may be (a symlink out of the
tree, a FIFO, a directory) is decided by the pure ``cefmp4.domain.filerules`` from
the facts ``files.look`` gathers in the stat thread, without opening
anything; a skipped path is logged and counted once per path and process
(forgotten when it leaves the disk, so a new one is reported again).

Per-path isolation: ``_look_one`` is the one supervisor of this task for a
single path (the house style allows one per task; this is the watcher's).
Its first half runs in the stat thread (``stat_all`` records what a path
raised as that path's result), its second half around the decision and the
appends. Either way the path is logged with the error and counted in
``cefmp4_watch_errors{kind}`` once (until it looks fine or is gone) and the
pass goes on with the next path: one bad file never stops the watcher or
hides the files sorted after it. What the adapters translated (``CefError``:
Redis down, the watcher lease lost) and failures of the watch itself
(WATCH_DIR gone, the inotify limit) are not about a path: they propagate,
and the Service supervisor restarts the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat as stat_module
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Literal

import msgspec
import structlog
import watchfiles
from watchfiles._rust_notify import WatchfilesRustInternalError

from cefmp4.adapters import closes, files, mp4files
from cefmp4.adapters.leases import Fence
from cefmp4.domain import mp4
from cefmp4.domain.errors import CefError
from cefmp4.domain.events import (
    BytesAvailable,
    Continues,
    Event,
    FileDeleted,
    FileSeen,
    FileTruncated,
    StreamIdle,
)
from cefmp4.domain.filerules import FileStat, FollowSymlinks
from cefmp4.domain.objectkeys import object_key
from cefmp4.domain.partplan import PartPlan
from cefmp4.domain.pathnames import to_fs, to_wire
from cefmp4.domain.watchrules import (
    Action,
    CheckMp4,
    Forget,
    Gone,
    Grew,
    Seen,
    Stopped,
    Timing,
    Truncated,
    decide,
    settled_file,
)
from consumers.deps import Deps
from projections.streams import FileRecord, StreamState

log = structlog.get_logger(__name__)

TEMP_PREFIXES = ("~", ".")
# `_reported` key of the notification source's own failure (not a path: no
# wire-form path is empty).
_NOTIFY_KEY = ""
_SKIP_MESSAGES: dict[str, str] = {
    "symlink_outside": "symlink leads outside WATCH_DIR; not followed (FOLLOW_SYMLINKS=inside)",
    "symlink": "symlink not followed (FOLLOW_SYMLINKS=never)",
    "special_file": "not a regular file (FIFO, socket or device); ignored",
}
# Paths decided between two yields to the event loop during a rescan: about
# 5 ms of work at ~5 us a path.
BATCH = 1000
# How often the tick also re-stats streams already reported idle (waiting for
# their finalizer). Growth of such a file normally arrives as a notification;
# this is the belt for file systems that give none. Every tick would make a
# backlog of N idle streams cost O(N) per tick and O(N^2) over the drain.
IDLE_RECHECK_SECONDS = 1.0
# A close's second look comes this long after CLOSE_GUARD_SECONDS, so that the
# guard has surely passed by the watcher's own clock when it looks.
_GUARD_SLACK = 0.01


def _skip_dir(name: bytes) -> bool:
    """A directory ``walk`` does not descend into, nor the close watch."""
    return name.startswith(_TEMP_PREFIXES)


def is_recording(rel_path: str) -> bool:
    """``*.mp4`` (any case), not hidden, not an editor/download temp file."""
    parts = rel_path.split("/")
    if any(p.startswith(TEMP_PREFIXES) for p in parts):
        return False
    return parts[-1].lower().endswith(".mp4")


class WatchDirGone(OSError):
    """WATCH_DIR cannot be listed: the watch itself failed (not one path)."""


class WatchError(msgspec.Struct, frozen=True):
    """What looking at one path raised, in place of its stat.

    kind (a bounded metric label): ``stat`` (the file system refused: EACCES
    on a directory, ELOOP, EIO ...), ``list`` (a directory under WATCH_DIR
    could not be listed), ``internal`` (anything else: a bug; reported with
    its type and message, or its traceback when the decision half raised)."""

    kind: Literal["stat", "list", "internal"]
    error: str
    path: str = ""  # for ``list``: the directory


_TEMP_PREFIXES = tuple(p.encode() for p in TEMP_PREFIXES)
Current = FileStat | files.Skipped | WatchError | None
Looked = dict[str, Current]
Found = FileStat | files.Skipped | None
Look = Callable[[str], Found]
Settled = Callable[[str, FileStat], bool]
CloseWatchFactory = Callable[[bytes, Callable[[bytes], bool]], closes.CloseWatch]
Sig = tuple[int, int, int]


def walk(root: Path, look: Look, settled: Settled) -> tuple[Looked, set[str]]:
    """Every recording under ``root`` (wire-form path -> what ``look`` would
    say of it) and the directories that could not be listed, leaving out
    the recordings ``settled`` says need nothing; and the set of every
    recording path seen. Blocking: run it in a thread. Walks bytes, so no
    name is lost in decoding; symlinked directories are not descended into.

    This is the whole cost of a rescan, so the common case is cheap: one
    ``scandir`` per directory and one ``stat`` per recording. A regular
    file that is not a link, in a directory reached without links, is inside
    WATCH_DIR by construction, so ``look``'s realpath and the symlink rules
    are needed only for links and special files; and a finished recording
    still as recorded (``settled``: the usual case, 100k of them on a busy
    box) goes no further than this thread.
    """
    root_fs = os.fsencode(root)
    out: Looked = {}
    seen: set[str] = set()
    stack = [root_fs]
    while stack:
        directory = stack.pop()
        try:
            listing = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed meanwhile
        except OSError as exc:
            error = _unlisted(exc, root_fs)  # raises WatchDirGone for WATCH_DIR itself
            out[error.path] = error
            continue
        with listing:
            for entry in listing:
                name = entry.name
                if name.startswith(_TEMP_PREFIXES):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif name.lower().endswith(b".mp4"):
                    wire = to_wire(entry.path)
                    seen.add(wire)
                    found = _guarded(wire, functools.partial(_plain, entry, wire, look))
                    if not (isinstance(found, FileStat) and settled(wire, found)):
                        out[wire] = found
    return out, seen


def _plain(entry: os.DirEntry[bytes], wire: str, look: Look) -> FileStat | files.Skipped | None:
    if entry.is_symlink():
        return look(wire)
    try:
        st = entry.stat(follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return look(wire)  # let the full look name the error
    if not stat_module.S_ISREG(st.st_mode):
        return look(wire)  # a FIFO, socket or device: skipped, and reported once
    return FileStat(st.st_size, st.st_mtime_ns, st.st_ino)


def _unlisted(exc: OSError, root_fs: bytes) -> WatchError:
    where = exc.filename if isinstance(exc.filename, bytes) else os.fsencode(exc.filename or "")
    if where.rstrip(b"/") == root_fs.rstrip(b"/"):
        raise WatchDirGone(exc.errno, f"cannot list WATCH_DIR: {exc.strerror}", str(exc.filename))
    wire = to_wire(where)
    return WatchError("list", f"cannot list {wire}: {exc.strerror}", wire)


def stat_all(paths: Iterable[str], look: Look) -> Looked:
    """Look at every path (blocking: run it in a thread)."""
    return {path: _guarded(path, functools.partial(look, path)) for path in paths}


def _guarded(path: str, look: Callable[[], Found]) -> Current:
    """The first half of the per-path supervisor (the stat thread's): whatever
    one path raises becomes that path's result, so one bad file costs one log
    line, not the pass."""
    try:
        return look()
    except files.FileUnreadable as exc:
        return WatchError("stat", str(exc))
    except Exception as exc:  # noqa: BLE001 - the per-path supervisor (thread half)
        return WatchError("internal", f"{type(exc).__name__}: {exc}")


class Watcher:
    def __init__(
        self,
        deps: Deps,
        *,
        new_stream_id: Callable[[], str],
        monotonic: Callable[[], float] = time.monotonic,
        tick_seconds: float = 0.1,
        close_watch: CloseWatchFactory | None = None,
    ) -> None:
        self._deps = deps
        self._cfg = deps.config
        self._root = deps.config.watch_root
        self._new_id = new_stream_id
        self._clock = monotonic
        self._tick = tick_seconds
        self._timing = Timing(
            settle=deps.config.settle_seconds,
            timeout=deps.config.stream_timeout_seconds,
            plan=deps.config.unrecorded_plan,
            coalesce=min(0.25, deps.config.settle_seconds / 2),
            close_guard=deps.config.close_guard_seconds,
        )
        # Looked up when used, not bound here: tests replace ``closes.watch``.
        self._close_watch = close_watch or (lambda root, skip: closes.watch(root, skip))
        # Per-process memory only; everything durable is in the projection.
        self._sig: dict[str, tuple[int, int, int]] = {}
        self._changed_at: dict[str, float] = {}
        self._idle_sent: dict[str, tuple[int, int]] = {}
        self._verdicts: dict[str, tuple[tuple[int, int, int], mp4.Mp4Verdict]] = {}
        self._dirty: set[str] = set()
        # Close facts: when one arrived, and the signature the first stat
        # after it saw (None until then); an ``mfra`` answer per signature.
        self._closed: dict[str, tuple[Sig | None, float]] = {}
        self._mfra: dict[str, tuple[Sig, bool]] = {}
        self._stat_at = 0.0  # when the stats of the current pass began
        self._idle_looked_at = 0.0  # when the tick last re-stat'ed idle streams
        # Paths reported as skipped or failing, and as what: reported once,
        # again only when the problem changes or after the path was fine or
        # gone. Bounded by the paths on disk (a full scan prunes the rest).
        self._reported: dict[str, str] = {}
        self._root_fs = os.fsencode(self._root)
        self._root_wire = to_wire(self._root_fs)
        self._follow: FollowSymlinks = deps.config.follow_symlinks
        self._wake = asyncio.Event()
        self._rescan_now = False
        self._notified = False
        self._fence: Fence | None = None

    def _settled(self, path: str, current: FileStat) -> bool:
        """For the walk's thread: dict reads only (each atomic under the GIL;
        a record changed meanwhile is looked at again by the next rescan)."""
        state = self._deps.projection.state
        record = state.files.get(path)
        return record is not None and path not in state.by_path and settled_file(record, current)

    def _look_fs(self, path: str) -> FileStat | files.Skipped | None:
        return files.look(path, self._root_fs, self._follow)

    # -- life cycle -------------------------------------------------------

    async def run(self, stop: asyncio.Event, fence: Fence | None = None) -> None:
        """Watch until ``stop``; appends go through ``fence`` (the watcher lease)."""
        self._fence = fence
        self._root.mkdir(parents=True, exist_ok=True)
        notifier = asyncio.create_task(self._notifications(stop))
        closer = asyncio.create_task(self._close_facts())
        try:
            await self.scan()
            next_rescan = self._clock() + self._cfg.rescan_interval_seconds
            while not stop.is_set():
                try:
                    async with asyncio.timeout(self._tick):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
                if notifier.done():
                    notifier.result()  # the watch itself failed (inotify limit): raise
                    return  # it ended because stop is set
                if closer.done():
                    closer.result()  # raises what was not "fast path off": a bug
                if self._rescan_now or self._clock() >= next_rescan:
                    self._rescan_now = False
                    next_rescan = self._clock() + self._cfg.rescan_interval_seconds
                    await self.scan()
                else:
                    await self.look_at_live()
        finally:
            notifier.cancel()
            closer.cancel()
            await asyncio.gather(notifier, closer, return_exceptions=True)

    async def run_once(self, fence: Fence | None = None) -> None:
        """One full scan and decision pass; for tests."""
        self._fence = fence
        self._root.mkdir(parents=True, exist_ok=True)
        await self.scan()

    async def _notifications(self, stop: asyncio.Event) -> None:
        """Notifications into ``_dirty``, restarted when watchfiles chokes.

        watchfiles cannot hand over a name that is not UTF-8: the whole batch
        fails (``WatchfilesRustInternalError: Unable to decode path``) and the
        watch ends. That is a fault of the notification source, not of the
        watch: the lost batch is made up by a full scan at once, and the
        watch starts again after a pause that doubles while it keeps failing
        (a recorder writing such a file keeps producing the error), up to
        the rescan interval, so meanwhile the service degrades to rescans.
        An OSError (inotify limit, WATCH_DIR gone) ends the task: ``run``
        raises it and the Service supervisor restarts the watcher.
        """
        pause = 0.1
        while not stop.is_set():
            self._notified = False
            try:
                await self._notify(stop)
                return
            except* WatchfilesRustInternalError as group:
                error = str(group.exceptions[0])
                if self._reported.get(_NOTIFY_KEY) != error:
                    self._reported[_NOTIFY_KEY] = error
                    self._deps.metrics.watch_errors.labels("notify").inc()
                    log.warning(
                        "file notifications failed; rescanning and restarting them",
                        error=error,
                        pause=pause,
                    )
            self._rescan_now = True
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await stop.wait()
            pause = 0.1 if self._notified else min(pause * 2, self._cfg.rescan_interval_seconds)

    async def _notify(self, stop: asyncio.Event) -> None:
        async for changes in watchfiles.awatch(
            self._root,
            watch_filter=lambda _change, path: is_recording(path.rsplit("/", 1)[-1]),
            debounce=100,
            step=20,
            stop_event=stop,
            force_polling=self._cfg.watch_poll,
            poll_delay_ms=int(self._cfg.poll_interval_seconds * 1000),
            recursive=True,
        ):
            self._dirty.update(to_wire(path) for _change, path in changes)
            self._notified = True  # a batch came through: the next failure pauses briefly
            self._wake.set()

    async def _close_facts(self) -> None:
        """Close facts into ``_closed`` (the fast path), until cancelled.

        Off, with one log line and ``cefmp4_close_notifications`` 0, when
        WATCH_POLL is set (a network mount: inotify sees no remote closes),
        off Linux, or at the inotify limits; the service then finishes files
        by quiet time alone, as without this.
        """
        gauge = self._deps.metrics.close_notifications
        if self._cfg.watch_poll:
            gauge.set(0)
            log.info("close notifications off (WATCH_POLL); files finish by quiet time")
            return
        try:
            watch = await asyncio.to_thread(self._close_watch, self._root_fs, _skip_dir)
        except closes.Unavailable as exc:
            gauge.set(0)
            log.warning(
                "close notifications unavailable; files finish by quiet time",
                reason=exc.reason,
                error=exc.detail,
            )
            return
        gauge.set(1)
        loop = asyncio.get_running_loop()
        # Look again the moment the guard is over, not at the next tick: that
        # look is the one that may finish the file (up to a tick sooner).
        guard = self._timing.close_guard + _GUARD_SLACK
        try:
            async for batch in watch.facts():
                now = self._clock()
                for fact in batch:
                    path = to_wire(fact.path)
                    if is_recording(self._rel(path)):
                        self._closed[path] = (None, now)
                        self._dirty.add(path)
                        loop.call_later(guard, self._look_soon, path)
                self._wake.set()
        except closes.Unavailable as exc:
            log.warning(
                "close notifications stopped; files finish by quiet time",
                reason=exc.reason,
                error=exc.detail,
            )
        finally:
            gauge.set(0)
            watch.close()

    def _look_soon(self, path: str) -> None:
        """Have the next pass look at ``path`` and start that pass now."""
        self._dirty.add(path)
        self._wake.set()

    def _closed_for(self, path: str, sig: Sig | None, now: float) -> float | None:
        """Seconds since the writer closed ``path``, if it is unchanged since."""
        fact = self._closed.get(path)
        if fact is None:
            return None
        if fact[0] is None:
            if sig is None or fact[1] > self._stat_at:
                # This stat predates the close: it may show the file before
                # its last write. The fact re-dirtied the path; wait for that look.
                return None
            fact = self._closed[path] = (sig, fact[1])
        if fact[0] != sig:
            del self._closed[path]  # changed after the close: the writer went on
            return None
        return now - fact[1]

    # -- looking ----------------------------------------------------------

    def _rel(self, path: str) -> str:
        """``path`` (wire form) relative to WATCH_DIR, lexically: a followed
        symlink is named by the link, not its target."""
        root = self._root_wire.rstrip("/") + "/"
        return path[len(root) :] if path.startswith(root) else path.rsplit("/", 1)[-1]

    async def scan(self) -> None:
        """Look at every recording on disk, and at every recorded one that is not."""

        await self._deps.projection.catch_up()
        self._stat_at = self._clock()
        looked, seen = await asyncio.to_thread(walk, self._root, self._look_fs, self._settled)
        projection = await self._deps.projection.catch_up()
        missing = [p for p in projection.files if p not in seen]
        if missing:  # confirm with a stat of its own: a listing may miss a file
            looked |= await asyncio.to_thread(stat_all, missing, self._look_fs)
        # What left the disk is forgotten: recreated, it is reported again.
        self._reported = {
            p: r for p, r in self._reported.items() if p in seen or p in looked or p == _NOTIFY_KEY
        }
        await self._look_all(looked)

    async def look_at_live(self) -> None:
        """The tick: re-stat the open streams and what notifications named.
        With neither, there is nothing to look at and nothing is done (no
        Redis read, no thread): an idle service costs close to nothing."""
        if self._dirty or self._deps.projection.state.live():
            await self.look(set())

    async def look(self, paths: set[str]) -> None:
        projection = await self._deps.projection.catch_up()
        now = self._clock()
        with_idle = now - self._idle_looked_at >= IDLE_RECHECK_SECONDS
        if with_idle:
            self._idle_looked_at = now
        paths |= {s.path for s in projection.live() if with_idle or s.status == "active"}
        paths |= self._dirty
        self._dirty.clear()
        self._stat_at = self._clock()
        await self._look_all(await asyncio.to_thread(stat_all, paths, self._look_fs))

    async def _look_all(self, looked: Looked) -> None:
        for n, path in enumerate(sorted(looked), start=1):
            await self._look_one(path, looked[path])
            if n % BATCH == 0:
                await asyncio.sleep(0)

    async def _look_one(self, path: str, current: Current) -> None:
        """The per-path supervisor (see the module docstring): report what
        the stat half recorded, decide, and contain whatever this one path
        raises; the adapters' errors (CefError) are the watch's, not the
        path's, and propagate."""
        match current:
            case WatchError(kind=kind, error=error):
                if self._report(path, f"error:{kind}:{error}"):
                    self._deps.metrics.watch_errors.labels(kind).inc()
                    log.warning("cannot look at path", path=path, kind=kind, error=error)
                return
            case files.Skipped(reason=reason, detail=detail):
                if self._report(path, f"skip:{reason}"):
                    self._deps.metrics.files_skipped.labels(reason).inc()
                    log.warning(_SKIP_MESSAGES[reason], path=path, reason=reason, target=detail)
                current = None  # not a recording: as if nothing were there
            case _:
                self._reported.pop(path, None)
        try:
            await self._look_at(path, current)
        except CefError:
            raise
        except Exception as exc:  # the per-path supervisor (decision half)
            if self._report(path, f"error:internal:{type(exc).__name__}"):
                self._deps.metrics.watch_errors.labels("internal").inc()
                log.exception("failed to handle path; going on with the next", path=path)

    def _report(self, path: str, problem: str) -> bool:
        """True the first time ``path`` has ``problem`` (log and count it)."""
        if self._reported.get(path) == problem:
            return False
        self._reported[path] = problem
        return True

    def _known(self, path: str) -> StreamState | FileRecord | None:
        state = self._deps.projection.state
        return state.for_path(path) or state.files.get(path)

    async def _look_at(self, path: str, current: FileStat | None) -> None:
        now = self._clock()
        sig = None if current is None else (current.size, current.mtime_ns, current.inode)
        if sig != self._sig.get(path):
            self._sig[path] = sig if sig is not None else (-1, -1, -1)
            self._changed_at[path] = now
        known = self._known(path)
        verdict = None
        closed_for = self._closed_for(path, sig, now)
        mfra = False
        for _ in range(2):
            actions = decide(
                current,
                known,
                quiet_for=now - self._changed_at.get(path, now),
                verdict=verdict,
                idle_sent=self._idle_sent.get(path),
                timing=self._timing,
                closed_for=closed_for,
                mfra=mfra,
            )
            if actions != [CheckMp4()] or sig is None:
                break
            verdict = await self._verdict(path, sig)
            if closed_for is not None and verdict.status is mp4.Mp4Status.FRAGMENTED:
                mfra = await self._ends_with_mfra(path, sig)
        for action in actions:
            event = self._event_for(path, action)
            if event is not None:
                await self._deps.emit(event, self._fence)
                if isinstance(action, Seen | Forget):
                    await self._deps.projection.catch_up()
        if current is None or self._deps.projection.state.for_path(path) is None:
            # Only open streams need this process's memory of the path.
            for table in (self._sig, self._changed_at, self._idle_sent, self._verdicts):
                table.pop(path, None)
            self._closed.pop(path, None)
            self._mfra.pop(path, None)

    async def _verdict(self, path: str, sig: tuple[int, int, int]) -> mp4.Mp4Verdict:
        cached = self._verdicts.get(path)
        if cached is not None and cached[0] == sig:
            return cached[1]
        try:
            verdict = await asyncio.to_thread(mp4files.check_file, to_fs(path))
        except OSError as exc:
            verdict = mp4.Mp4Verdict(mp4.Mp4Status.INVALID, f"cannot read: {exc}")
        self._verdicts[path] = (sig, verdict)
        return verdict

    async def _ends_with_mfra(self, path: str, sig: Sig) -> bool:
        cached = self._mfra.get(path)
        if cached is not None and cached[0] == sig:
            return cached[1]
        try:
            mfra = await asyncio.to_thread(mp4files.file_ends_with_mfra, to_fs(path))
        except OSError:
            mfra = False
        self._mfra[path] = (sig, mfra)
        return mfra

    def _event_for(self, path: str, action: Action) -> Event | None:
        """The event that reports ``action``; None for ``CheckMp4``, which
        ``_look_at`` answers before it acts."""
        now = self._deps.now()
        match action:
            case Seen(stat=stat, continues=continues):
                return self._seen(path, stat, now, continues)
            case Forget(stream_id=stream_id):
                log.debug("finished recording left the disk", path=path, stream_id=stream_id)
                return FileDeleted(stream_id=stream_id, at=now, path=path)
            case Gone(stream_id=stream_id):
                log.info("recording deleted before completion", path=path, stream_id=stream_id)
                return FileDeleted(stream_id=stream_id, at=now, path=path)
            case Grew(stream_id=stream_id, stat=stat):
                return BytesAvailable(
                    stream_id=stream_id, at=now, size=stat.size, mtime_ns=stat.mtime_ns
                )
            case Truncated(stream_id=stream_id, size=size):
                log.warning(
                    "recording truncated or replaced; its content becomes a new stream",
                    path=path,
                    stream_id=stream_id,
                )
                return FileTruncated(stream_id=stream_id, at=now, path=path, size=size)
            case Stopped(
                stream_id=stream_id, stat=stat, reason=reason, verdict=verdict, cause=cause
            ):
                self._idle_sent[path] = (stat.size, stat.mtime_ns)
                return StreamIdle(
                    stream_id=stream_id,
                    at=now,
                    size=stat.size,
                    mtime_ns=stat.mtime_ns,
                    reason=reason,
                    mp4=verdict.status.value,
                    mp4_reason=verdict.reason,
                    cause=cause,
                )
            case CheckMp4():
                return None

    def _seen(
        self, path: str, current: FileStat, now: datetime, continues: Continues | None
    ) -> FileSeen:
        stream_id = self._new_id()
        rel = self._rel(path)
        self._idle_sent.pop(path, None)
        if continues is None:
            log.info("new recording", path=path, stream_id=stream_id, size=current.size)
        else:
            log.info(
                "recording continued after completion; a new object holds the whole file",
                path=path,
                stream_id=stream_id,
                size=current.size,
                continues=continues.stream_id,
            )
        return FileSeen(
            stream_id=stream_id,
            at=now,
            path=path,
            rel_path=rel,
            bucket=self._cfg.s3_bucket_name,
            key=object_key(self._cfg.s3_key_prefix, stream_id, rel),
            size=current.size,
            mtime_ns=current.mtime_ns,
            inode=current.inode,
            continues=continues,
            plan=self._plan(current.size, continues),
        )

    def _plan(self, size: int, continues: Continues | None) -> PartPlan:
        """A continuation is cut like the object it continues, so that the
        parts it shares are copied, not sent; anything else by its size now."""
        if continues is not None and continues.part_size > 0:
            return continues.plan()
        return self._cfg.plan_at_sight(size)
