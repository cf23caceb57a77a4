"""Whether the deployment is blocked, and waiting until it is not.

A credential, permission, clock or bucket problem (``DeploymentBlocked``) is a
condition of the whole deployment: every request fails the same way until an
operator fixes it. So work does not fail; each S3 call that meets it waits
here and tries again, in place, holding its stream (the lease keeps being
renewed meanwhile), and resumes the moment S3 accepts again.

One ``Blocked`` per process, owned by the ``Service`` and handed to the S3
adapter; no module-level state. It turns many waiting calls into one story
for the operator: a WARNING when a cause starts (with S3's message), an INFO
when it ends, and the gauge ``cefmp4_blocked{cause}`` at 1 meanwhile - not a
line per retry.

When it ends: a call that was itself blocked succeeded (the cause is fixed
for it), or any call succeeded while none is waiting (a stale state, e.g.
the blocked call was cancelled at shutdown). A call that was never blocked
succeeding while others wait proves nothing (a policy may allow listing but
deny uploads), so it does not end the state. Every waiter wakes when the
state ends, instead of sleeping out its backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import structlog
from prometheus_client import Gauge

from cefmp4.domain.errors import BLOCK_CAUSES, BlockCause, DeploymentBlocked

log = structlog.get_logger(__name__)
T = TypeVar("T")

FIRST_WAIT_SECONDS = 0.5
MAX_WAIT_SECONDS = 30.0


def blocked_wait(attempt: int, *, first: float = FIRST_WAIT_SECONDS,
                 cap: float = MAX_WAIT_SECONDS) -> float:  # fmt: skip
    """Seconds before try ``attempt + 1`` of a blocked call: doubling, capped.

    No jitter: the waiters of one process wake together anyway when the state
    ends, and a few replicas probing every ``cap`` seconds is no load.
    """
    return min(cap, first * (1 << min(attempt, 32)))


class Blocked:
    def __init__(self, gauge: Gauge, *, wait: Callable[[int], float] = blocked_wait) -> None:
        self._gauge = gauge
        self._wait = wait  # attempt -> seconds; injected so tests need no clock
        self._causes: dict[BlockCause, str] = {}  # cause -> S3's message when it started
        self._since = 0.0
        self._since_at = datetime.now(UTC)  # wall clock of _since, for cefmp4 status
        self._waiting = 0  # calls that met a block and have not ended yet
        self._ended = asyncio.Event()
        for cause in BLOCK_CAUSES:
            gauge.labels(cause).set(0)

    @property
    def causes(self) -> frozenset[BlockCause]:
        return frozenset(self._causes)

    def first(self) -> tuple[BlockCause, datetime, str] | None:
        """(cause, since when, S3's message) of the first cause, or None."""
        if not self._causes:
            return None
        cause = sorted(self._causes)[0]
        return cause, self._since_at, self._causes[cause]

    def reason(self) -> str | None:
        """Why the deployment is blocked (causes and S3's first message), or None:
        what /readyz and ``cefmp4 status`` show."""
        if not self._causes:
            return None
        return "; ".join(f"{cause}: {message}" for cause, message in sorted(self._causes.items()))

    async def through(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        repair: Callable[[BlockCause], Awaitable[None]] | None = None,
    ) -> T:
        """``call()``, tried again for as long as it raises ``DeploymentBlocked``.

        ``repair`` is given each block's cause before the wait (the S3 adapter
        creates a missing bucket again). Other errors pass through.
        Cancellable like any await: shutdown's grace period ends the wait.
        """
        attempt = 0
        blocked_here = False
        try:
            while True:
                try:
                    result = await call()
                except DeploymentBlocked as exc:
                    if not blocked_here:
                        blocked_here = True
                        self._waiting += 1
                    self._enter(exc.cause, str(exc))
                    if repair is not None:
                        await repair(exc.cause)
                    await self._pause(attempt)
                    attempt += 1
                    continue
                self._succeeded(was_blocked=blocked_here)
                return result
        finally:
            if blocked_here:
                self._waiting -= 1

    def _enter(self, cause: BlockCause, message: str) -> None:
        """A call met ``cause``; logs and raises the gauge only when it is new."""
        if cause in self._causes:
            return
        if not self._causes:
            self._since = time.monotonic()
            self._since_at = datetime.now(UTC)
            self._ended = asyncio.Event()
        self._causes[cause] = message
        self._gauge.labels(cause).set(1)
        log.warning(
            "deployment blocked: S3 refuses our requests; waiting, nothing is failed",
            cause=cause,
            error=message,
        )

    def _succeeded(self, *, was_blocked: bool) -> None:
        """A call went through; ends the state if that proves the cause fixed."""
        if not self._causes or (not was_blocked and self._waiting):
            return
        causes = sorted(self._causes)
        for cause in causes:
            self._gauge.labels(cause).set(0)
        self._causes.clear()
        self._ended.set()
        log.info(
            "deployment unblocked: S3 accepts our requests again",
            causes=causes,
            blocked_seconds=round(time.monotonic() - self._since, 1),
        )

    async def _pause(self, attempt: int) -> None:
        """The backoff, or less if the state ends meanwhile."""
        ended = self._ended
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._wait(attempt)):
                await ended.wait()
