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

Round trips: acknowledgements are sent with the next read (XACK and
XREADGROUP in one pipeline), so a busy group pays one round trip per poll
for its reads, the entries it ignores and the messages its handlers finished
since the last poll, not one per message. A handler that finishes while the
loop waits in a blocking read (a quiet log) acknowledges its message at once,
so nothing stays pending for the length of a block, and ``drain`` sends what
is left. Acknowledging later than possible is always safe (at worst a
message is delivered again after a crash, and handlers are idempotent);
acknowledging before the effect never happens. A read asks for
``READ_AHEAD`` entries per free slot, since a group acts on only some of the
log's types and acknowledges the rest unhandled.

Claims: every ``CLAIM_IDLE_SECONDS / 2`` a pass over the group's pending
entries starts (XAUTOCLAIM from ``0-0``) and goes on, one page per poll and
without blocking, until the cursor Redis returns is ``0-0`` again; so a backlog
of thousands after an outage drains at read speed, not one page per period.

Rolling upgrades: an entry this replica cannot decode (``UnknownEvent``: a
type or version from newer code) is not acknowledged - that would throw away
a fact a newer replica can act on. It stays pending, released at once (idle
time set to the claim threshold) so the next claim pass of any replica takes
it; a newer one handles it, an older one releases it again at most once per
pass. Each such entry is logged and counted once per process, not on every
re-claim, and it is behind the pass's cursor, so it is not claimed twice in
one pass and cannot crowd out the decodable entries behind it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from cefmp4.adapters.eventlog import Entry, EventLog
from cefmp4.adapters.metrics import Metrics
from cefmp4.domain.errors import DeploymentBlocked, PermanentError, StreamEnded, TransientError
from cefmp4.domain.events import Event, FailReason, UnknownEvent

log = structlog.get_logger(__name__)

# Undecodable entry ids remembered per consumer (for "log once"); beyond this
# the oldest are forgotten and, if still pending, logged once more.
REMEMBERED_UNDECODABLE = 10_000
# Entries read per free handler slot. Each group acts on about one type in
# four of a recording's events (FileSeen / StreamIdle / StreamCompleted of
# FileSeen, StreamIdle, StreamCompleted, MetadataWritten), so four per slot
# keep the slots busy with one read; the entries beyond the slots wait for
# one in this consumer's pending list, as a single read's entries always did.
READ_AHEAD = 4

FailStream = Callable[[str, FailReason, str], Awaitable[None]]


class Handler(Protocol):
    """What a consumer group runs for each event it wants.

    ``group`` names the Redis consumer group (one per kind of work; every
    replica joins it). ``wants`` lists the event types it acts on; the loop
    acknowledges every other type without calling it.
    """

    group: str
    wants: tuple[type[Event], ...]

    async def handle(self, event: Event) -> None:
        """Act on ``event`` and append its outcome; returning means done.

        Delivery is at-least-once (a crash before the acknowledgement, a
        claim after a stale lease), so ``handle`` must be idempotent: a second
        call for the same event, after a first that finished or died at any
        step, must leave the store and the log as one call would (decide from
        the projection, which already holds the earlier outcome). Nothing to
        do (an unknown or ended stream) is a plain return.

        It raises rather than catching to log: ``TransientError`` or
        ``DeploymentBlocked`` leaves the message pending (retried after the
        claim idle time); ``StreamEnded`` and any other ``PermanentError``
        ends the stream (``StreamFailed`` with its ``reason``) and
        acknowledges; any other exception is treated as a bug, recorded as
        ``internal_error``. The loop does that (``GroupConsumer._supervised``);
        a handler never appends ``StreamFailed`` itself.
        """
        ...


class GroupConsumer:
    """One consumer group's worker for ``handler`` (see the module docstring).

    :param events: the event log it reads, acknowledges and claims from.
    :param handler: what acts on the group's messages; its ``group`` names
        the consumer group and ``wants`` the event types it handles.
    :param consumer: this replica's consumer name within the group.
    :param fail: ends a stream whose handler failed for good (``failer``).
    :param metrics: where handled messages and errors are counted.
    :param concurrency: messages handled at once.
    :param claim_idle_seconds: how long a message stays pending before a
        claim pass takes it over (``CLAIM_IDLE_SECONDS``).
    """

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
        self._last_claim = -math.inf  # the first poll starts a pass
        self._claim_cursor = "0-0"  # "0-0": no claim pass under way
        self._undecodable: dict[str, None] = {}  # ids logged, oldest first
        self._inflight: set[asyncio.Task[None]] = set()
        # Handled or ignored, not yet acknowledged: sent with the next read.
        self._acks: list[str] = []
        self._blocking = False  # the loop is inside a blocking read
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
        while self._claim_cursor != "0-0":
            handled += await self._poll(None)
        await self.drain()
        return handled

    async def drain(self) -> None:
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await self._flush_acks()

    async def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        try:
            await self._events.ack(self.group, *acks)
        except BaseException:
            self._acks = acks + self._acks  # not known to be acknowledged: keep them
            raise

    async def _poll(self, block_ms: int | None, *, claim: bool = False) -> int:
        entries = await self._claim(force=claim)
        free = max(1, self._concurrency - len(self._inflight))
        passing = bool(entries) or self._claim_cursor != "0-0"
        block = None if passing else block_ms
        acks, self._acks = self._acks, []
        self._blocking = block is not None
        try:
            entries += await self._events.ack_and_read(
                self.group, self._consumer, acks, free * READ_AHEAD, block
            )
        except BaseException:
            self._acks = acks + self._acks  # not known to be acknowledged: keep them
            raise
        finally:
            self._blocking = False
        undecodable = []
        for entry_id, event in entries:
            if isinstance(event, UnknownEvent):
                undecodable.append(entry_id)
                self._note_undecodable(entry_id, event)
                continue
            if not isinstance(event, self._handler.wants):
                self._acks.append(entry_id)  # nothing to do: acknowledged with the next read
                continue
            await self._slots.acquire()
            task = asyncio.create_task(self._dispatch(entry_id, event))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        await self._events.release(self.group, self._consumer, self._claim_idle_ms, *undecodable)
        return len(entries)

    async def _claim(self, *, force: bool) -> list[Entry]:
        """The next page of the claim pass under way, or of a new one if due."""
        if self._claim_cursor == "0-0":
            now = time.monotonic()
            if not force and now - self._last_claim <= self._claim_idle_ms / 2000:
                return []
            self._last_claim = now
        self._claim_cursor, entries = await self._events.claim_stale(
            self.group, self._consumer, self._claim_idle_ms, self._concurrency, self._claim_cursor
        )
        return entries

    def _note_undecodable(self, entry_id: str, event: UnknownEvent) -> None:
        if entry_id in self._undecodable:
            return
        self._undecodable[entry_id] = None
        if len(self._undecodable) > REMEMBERED_UNDECODABLE:
            del self._undecodable[next(iter(self._undecodable))]
        self._metrics.undecodable.labels(self.group, event.label()).inc()
        log.warning(
            "cannot decode entry; left pending for a newer replica",
            group=self.group,
            id=entry_id,
            type=event.label(),
            v=event.v,
            error=event.error,
        )

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
        if self._blocking:
            # The loop waits for new entries (up to its block): do not make
            # this message wait with it.
            await self._events.ack(self.group, entry_id)
        else:
            self._acks.append(entry_id)
