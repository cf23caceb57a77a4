"""The live projection: every replica folds the whole log into memory.

It is a cache of the log, never a second source of truth: ``catch_up`` reads
whatever was appended after the last folded id and folds it with the same pure
function the start-up replay uses. Consumers call it before each decision, so
a decision always sees at least the event that triggered it and every outcome
this replica wrote before.

Snapshots (``projections.snapshots``, optional) bound the start-up replay:

* The first ``catch_up`` starts from the stored snapshot, if there is a
  usable one, and reads only the entries after its ``last_id``; otherwise it
  replays the log from its first entry. A snapshot ahead of the log (newer
  than any id the log ever generated: the log was deleted and recreated) is
  ignored. Replaying a trimmed log without a snapshot is logged as an error:
  the result lacks the streams whose first events were trimmed.
* A ``catch_up`` that has folded ``snapshot_every`` events or more since the
  snapshot this replica last loaded or wrote starts a new one, at its end
  (never mid-replay). Every replica may; the store keeps the newest.
* The cut is taken inside ``catch_up``, under the lock: the mutable
  ``Projection`` is encoded there, so the bytes are one consistent state.
  Encoding is CPU work that blocks the event loop (about 0.2 s for 10k
  streams with 470k parts, see ``tests/bench/bench_replay.py``); the Redis
  write and the retention trim that follows it run in a background task, so
  ``catch_up`` does not wait for them. One write at a time: while one is in
  flight, the next ``catch_up`` that finds a snapshot due leaves it for later.
* A failed write or trim is logged and tried again after another
  ``snapshot_every`` events; it never fails ``catch_up``, whose contract is
  unchanged: it returns the projection with every entry appended before the
  call folded in. ``flush`` waits for the write in flight (tests, shutdown).
"""

from __future__ import annotations

import asyncio
import gc

import structlog

from cefmp4.errors import CefError
from cefmp4.eventlog import EventLog
from cefmp4.events import UnknownEvent
from projections.snapshots import SnapshotStore, encode_snapshot, parse_id
from projections.streams import Projection

log = structlog.get_logger(__name__)


class LiveProjection:
    def __init__(
        self,
        events: EventLog,
        batch: int = 10_000,
        *,
        snapshots: SnapshotStore | None = None,
        snapshot_every: int = 0,
        retention_seconds: float = 0.0,
    ) -> None:
        self._events = events
        self._batch = batch
        self._lock = asyncio.Lock()
        self._snapshots = snapshots
        self._every = snapshot_every if snapshots is not None else 0
        self._retention = retention_seconds if self._every else 0.0
        self._restored = snapshots is None
        self._events_at_snapshot = 0  # state.events when a snapshot was last loaded or cut
        self._writer: asyncio.Task[None] | None = None
        self.state = Projection()
        if retention_seconds > 0 and not self._every:
            log.warning(
                "event retention is off: it only trims what a snapshot covers, "
                "and snapshots are disabled"
            )

    async def catch_up(self) -> Projection:
        async with self._lock:
            if not self._restored:
                await self._restore()
            await self._fold_tail()
            if self._snapshot_due():
                self._start_snapshot()
            return self.state

    async def flush(self) -> None:
        """Wait until the snapshot write in flight, if any, has finished."""
        writer = self._writer
        if writer is not None:
            await asyncio.shield(writer)

    async def _fold_tail(self) -> None:
        collecting = gc.isenabled()
        try:
            await self._fold_pages()
        finally:
            if collecting:
                gc.enable()

    async def _fold_pages(self) -> None:
        while True:
            entries = await self._events.read_after(self.state.last_id, self._batch)
            for entry_id, event in entries:
                if isinstance(event, UnknownEvent):
                    # A newer writer's event: skip it, but say so once per entry.
                    log.warning("skipping undecodable event", id=entry_id, type=event.type)
                    self.state.last_id = entry_id
                    continue
                self.state.apply(entry_id, event)
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
        if snapshot is None:
            if info.trimmed:
                log.error(
                    "the event log was trimmed and there is no usable snapshot: "
                    "streams whose first events were trimmed are missing",
                    log_length=info.length,
                )
        else:
            self.state = snapshot
            self._events_at_snapshot = snapshot.events
            log.info(
                "projection restored from snapshot",
                last_id=snapshot.last_id,
                events=snapshot.events,
                streams=len(snapshot.streams),
            )
        self._restored = True

    def _snapshot_due(self) -> bool:
        if not self._every or self.state.events - self._events_at_snapshot < self._every:
            return False
        return self._writer is None or self._writer.done()

    def _start_snapshot(self) -> None:
        self._events_at_snapshot = self.state.events  # on failure: retry after another N
        last_id = self.state.last_id
        value = encode_snapshot(self.state)  # the consistent cut: before the next fold
        self._writer = asyncio.create_task(self._write(last_id, value, self.state.events))
        self._writer.add_done_callback(_report_crash)

    async def _write(self, last_id: str, value: bytes, events: int) -> None:
        assert self._snapshots is not None
        try:
            stored = await self._snapshots.save_encoded(last_id, value)
        except CefError as exc:  # translated Redis errors, after the retries
            log.warning("snapshot not written", last_id=last_id, error=str(exc))
            return
        log.info(
            "snapshot written" if stored else "a newer snapshot is stored",
            last_id=last_id,
            events=events,
            size=len(value),
        )
        if self._retention <= 0:
            return
        try:
            result = await self._snapshots.trim(last_id, self._retention)
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
