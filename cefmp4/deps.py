"""What every worker is handed: config, adapters, clock, metrics. Built once in
``cefmp4.service`` and passed in, so tests can inject their own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cefmp4.config import Config
from cefmp4.eventlog import EventLog
from cefmp4.events import Event
from cefmp4.metrics import Metrics
from cefmp4.storage import ObjectStore
from cefmp4.streamlocks import StreamLocks
from projections.live import LiveProjection


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Deps:
    config: Config
    events: EventLog
    projection: LiveProjection
    store: ObjectStore
    locks: StreamLocks
    metrics: Metrics
    now: Callable[[], datetime] = utcnow

    async def emit(self, event: Event) -> str:
        entry_id = await self.events.append(event)
        self.metrics.events.labels(type(event).__name__).inc()
        return entry_id
