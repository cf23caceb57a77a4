"""The operator's HTTP endpoint: /metrics, /healthz, /readyz, 404, PROM_PORT.

Pure decisions are tested with an injected clock; the wedged loop with a real
server thread and a real event loop that is made to block; readiness and the
port choice against real ``python -m cefmp4 run`` processes and real Redis.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge

from cefmp4.adapters.environment import load
from cefmp4.dev.localservers import RedisServer
from cefmp4.domain.config import Config
from cefmp4.runtime.health import READY_CHECKS, Check, Health, keep_beating, liveness, readiness
from cefmp4.runtime.httpserver import (
    DEFAULT_PORT,
    PATHS,
    Endpoints,
    OpsServer,
    open_server,
    port_choices,
)
from tests.harness import ServiceProcess
from tests.scrape import endpoint_port, get, poll, until_answer


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- pure: decisions and routing ---


@given(age=st.floats(min_value=0, max_value=1e6), bound=st.floats(min_value=0.1, max_value=60))
def test_liveness_is_ok_exactly_while_the_heartbeat_is_young(age: float, bound: float) -> None:
    now = 500.0 + age
    verdict = liveness(heartbeat=500.0, now=now, bound=bound)
    assert verdict.ok == (now - 500.0 <= bound)
    assert verdict.checks["loop"]["ok"] == verdict.ok


outcomes = st.one_of(
    st.none(),  # never probed
    st.tuples(st.booleans(), st.floats(min_value=0, max_value=100)),  # (ok, age)
)


@given(st.fixed_dictionaries({name: outcomes for name in READY_CHECKS}))
def test_readiness_needs_every_check_ok_and_fresh(
    given_checks: dict[str, tuple[bool, float] | None],
) -> None:
    now, bound = 1000.0, 15.0
    checks = {n: Check(o[0], now - o[1], "why") for n, o in given_checks.items() if o is not None}
    verdict = readiness(checks, now, bound)
    expected = all(
        o is not None and o[0] and now - (now - o[1]) <= bound for o in given_checks.values()
    )
    assert verdict.ok == expected
    assert set(verdict.checks) == set(READY_CHECKS)


def test_healthz_answers_503_with_json_once_the_loop_stops_beating() -> None:
    clock = Clock()
    health = Health(clock, live_bound=5.0)
    endpoints = Endpoints(CollectorRegistry(), health)
    status, kind, body = endpoints.respond("/healthz")
    assert (status, kind) == (200, "application/json")
    assert json.loads(body)["status"] == "ok"
    clock.now += 5.0
    assert endpoints.respond("/healthz").status == 200  # at the bound: still live
    clock.now += 0.5  # no beat for 5.5 s: the loop is wedged
    status, _, body = endpoints.respond("/healthz")
    assert status == 503
    answer = json.loads(body)
    assert answer["status"] == "failing"
    assert answer["checks"]["loop"] == {"ok": False, "heartbeat_age_seconds": 5.5}
    health.beat()
    assert endpoints.respond("/healthz?verbose=1").status == 200


def test_readyz_follows_the_probe_results_and_their_age() -> None:
    clock = Clock()
    health = Health(clock, ready_bound=15.0)
    endpoints = Endpoints(CollectorRegistry(), health)
    status, _, body = endpoints.respond("/readyz")
    assert status == 503
    assert json.loads(body)["checks"]["redis"] == {"ok": False, "detail": "not probed yet"}
    health.record({name: Check(True, clock.now) for name in READY_CHECKS})
    assert endpoints.respond("/readyz").status == 200
    health.record({"blocked": Check(False, clock.now, "bucket is read-only")})
    status, _, body = endpoints.respond("/readyz")
    assert status == 503
    assert json.loads(body)["checks"]["blocked"]["detail"] == "bucket is read-only"
    health.record({"blocked": Check(True, clock.now)})
    assert endpoints.respond("/readyz").status == 200
    clock.now += 16  # the probes stopped reporting (a wedged loop)
    status, _, body = endpoints.respond("/readyz")
    assert status == 503
    assert "stale" in json.loads(body)["checks"]["s3"]["detail"]


@given(st.text(min_size=1).map(lambda t: "/" + t.lstrip("/")))
def test_other_paths_are_404(path: str) -> None:
    endpoints = Endpoints(CollectorRegistry(), Health())
    route = path.split("?", 1)[0].split("#", 1)[0]
    status = endpoints.respond(path).status
    assert status == 404 if route not in PATHS else status in (200, 503)


def test_metrics_page_is_the_registry_in_prometheus_text() -> None:
    registry = CollectorRegistry()
    Gauge("cefmp4_example", "An example", registry=registry).set(3)
    status, kind, body = Endpoints(registry, Health()).respond("/metrics")
    assert status == 200
    assert kind == CONTENT_TYPE_LATEST
    assert b"cefmp4_example 3.0" in body


def test_port_choices_and_their_spelling() -> None:
    assert port_choices(None) == (DEFAULT_PORT, 0)  # unset: 8000, else a free one
    assert port_choices(0) == (0,)
    assert port_choices(9123) == (9123,)
    assert port_choices("off") == ()
    assert load({}, env_file=None).prom_port is None
    assert load({"PROM_PORT": "off"}, env_file=None).prom_port == "off"
    assert load({"PROM_PORT": "0"}, env_file=None).prom_port == 0
    assert open_server(Endpoints(CollectorRegistry(), Health()), "127.0.0.1", "off") is None


# --- a real server thread beside a real event loop ---


@pytest.fixture
def loop_in_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def test_healthz_fails_while_the_loop_is_wedged_and_recovers(
    loop_in_thread: asyncio.AbstractEventLoop,
) -> None:
    health = Health(live_bound=1.0)
    beating = asyncio.run_coroutine_threadsafe(keep_beating(health, interval=0.05), loop_in_thread)
    release = threading.Event()
    try:
        with OpsServer(Endpoints(CollectorRegistry(), health), "127.0.0.1", 0) as server:
            assert get(server.port, "/healthz")[0] == 200
            # A blocking call in the loop: nothing else in it runs any more,
            # and only a server outside the loop can still say so.
            loop_in_thread.call_soon_threadsafe(release.wait, 60)
            status, body = until_answer(server.port, "/healthz", lambda s: s != 200, timeout=30)
            assert status == 503
            assert json.loads(body)["checks"]["loop"]["ok"] is False
            release.set()
            until_answer(server.port, "/healthz", lambda s: s == 200, what="recovery")
    finally:
        release.set()
        beating.cancel()


# --- the real service ---


def test_running_service_serves_metrics_and_probes_on_a_free_port(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config()
    assert config.prom_port == 0  # the kernel picks the port; the log says which
    with ServiceProcess(config, tmp_path / "service.log") as service:
        port = endpoint_port(service)
        assert port != 0
        status, body = get(port, "/healthz")
        assert status == 200, body
        assert json.loads(body) == {
            "status": "ok",
            "checks": {"loop": json.loads(body)["checks"]["loop"]},
        }
        status, body = until_answer(port, "/readyz", lambda s: s == 200)
        checks = json.loads(body)["checks"]
        assert {n: c["ok"] for n, c in checks.items()} == {n: True for n in READY_CHECKS}
        assert get(port, "/nothing-here")[0] == 404
        assert get(port, "/")[0] == 404
        status, page = get(port, "/metrics")
        assert status == 200
        assert b"cefmp4_live_streams " in page
        assert b"process_resident_memory_bytes " in page
        # The only replica holds the watcher lease, and says so.
        poll(
            lambda: b"cefmp4_watcher_lease_held 1.0" in get(port, "/metrics")[1] or None,
            what="the lease gauge",
        )


def test_readyz_fails_while_redis_is_down_and_recovers(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    with RedisServer(tmp_path / "redis") as redis_server:
        config = msgspec.structs.replace(make_config(), redis_url=redis_server.url)
        with ServiceProcess(config, tmp_path / "service.log") as service:
            port = endpoint_port(service)
            until_answer(port, "/readyz", lambda s: s == 200, what="ready")
            redis_server.kill()
            status, body = until_answer(port, "/readyz", lambda s: s != 200, what="unready")
            assert status == 503
            checks = json.loads(body)["checks"]
            assert checks["redis"]["ok"] is False, checks
            assert checks["s3"]["ok"] is True, checks
            assert get(port, "/healthz")[0] == 200  # alive all along: waiting is no wedge
            redis_server.start()
            until_answer(port, "/readyz", lambda s: s == 200, what="ready again")


def test_two_replicas_with_the_default_port_both_serve_metrics(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config()
    replicas = [ServiceProcess(config, tmp_path / f"r{i}.log", f"r{i}") for i in (1, 2)]
    for replica in replicas:
        del replica.env["PROM_PORT"]  # the documented default: unset
    with replicas[0] as first, replicas[1] as second:
        ports = [endpoint_port(first), endpoint_port(second)]
        assert ports[0] != ports[1]
        for port in ports:
            status, page = get(port, "/metrics")
            assert status == 200
            assert b"cefmp4_live_streams " in page

        def holders() -> int | None:
            held = [b"cefmp4_watcher_lease_held 1.0" in get(p, "/metrics")[1] for p in ports]
            return 1 if sum(held) == 1 else None

        poll(holders, what="exactly one replica reporting the watcher lease")


def test_a_taken_prom_port_stops_the_start_with_one_line(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = ServiceProcess(make_config(prom_port=port), tmp_path / "service.log")
        service.start()
        try:
            assert service.proc is not None
            assert service.proc.wait(timeout=60) == 2, service.tail()
        finally:
            service.stop()
        lines = [line for line in service.log_tail().splitlines() if "PROM_PORT" in line]
        assert len(lines) == 1, service.tail()
        assert f"PROM_PORT={port}: the port is in use" in lines[0]
        assert "PROM_PORT=0" in lines[0]  # and what to do about it
