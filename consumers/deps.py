"""What every worker is handed: config, adapters, clock, metrics. Built once in
``cefmp4.runtime.service`` and passed in, so tests can inject their own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cefmp4.adapters.eventlog import EventLog
from cefmp4.adapters.leases import Fence, StreamLeases
from cefmp4.adapters.metrics import Metrics
from cefmp4.adapters.storage import ObjectStore
from cefmp4.domain.config import Config
from cefmp4.domain.events import Event
from cefmp4.domain.partplan import PartPlan
from projections.live import LiveProjection
from projections.streams import StreamState


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Deps:
    """What a worker is handed.

    :param config: the parsed, immutable Config.
    :param events: the event log (plain appends; fenced ones go through a Fence).
    :param projection: the live fold of the log.
    :param store: the object store.
    :param stream_leases: one actor per stream (``StreamLeases.hold``).
    :param metrics: the process's Prometheus metrics.
    :param now: the wall clock of events.
    """

    config: Config
    events: EventLog
    projection: LiveProjection
    store: ObjectStore
    stream_leases: StreamLeases
    metrics: Metrics
    now: Callable[[], datetime] = utcnow

    def plan_of(self, s: StreamState) -> PartPlan:
        """How ``s``'s file is cut into parts: the plan its FileSeen recorded,
        or for a stream seen before plans were recorded, CHUNK_SIZE_BYTES."""
        return s.plan or self.config.unrecorded_plan

    async def emit(self, event: Event, fence: Fence | None = None) -> str:
        """Append ``event``; through ``fence`` when it is about a stream this
        process holds, so a replica that lost the lease cannot record it."""
        if fence is None:
            entry_id = await self.events.append(event)
        else:
            entry_id = await fence.append(event, self.events.replica)
        self.metrics.events.labels(type(event).__name__).inc()
        return entry_id
