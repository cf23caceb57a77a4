"""The live projection: every replica folds the whole log into memory.

It is a cache of the log, never a second source of truth: ``catch_up`` reads
whatever was appended after the last folded id and folds it with the same pure
function the start-up replay uses. Consumers call it before each decision, so
a decision always sees at least the event that triggered it and every outcome
this replica wrote before.
"""

from __future__ import annotations

import asyncio

import structlog

from cefmp4.eventlog import EventLog
from cefmp4.events import UnknownEvent
from projections.streams import Projection

log = structlog.get_logger(__name__)


class LiveProjection:
    def __init__(self, events: EventLog, batch: int = 10_000) -> None:
        self._events = events
        self._batch = batch
        self._lock = asyncio.Lock()
        self.state = Projection()

    async def catch_up(self) -> Projection:
        async with self._lock:
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
                    return self.state
