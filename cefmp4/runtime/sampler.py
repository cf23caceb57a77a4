"""Gauges sampled every few seconds rather than counted per event.

What an operator alerts on is mostly a level, not a rate: bytes on disk not
yet durable in S3, the age of the oldest unfinished recording, the consumer
groups' backlog, whether the deployment is blocked. Levels are computed from
the projection (O(live streams): it holds no finished ones) by the pure
functions below, on a timer, so the hot path of an event pays nothing.

Every replica folds the whole log, so every replica reports the same values
for the log-wide levels; dashboards and alerts take ``max`` over replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec

from cefmp4.adapters.metrics import Metrics
from cefmp4.domain.errors import CefError
from projections.live import LiveProjection
from projections.streams import StreamState

SAMPLE_SECONDS = 5.0


class Backlog(msgspec.Struct, frozen=True):
    group: str
    lag: int | None  # None: Redis cannot tell (after deletions it may not)
    pending: int


def not_durable_bytes(streams: Iterable[StreamState]) -> int:
    """Pure: bytes the live streams have on disk beyond their recorded parts."""
    return sum(max(0, s.size - sum(p.size for p in s.parts.values())) for s in streams)


def oldest_unfinished_seconds(streams: Iterable[StreamState], now: datetime) -> float:
    """Pure: how long the oldest live stream has been known (0 with none)."""
    started = [s.started_at for s in streams]
    return max(0.0, (now - min(started)).total_seconds()) if started else 0.0


def backlog_of(infos: Sequence[Mapping[str, Any]]) -> list[Backlog]:
    """Pure: XINFO GROUPS (as redis-py parses it) to one ``Backlog`` per group."""

    def text(value: object) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    out = []
    for info in infos:
        lag = info.get("lag")
        out.append(Backlog(text(info["name"]), None if lag is None else int(lag),
                           int(info.get("pending") or 0)))  # fmt: skip
    return out


class Sampler:
    def __init__(
        self,
        projection: LiveProjection,
        metrics: Metrics,
        now: Callable[[], datetime],
        *,
        backlog: Callable[[], Awaitable[list[Backlog]]] | None = None,
        interval: float = SAMPLE_SECONDS,
    ) -> None:
        self._projection = projection
        self._metrics = metrics
        self._now = now
        self._backlog = backlog
        self._interval = interval

    async def sample(self) -> None:
        m = self._metrics
        # Fold what other replicas appended, so a replica that got no message
        # lately does not report old levels; bounded, as Redis may be away
        # (then the levels folded so far are reported).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._interval):
                await self._projection.catch_up()
        live = self._projection.state.live()
        m.live_streams.set(len(live))
        m.not_durable.set(not_durable_bytes(live))
        m.oldest_unfinished.set(oldest_unfinished_seconds(live, self._now()))
        if self._backlog is not None:
            try:
                async with asyncio.timeout(self._interval):
                    groups = await self._backlog()
            except (CefError, TimeoutError):
                return  # Redis is away: /readyz says so; keep the last values
            for g in groups:
                if g.lag is not None:
                    m.group_lag.labels(g.group).set(g.lag)
                m.group_pending.labels(g.group).set(g.pending)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await stop.wait()
