"""The alert rules on real series: a real Prometheus scrapes a running service.

``test_alerts`` proves the rules on synthetic series (promtool test rules);
this proves them against what the service really exports. Debian's
``prometheus`` (installed by deploy/bootstrap.sh with promtool) runs on a
free loopback port, scrapes a ``cefmp4 run`` child every second and evaluates
deploy/prometheus/alerts.yml: every rule evaluates without error on the real
series, the no-watcher alert is quiet while a replica watches, and it starts
(pending) once no replica does. A missing prometheus binary is a failure.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cefmp4.dev.localservers import free_port
from cefmp4.domain.config import Config
from tests.harness import ServiceProcess
from tests.scrape import endpoint_port, get, poll

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], int]]:
    """``start(target_port) -> api port``: a private Prometheus, stopped after the test."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is missing: deploy/bootstrap.sh installs Debian's prometheus")
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: int) -> int:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{json.dumps(str(RULES))}]\n"
            "scrape_configs:\n"
            f"  - job_name: cefmp4\n    static_configs: [{{targets: ['127.0.0.1:{target}']}}]\n"
        )
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        )
        return port

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def api(port: int, path: str) -> Any:
    """The API's ``data``, or None while Prometheus is not (yet) answering."""
    try:
        status, body = get(port, path)
    except urllib.error.URLError:
        return None
    return json.loads(body)["data"] if status == 200 else None


def rules(port: int) -> list[dict[str, Any]] | None:
    data = api(port, "/api/v1/rules")
    if not data or not data["groups"]:
        return None
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_alert_rules_evaluate_on_the_service_real_series(
    make_config: Callable[..., Config],
    tmp_path: Path,
    prometheus: Callable[[int], int],
) -> None:
    service = ServiceProcess(make_config(), tmp_path / "service.log")
    with service:
        api_port = prometheus(endpoint_port(service))
        query = urllib.parse.quote("sum(cefmp4_watcher_lease_held)")

        def watched() -> bool | None:
            data = api(api_port, f"/api/v1/query?query={query}")
            return (
                True if data and data["result"] and data["result"][0]["value"][1] == "1" else None
            )

        poll(watched, timeout=60, what="Prometheus to see the watcher lease on the real page")

        def evaluated() -> list[dict[str, Any]] | None:
            # Every rule evaluated after the first scrape: before it, no series
            # exist and the no-watcher rule is (rightly) pending.
            got = rules(api_port)
            if got is None or any(r["lastEvaluation"].startswith("0001") for r in got):
                return None
            quiet = all(r["state"] == "inactive" for r in got if r["name"] == "CefMP4NoWatcher")
            return got if quiet else None

        evaluated_rules = poll(evaluated, timeout=60, what="every rule evaluated on real series")
        assert {r["name"] for r in evaluated_rules} == set(
            line.split("alert:")[1].strip()
            for line in RULES.read_text().splitlines()
            if "- alert:" in line
        )
        bad = [(r["name"], r.get("lastError")) for r in evaluated_rules if r["health"] != "ok"]
        assert bad == []
        states = {r["name"]: r["state"] for r in evaluated_rules}
        assert states["CefMP4NoWatcher"] == "inactive"
        assert states["CefMP4Blocked"] == "inactive"
    # No replica left: the no-watcher alert starts.

    def no_watcher() -> str | None:
        got = rules(api_port) or []
        state = next((r["state"] for r in got if r["name"] == "CefMP4NoWatcher"), "inactive")
        return state if state in ("pending", "firing") else None

    assert poll(no_watcher, timeout=60, what="CefMP4NoWatcher to start") in ("pending", "firing")
