"""One consumer-group worker: read, dispatch, acknowledge, claim.

Life cycle (after arq's worker): ``run(stop)`` loops until ``stop`` is set;
``run_once()`` handles what is available now and returns - the mode tests use.
Delivery is at-least-once: a message is acknowledged only after its handler
returned, i.e. after its effect and outcome event are durable. Messages of
types the group does not act on are acknowledged at once.

This is also the one supervisor per task that the code style allows: a
handler that fails for good (``PermanentError``, or a bug) has the failure
recorded as a ``StreamFailed`` event and a metric, and the message is
acknowledged, so one bad recording can never become a crash loop. A transient
failure that outlived the adapters' retries leaves the message pending; it is
claimed again after ``CLAIM_IDLE_SECONDS`` (by this or another replica).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from cefmp4.errors import DeploymentBlocked, PermanentError, StreamEnded, TransientError
from cefmp4.eventlog import EventLog
from cefmp4.events import Event, FailReason, UnknownEvent
from cefmp4.metrics import Metrics

log = structlog.get_logger(__name__)

FailStream = Callable[[str, FailReason, str], Awaitable[None]]


class Handler(Protocol):
    group: str
    wants: tuple[type[Event], ...]

    async def handle(self, event: Event) -> None: ...


class GroupConsumer:
    def __init__(
        self,
        events: EventLog,
        handler: Handler,
        *,
        consumer: str,
        fail: FailStream,
        metrics: Metrics,
        concurrency: int,
        claim_idle_seconds: float,
    ) -> None:
        self._events = events
        self._handler = handler
        self._consumer = consumer
        self._fail = fail
        self._metrics = metrics
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._claim_idle_ms = int(claim_idle_seconds * 1000)
        self._last_claim = 0.0
        self._inflight: set[asyncio.Task[None]] = set()
        self.group = handler.group

    async def start(self) -> None:
        await self._events.ensure_group(self.group)

    async def run(self, stop: asyncio.Event, block_ms: int = 500) -> None:
        await self.start()
        while not stop.is_set():
            await self._poll(block_ms)
        await self.drain()

    async def run_once(self) -> int:
        """Handle everything available now (and stale claims); for tests."""
        await self.start()
        handled = await self._poll(None, claim=True)
        await self.drain()
        return handled

    async def drain(self) -> None:
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    async def _poll(self, block_ms: int | None, *, claim: bool = False) -> int:
        entries = []
        now = time.monotonic()
        if claim or now - self._last_claim > self._claim_idle_ms / 2000:
            self._last_claim = now
            entries += await self._events.claim_stale(
                self.group, self._consumer, self._claim_idle_ms, self._concurrency
            )
        free = max(1, self._concurrency - len(self._inflight))
        entries += await self._events.read_group(
            self.group, self._consumer, free, None if entries else block_ms
        )
        ignored = []
        for entry_id, event in entries:
            if isinstance(event, UnknownEvent) or not isinstance(event, self._handler.wants):
                ignored.append(entry_id)
                continue
            await self._slots.acquire()
            task = asyncio.create_task(self._dispatch(entry_id, event))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        await self._events.ack(self.group, *ignored)
        return len(entries)

    async def _dispatch(self, entry_id: str, event: Event) -> None:
        try:
            await self._supervised(entry_id, event)
        finally:
            self._slots.release()

    async def _supervised(self, entry_id: str, event: Event) -> None:
        """The one place a stream is failed: a handler raises, this records.

        ``self._fail`` (``consumers.uploads.failer``) aborts the upload, logs
        the end at its level, appends ``StreamFailed`` and counts it, so every
        failure reason takes the same path and the label set stays closed.
        """
        bound = log.bind(group=self.group, stream_id=event.stream_id, event=type(event).__name__)
        try:
            await self._handler.handle(event)
        except TransientError as exc:
            self._metrics.handler_errors.labels(self.group, "transient").inc()
            # retry_now=False: a lease held elsewhere, normal with replicas.
            say = bound.warning if exc.retry_now else bound.info
            say("not done now; message stays pending", error=str(exc))
            return
        except DeploymentBlocked as exc:
            # Only from a store that does not wait (the service's does): still
            # no recording's fault, so the message stays pending.
            self._metrics.handler_errors.labels(self.group, "blocked").inc()
            bound.warning("deployment blocked; message stays pending", cause=exc.cause)
            return
        except StreamEnded as exc:
            self._metrics.handler_errors.labels(self.group, "ended").inc()
            await self._fail(event.stream_id, exc.reason, str(exc))
        except PermanentError as exc:
            self._metrics.handler_errors.labels(self.group, "permanent").inc()
            await self._fail(event.stream_id, exc.reason, str(exc))
        except Exception as exc:  # noqa: BLE001 - the supervisor: record, never crash-loop
            self._metrics.handler_errors.labels(self.group, "internal").inc()
            bound.exception("handler crashed")  # the traceback; the failer logs the end
            await self._fail(event.stream_id, "internal_error", f"{type(exc).__name__}: {exc}")
        await self._events.ack(self.group, entry_id)
