"""The live projection: every replica folds the log into memory.

It is a cache of the log, never a second source of truth: ``catch_up`` reads
whatever was appended after the last folded id and folds it with the same pure
function the start-up replay uses. Consumers call it before each decision, so
a decision always sees at least the event that triggered it and every outcome
this replica wrote before. Its size follows what is live or on disk
(``projections.streams``), never the length of the history.

Snapshots (``projections.snapshots``, optional) bound the start-up replay:

* The first ``catch_up`` starts from the stored snapshot, if there is a
  usable one, and reads only the entries after its ``last_id``; otherwise it
  replays the log from its first entry. A snapshot ahead of the log (newer
  than any id the log ever generated: the log was deleted and recreated) is
  ignored. A trimmed log without a usable snapshot is replayed from the
  archive (``history``: the entries trimmed from Redis, kept in the bucket)
  and then from Redis; without an archive that is logged as an error, as the
  result lacks the streams whose first events were trimmed.
* A snapshot is cut when ``snapshot_every`` events were folded since the last
  one this replica loaded or wrote (at the end of a ``catch_up``, never
  mid-replay), and by ``run``'s timer every ``snapshot_interval`` seconds if
  anything was folded since: a quiet system is snapshotted, and so trimmed,
  too. Every replica may snapshot; the store keeps the newest.
* The cut is taken under the lock, as shallow copies of the projection's
  three dicts (their values are immutable, so the copies are one consistent
  state; copying 100k entries takes a few milliseconds). Encoding, the Redis
  write and the retention trim run in background tasks, encoding in a worker
  thread, so neither ``catch_up`` nor the event loop waits for them. One
  write at a time: while one is in flight, a snapshot that falls due waits
  for the next trigger.
* Retention: after a snapshot is stored, and on every tick of the timer
  that finds nothing new to snapshot (time alone moves entries out of the
  window), entries older than
  ``retention_seconds`` that the snapshot covers and no consumer group still
  needs are archived (``archive``, when given: the bucket keeps the audit
  trail) and then trimmed. Only the replica holding ``trim_lease`` trims, so
  replicas do not archive the same entries twice; a trim runs beside the
  snapshot writes, so an archive that waits for S3 (a blocked deployment)
  never holds up the next snapshot.
* A failed write or trim is logged and tried again at the next trigger; it
  never fails ``catch_up``, whose contract is unchanged: it returns the
  projection with every entry appended before the call folded in. ``flush``
  waits for the write and the trim in flight (tests, shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable

import structlog

from cefmp4.adapters.eventlog import Entry, EventLog
from cefmp4.adapters.leases import Lease
from cefmp4.domain.entryids import parse_id
from cefmp4.domain.errors import CefError
from cefmp4.domain.events import UnknownEvent
from projections.snapshots import Archiver, SnapshotStore, encode_snapshot
from projections.streams import Projection

log = structlog.get_logger(__name__)

# The archived entries after an id, decoded (cefmp4.adapters.archive.EventArchive.events).
History = Callable[[str], AsyncIterator[Entry]]


class LiveProjection:
    def __init__(
        self,
        events: EventLog,
        batch: int = 10_000,
        *,
        snapshots: SnapshotStore | None = None,
        snapshot_every: int = 0,
        snapshot_interval: float = 300.0,
        retention_seconds: float = 0.0,
        archive: Archiver | None = None,
        history: History | None = None,
        trim_lease: Lease | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._events = events
        self._batch = batch
        self._lock = asyncio.Lock()
        self._snapshots = snapshots
        self._every = snapshot_every if snapshots is not None else 0
        self._interval = snapshot_interval
        self._retention = retention_seconds if self._every else 0.0
        self._archive = archive
        self._history = history
        self._trim_lease = trim_lease
        self._clock = monotonic
        self._restored = snapshots is None
        self._events_at_snapshot = 0  # state.events when a snapshot was last loaded or cut
        self._writer: asyncio.Task[None] | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._covered: str | None = None  # last_id of the newest snapshot stored or loaded
        # Folds begun, and the number of the last one that completed: a
        # catch_up shares a fold that began after the call did.
        self._folds_started = 0
        self._folded_through = 0
        self.state = Projection()
        if retention_seconds > 0 and not self._every:
            log.warning(
                "event retention is off: it only trims what a snapshot covers, "
                "and snapshots are disabled"
            )

    async def catch_up(self) -> Projection:
        # Calls that queue behind a fold share the next one: a fold that
        # *started* after this call began read every entry appended before
        # it, which is the whole contract. Under load (every handler of three
        # groups and the watcher catch up before each decision) this saves
        # most of the XREADs; alone, a call folds as before.
        arrived = self._folds_started
        async with self._lock:
            if not self._restored:
                await self._restore()
            if self._folded_through <= arrived:
                await self._fold_tail()
            if self._snapshot_due():
                self._start_snapshot()
            return self.state

    async def run(self, stop: asyncio.Event) -> None:
        """Snapshot (and so trim) on a timer until ``stop``, so that a quiet
        system shrinks too; the count trigger lives in ``catch_up``."""
        if not self._every:
            return
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await stop.wait()
            async with self._lock:
                if not self._restored:
                    await self._restore()
                await self._fold_tail()
                if self.state.events > self._events_at_snapshot and self._writer_free():
                    self._start_snapshot()
                else:
                    # Nothing new to snapshot, but time moved: entries the
                    # stored snapshot covers may have left the retention
                    # window since the last trim (a quiet system shrinks too).
                    self._start_trim()
        await self.flush()

    async def flush(self) -> None:
        """Wait until the snapshot write and the trim in flight, if any, have finished."""
        # A write may start a trim as it ends: look again until both are done.
        # Their errors are their own (logged, or _report_crash), not the caller's.
        while pending := [t for t in (self._writer, self._trimmer) if t and not t.done()]:
            await asyncio.wait(pending)

    async def _fold_tail(self) -> None:
        self._folds_started += 1  # under the lock, before the first read
        number = self._folds_started
        collecting = gc.isenabled()
        try:
            await self._fold_pages()
            self._folded_through = number
        finally:
            if collecting:
                gc.enable()

    async def _fold_pages(self) -> None:
        while True:
            entries = await self._events.read_after(self.state.last_id, self._batch)
            self._apply_all(entries)
            if len(entries) < self._batch:
                return
            # A full page: this is a replay (start-up, or a long outage). It
            # allocates millions of short-lived reply objects, none in cycles;
            # the cyclic GC walking them cost a fifth of the replay time.
            # _fold_tail turns it back on when the tail is folded.
            gc.disable()

    async def _restore(self) -> None:
        assert self._snapshots is not None
        snapshot = await self._snapshots.load()
        info = await self._snapshots.log_info()
        if snapshot is not None and parse_id(snapshot.last_id) > parse_id(info.last_generated_id):
            log.warning(
                "ignoring a snapshot ahead of the event log; replaying the log",
                snapshot_id=snapshot.last_id,
                log_last_id=info.last_generated_id,
            )
            snapshot = None
        if snapshot is None and info.trimmed and self._history is not None:
            await self._fold_history(self._history)
        elif snapshot is None:
            if info.trimmed:
                log.error(
                    "the event log was trimmed and there is no usable snapshot: "
                    "streams whose first events were trimmed are missing",
                    log_length=info.length,
                )
        else:
            self.state = snapshot
            self._events_at_snapshot = snapshot.events
            self._covered = snapshot.last_id
            log.info(
                "projection restored from snapshot",
                last_id=snapshot.last_id,
                events=snapshot.events,
                streams=len(snapshot.streams),
            )
        self._restored = True

    async def _fold_history(self, history: History) -> None:
        """Fold what the archive holds; the tail from Redis follows in ``_fold_tail``."""
        log.warning("no usable snapshot and the log is trimmed: replaying the archive first")
        self._apply_all([entry async for entry in history(self.state.last_id)])
        log.info("archive replayed", last_id=self.state.last_id, events=self.state.events)

    def _apply_all(self, entries: list[Entry]) -> None:
        for entry_id, event in entries:
            if isinstance(event, UnknownEvent):
                # A newer writer's event: skip it, but say so once per entry.
                log.warning("skipping undecodable event", id=entry_id, type=event.type)
                self.state.last_id = entry_id
                continue
            self.state.apply(entry_id, event)

    def _snapshot_due(self) -> bool:
        if not self._every or self.state.events - self._events_at_snapshot < self._every:
            return False
        return self._writer_free()

    def _writer_free(self) -> bool:
        return self._writer is None or self._writer.done()

    def _start_snapshot(self) -> None:
        """Cut a consistent copy now (under the lock); encode and write it later."""
        self._events_at_snapshot = self.state.events  # on failure: retry at the next trigger
        state = self.state
        cut = Projection(
            streams=dict(state.streams),
            by_path=dict(state.by_path),
            files=dict(state.files),
            last_id=state.last_id,
            events=state.events,
        )
        self._writer = asyncio.create_task(self._write(cut))
        self._writer.add_done_callback(_report_crash)

    async def _write(self, cut: Projection) -> None:
        assert self._snapshots is not None
        value = await asyncio.to_thread(encode_snapshot, cut)
        try:
            stored = await self._snapshots.save_encoded(cut.last_id, value)
        except CefError as exc:  # translated Redis errors, after the retries
            log.warning("snapshot not written", last_id=cut.last_id, error=str(exc))
            return
        log.info(
            "snapshot written" if stored else "a newer snapshot is stored",
            last_id=cut.last_id,
            events=cut.events,
            streams=len(cut.streams),
            files=len(cut.files),
            size=len(value),
        )
        self._covered = cut.last_id
        self._start_trim()

    def _start_trim(self) -> None:
        """Trim what the stored snapshot covers, unless a trim is running."""
        covered = self._covered
        if self._retention <= 0 or covered is None:
            return
        if self._trimmer is None or self._trimmer.done():
            self._trimmer = asyncio.create_task(self._trim(covered))
            self._trimmer.add_done_callback(_report_crash)

    async def _trim(self, covered_id: str) -> None:
        assert self._snapshots is not None
        lease = self._trim_lease
        if lease is not None and not await lease.acquire():
            return  # another replica archives and trims this round
        try:
            async with lease.kept() if lease is not None else contextlib.nullcontext():
                result = await self._snapshots.trim(covered_id, self._retention, self._archive)
        except CefError as exc:
            log.warning("event log not trimmed", error=str(exc))
            return
        if result.removed:
            log.info(
                "event log trimmed",
                minid=result.minid,
                removed=result.removed,
                limited_by=result.limited_by,
            )


def _report_crash(task: asyncio.Task[None]) -> None:
    """A bug in the writer must not vanish with its task (errors it expects are logged there)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("snapshot writer crashed", exc_info=exc)
