"""Liveness and readiness: what ``/healthz`` and ``/readyz`` answer.

The HTTP server runs in a thread of its own (``cefmp4.runtime.httpserver``), so it
answers while the event loop does not - which is the point of a liveness
probe: a loop stuck in a blocking call or a busy loop stops stamping its
heartbeat, and ``/healthz`` fails once the stamp is older than ``live_bound``.
A metrics page served by the loop itself could not tell that apart from a
healthy process.

Readiness is decided from what tasks *in the loop* last observed: a probe
PINGs Redis and lists an empty prefix of the bucket (a missing bucket, wrong
credentials or an unreachable endpoint all fail it; HEAD of an object would
answer 404 for a missing bucket too) every ``interval`` seconds, and samples
the ``blocked`` callable (the cause when the deployment is blocked, else
None). ``/readyz`` is 200 only while every check succeeded and is younger
than ``ready_bound``: a wedged loop goes unready as its results age.

The loop writes and the HTTP thread reads. ``Health`` holds only immutable
values, replaced whole by assignment (atomic in CPython), so no lock is
needed and the thread never sees half an update. Decisions are the pure
functions ``liveness`` and ``readiness`` of those values and a clock reading.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType

import msgspec
import structlog

from cefmp4.domain.errors import CefError

log = structlog.get_logger(__name__)

HEARTBEAT_SECONDS = 0.5  # how often the loop stamps its heartbeat
LIVE_BOUND_SECONDS = 5.0  # /healthz fails when the stamp is older
PROBE_INTERVAL_SECONDS = 5.0  # pause between two rounds of readiness probes (each an S3 request)
PROBE_TIMEOUT_SECONDS = 5.0  # one probe longer than this failed
READY_BOUND_SECONDS = 20.0  # a probe result older than this no longer counts

# The checks /readyz requires; one that never reported is failing.
READY_CHECKS = ("redis", "s3", "blocked")

BlockedReason = Callable[[], str | None]
ProbeCall = Callable[[], Awaitable[object]]


def not_blocked() -> str | None:
    """The ``blocked`` callable of a deployment that has no such state."""
    return None


class Check(msgspec.Struct, frozen=True):
    """One probe's outcome at monotonic time ``at``."""

    ok: bool
    at: float
    detail: str = ""


class Verdict(msgspec.Struct, frozen=True):
    """What an endpoint answers: ``ok`` and, per check, the JSON-ready details."""

    ok: bool
    checks: dict[str, dict[str, object]]

    def body(self) -> bytes:
        return msgspec.json.encode(
            {"status": "ok" if self.ok else "failing", "checks": self.checks}
        )


def liveness(heartbeat: float, now: float, bound: float = LIVE_BOUND_SECONDS) -> Verdict:
    """Pure: live while the loop's last heartbeat is at most ``bound`` old."""
    age = max(0.0, now - heartbeat)
    ok = age <= bound
    return Verdict(ok, {"loop": {"ok": ok, "heartbeat_age_seconds": round(age, 3)}})


def readiness(
    checks: Mapping[str, Check],
    now: float,
    bound: float = READY_BOUND_SECONDS,
    required: tuple[str, ...] = READY_CHECKS,
) -> Verdict:
    """Pure: ready while every required check succeeded within ``bound``."""
    out: dict[str, dict[str, object]] = {}
    for name in required:
        check = checks.get(name)
        if check is None:
            out[name] = {"ok": False, "detail": "not probed yet"}
            continue
        age = max(0.0, now - check.at)
        fresh = age <= bound
        detail = check.detail if fresh else f"stale: last probed {age:.0f}s ago"
        entry: dict[str, object] = {"ok": check.ok and fresh, "age_seconds": round(age, 3)}
        if detail:
            entry["detail"] = detail
        out[name] = entry
    return Verdict(all(c["ok"] for c in out.values()), out)


class Health:
    """The loop's observations, for the HTTP thread to judge.

    The heartbeat starts at construction, so a starting process (replaying
    its log, waiting for S3) is live as long as its loop keeps stamping.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        live_bound: float = LIVE_BOUND_SECONDS,
        ready_bound: float = READY_BOUND_SECONDS,
    ) -> None:
        self._clock = clock
        self.live_bound = live_bound
        self.ready_bound = ready_bound
        self.heartbeat = clock()
        self.checks: Mapping[str, Check] = MappingProxyType({})

    def now(self) -> float:
        return self._clock()

    def beat(self) -> None:
        self.heartbeat = self._clock()

    def record(self, checks: Mapping[str, Check]) -> None:
        """Replace the probe results (one assignment: the reader sees old or new)."""
        self.checks = MappingProxyType({**self.checks, **checks})

    def liveness(self) -> Verdict:
        return liveness(self.heartbeat, self._clock(), self.live_bound)

    def readiness(self) -> Verdict:
        return readiness(self.checks, self._clock(), self.ready_bound)


async def keep_beating(health: Health, interval: float = HEARTBEAT_SECONDS) -> None:
    """Stamp the heartbeat until cancelled: proof that the loop gets around.

    It runs until cancelled rather than until ``stop``: a process finishing
    in-flight work during its shutdown grace is alive too.
    """
    while True:
        health.beat()
        await asyncio.sleep(interval)


class Probes:
    """Readiness probes, run in the event loop every ``interval`` seconds.

    ``calls`` maps a check name to a coroutine function that raises when the
    dependency does not answer (the adapters raise our ``CefError`` tree;
    ``timeout`` cuts off one that hangs). ``blocked`` is sampled with them.
    """

    def __init__(
        self,
        health: Health,
        calls: Mapping[str, ProbeCall],
        blocked: BlockedReason = not_blocked,
        *,
        interval: float = PROBE_INTERVAL_SECONDS,
        timeout: float = PROBE_TIMEOUT_SECONDS,
    ) -> None:
        self._health = health
        self._calls = dict(calls)
        self._blocked = blocked
        self._interval = interval
        self._timeout = timeout
        self._failing: set[str] = set()

    async def once(self) -> None:
        names = list(self._calls)
        results = await asyncio.gather(*(self._probe(self._calls[n]) for n in names))
        checks = dict(zip(names, results, strict=True))
        cause = self._blocked()
        checks["blocked"] = Check(cause is None, self._health.now(), cause or "")
        self._log_changes(checks)
        self._health.record(checks)

    async def run(self) -> None:
        """Probe until cancelled."""
        while True:
            await self.once()
            await asyncio.sleep(self._interval)

    async def _probe(self, call: ProbeCall) -> Check:
        try:
            async with asyncio.timeout(self._timeout):
                await call()
        except TimeoutError:
            return Check(False, self._health.now(), f"no answer within {self._timeout:g}s")
        except CefError as exc:
            return Check(False, self._health.now(), str(exc))
        return Check(True, self._health.now())

    def _log_changes(self, checks: Mapping[str, Check]) -> None:
        # One line when a check starts or stops failing, not one per round.
        for name, check in checks.items():
            if not check.ok and name not in self._failing:
                self._failing.add(name)
                log.warning("readiness check failing", check=name, detail=check.detail)
            elif check.ok and name in self._failing:
                self._failing.discard(name)
                log.info("readiness check ok again", check=name)
