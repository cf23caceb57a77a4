"""The watcher: turns what happens to files under WATCH_DIR into events.

Sources of truth, in order of speed: ``watchfiles`` notifications (inotify, or
polling with ``WATCH_POLL=true`` for NFS/SMB mounts where inotify sees no
remote writes), a tick that re-stats every live recording (watchfiles reports
no close events, so "quiet for N seconds" is measured here), and a full rescan
every ``RESCAN_INTERVAL_SECONDS`` that catches anything the notifications
missed. At start it scans first, so files that arrived while the service was
down are picked up.

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
"""

from __future__ import annotations

import asyncio
import os
import stat as stat_module
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

import structlog
import watchfiles

from cefmp4 import files, mp4
from cefmp4.deps import Deps
from cefmp4.events import (
    BytesAvailable,
    Continues,
    Event,
    FileDeleted,
    FileSeen,
    FileTruncated,
    StreamIdle,
)
from cefmp4.leases import Fence
from cefmp4.watchrules import (
    Action,
    CheckMp4,
    Forget,
    Gone,
    Grew,
    Idle,
    Seen,
    Timing,
    Truncated,
    decide,
)
from projections.streams import FileRecord, StreamState

log = structlog.get_logger(__name__)

TEMP_PREFIXES = ("~", ".")
# Paths decided between two yields to the event loop during a rescan: about
# 5 ms of work at ~5 us a path.
BATCH = 1000


def is_recording(rel_path: str) -> bool:
    """``*.mp4`` (any case), not hidden, not an editor/download temp file."""
    parts = rel_path.split("/")
    if any(p.startswith(TEMP_PREFIXES) for p in parts):
        return False
    return parts[-1].lower().endswith(".mp4")


Looked = dict[str, "files.FileStat | files.FileUnreadable | None"]


def scan_tree(root: Path) -> Looked:
    """Every recording under ``root`` with its stat (blocking: run it in a
    thread). One ``scandir`` per directory and one ``stat`` per recording,
    nothing per non-recording: at 100k files this is the whole cost of a
    rescan. A file that vanishes between the listing and its stat is simply
    not there; an unreadable one maps to its error."""
    out: Looked = {}
    stack = [str(root)]
    while stack:
        try:
            listing = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue  # a subdirectory removed meanwhile
        with listing:
            for entry in listing:
                if entry.name.startswith(TEMP_PREFIXES):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.name.lower().endswith(".mp4"):
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    except PermissionError as exc:
                        out[entry.path] = files.FileUnreadable(f"cannot stat {entry.path}: {exc}")
                        continue
                    if stat_module.S_ISREG(st.st_mode):
                        out[entry.path] = files.FileStat(st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def stat_all(paths: Iterable[str]) -> Looked:
    """Stat every path (blocking: run it in a thread). An unreadable one maps
    to its error, so one bad file costs one log line, not the pass."""
    out: Looked = {}
    for path in paths:
        try:
            out[path] = files.stat(path)
        except files.FileUnreadable as exc:
            out[path] = exc
    return out


class Watcher:
    def __init__(
        self,
        deps: Deps,
        *,
        new_stream_id: Callable[[], str],
        monotonic: Callable[[], float] = time.monotonic,
        tick_seconds: float = 0.1,
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
            chunk=deps.config.chunk_size_bytes,
            coalesce=min(0.25, deps.config.settle_seconds / 2),
        )
        # Per-process memory only; everything durable is in the projection.
        self._sig: dict[str, tuple[int, int, int]] = {}
        self._changed_at: dict[str, float] = {}
        self._idle_sent: dict[str, tuple[int, int]] = {}
        self._verdicts: dict[str, tuple[tuple[int, int, int], mp4.Mp4Verdict]] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._fence: Fence | None = None

    # -- life cycle -------------------------------------------------------

    async def run(self, stop: asyncio.Event, fence: Fence | None = None) -> None:
        """Watch until ``stop``; appends go through ``fence`` (the watcher lease)."""
        self._fence = fence
        self._root.mkdir(parents=True, exist_ok=True)
        notifier = asyncio.create_task(self._notifications(stop))
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
                if self._clock() >= next_rescan:
                    next_rescan = self._clock() + self._cfg.rescan_interval_seconds
                    await self.scan()
                else:
                    await self.look_at_live()
        finally:
            notifier.cancel()
            await asyncio.gather(notifier, return_exceptions=True)

    async def run_once(self, fence: Fence | None = None) -> None:
        """One full scan and decision pass; for tests."""
        self._fence = fence
        self._root.mkdir(parents=True, exist_ok=True)
        await self.scan()

    async def _notifications(self, stop: asyncio.Event) -> None:
        async for changes in watchfiles.awatch(
            self._root,
            watch_filter=lambda _change, path: is_recording(self._rel(path)),
            debounce=100,
            step=20,
            stop_event=stop,
            force_polling=self._cfg.watch_poll,
            poll_delay_ms=int(self._cfg.poll_interval_seconds * 1000),
            recursive=True,
        ):
            self._dirty.update(path for _change, path in changes)
            self._wake.set()

    # -- looking ----------------------------------------------------------

    def _rel(self, path: str | Path) -> str:
        try:
            return Path(path).resolve().relative_to(self._root).as_posix()
        except ValueError:
            return Path(path).name

    async def scan(self) -> None:
        """Look at every recording on disk, and at every recorded one that is not."""

        looked = await asyncio.to_thread(scan_tree, self._root)
        projection = await self._deps.projection.catch_up()
        missing = [p for p in projection.files if p not in looked]
        if missing:  # confirm with a stat of its own: a listing may miss a file
            looked |= await asyncio.to_thread(stat_all, missing)
        await self._look_all(looked)

    async def look_at_live(self) -> None:
        """The tick: re-stat the open streams and what notifications named.
        With neither, there is nothing to look at and nothing is done (no
        Redis read, no thread): an idle service costs close to nothing."""
        if self._dirty or self._deps.projection.state.live():
            await self.look(set())

    async def look(self, paths: set[str]) -> None:
        projection = await self._deps.projection.catch_up()
        paths |= {s.path for s in projection.live()}
        paths |= self._dirty
        self._dirty.clear()
        await self._look_all(await asyncio.to_thread(stat_all, paths))

    async def _look_all(self, looked: Looked) -> None:
        for n, path in enumerate(sorted(looked), start=1):
            current = looked[path]
            if isinstance(current, files.FileUnreadable):
                log.warning("cannot stat file", path=path, error=str(current))
            else:
                await self._look_at(path, current)
            if n % BATCH == 0:
                await asyncio.sleep(0)

    def _known(self, path: str) -> StreamState | FileRecord | None:
        state = self._deps.projection.state
        return state.for_path(path) or state.files.get(path)

    async def _look_at(self, path: str, current: files.FileStat | None) -> None:
        now = self._clock()
        sig = None if current is None else (current.size, current.mtime_ns, current.inode)
        if sig != self._sig.get(path):
            self._sig[path] = sig if sig is not None else (-1, -1, -1)
            self._changed_at[path] = now
        known = self._known(path)
        verdict = None
        for _ in range(2):
            actions = decide(
                current,
                known,
                quiet_for=now - self._changed_at.get(path, now),
                verdict=verdict,
                idle_sent=self._idle_sent.get(path),
                timing=self._timing,
            )
            if actions != [CheckMp4()] or sig is None:
                break
            verdict = await self._verdict(path, sig)
        for action in actions:
            event = self._event_for(path, action, current, known, verdict)
            if event is not None:
                await self._deps.emit(event, self._fence)
                if isinstance(action, Seen | Forget):
                    await self._deps.projection.catch_up()
                known = self._known(path)
        if current is None or self._deps.projection.state.for_path(path) is None:
            # Only open streams need this process's memory of the path.
            for table in (self._sig, self._changed_at, self._idle_sent, self._verdicts):
                table.pop(path, None)

    async def _verdict(self, path: str, sig: tuple[int, int, int]) -> mp4.Mp4Verdict:
        cached = self._verdicts.get(path)
        if cached is not None and cached[0] == sig:
            return cached[1]
        try:
            verdict = await asyncio.to_thread(mp4.check_file, path)
        except OSError as exc:
            verdict = mp4.Mp4Verdict(mp4.Mp4Status.INVALID, f"cannot read: {exc}")
        self._verdicts[path] = (sig, verdict)
        return verdict

    def _event_for(
        self,
        path: str,
        action: Action,
        current: files.FileStat | None,
        known: StreamState | FileRecord | None,
        verdict: mp4.Mp4Verdict | None,
    ) -> Event | None:
        """The event that reports ``action``; None when the inputs it needs
        are missing (decide never asks for that; this keeps the types honest)."""
        now = self._deps.now()
        match action, current, known:
            case Seen(continues=continues), files.FileStat(), _:
                return self._seen(path, current, now, continues)
            case Forget(), None, FileRecord():
                log.debug("finished recording left the disk", path=path, stream_id=known.stream_id)
                return FileDeleted(stream_id=known.stream_id, at=now, path=path)
            case Gone(), None, StreamState():
                log.info(
                    "recording deleted before completion", path=path, stream_id=known.stream_id
                )
                return FileDeleted(stream_id=known.stream_id, at=now, path=path)
            case Grew(), files.FileStat(), StreamState():
                return BytesAvailable(
                    stream_id=known.stream_id, at=now, size=current.size, mtime_ns=current.mtime_ns
                )
            case Truncated(), files.FileStat(), StreamState():
                log.warning(
                    "recording truncated or replaced; its content becomes a new stream",
                    path=path,
                    stream_id=known.stream_id,
                )
                return FileTruncated(
                    stream_id=known.stream_id, at=now, path=path, size=current.size
                )
            case Idle(reason=reason), files.FileStat(), StreamState() if verdict is not None:
                self._idle_sent[path] = (current.size, current.mtime_ns)
                return StreamIdle(
                    stream_id=known.stream_id,
                    at=now,
                    size=current.size,
                    mtime_ns=current.mtime_ns,
                    reason=reason,
                    mp4=verdict.status.value,
                    mp4_reason=verdict.reason,
                )
        return None

    def _seen(
        self, path: str, current: files.FileStat, now: datetime, continues: Continues | None
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
            key=f"{self._cfg.s3_key_prefix}{stream_id}/{rel}",
            size=current.size,
            mtime_ns=current.mtime_ns,
            inode=current.inode,
            continues=continues,
        )
