"""The /metrics page of a real service that did some work: it passes
``promtool check metrics``, and every metric the dashboard (deploy/grafana)
and the alert rules (deploy/prometheus) query is on it.

The page is scraped from ``python -m cefmp4 run`` after a recording went
through (so histograms and labelled counters have samples). Names are read
from the page's families and their types, so a family without samples yet
still counts as exported.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cefmp4.domain.config import Config
from tests.harness import ServiceProcess
from tests.scrape import endpoint_port, get, poll, promtool

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "cefmp4.json"
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"

# The seed's name keeps its type in it, which promtool's lint flags; kept for
# the seed's dashboards (docs/METRICS.md). Nothing else may be flagged.
SEED_LINT_EXEMPTIONS = {"active_streams_gauge metric name should not include type 'gauge'"}

# What the service exports starts with one of these; an expression's other
# identifiers are PromQL (functions, keywords, label names).
SERVICE_PREFIXES = ("cefmp4_", "video_", "streams_", "active_streams", "process_", "python_")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "unknown": ("",),
    "info": ("_info",),
}


@pytest.fixture
def page(make_config: Callable[..., Config], watch: Path, tmp_path: Path) -> str:
    """/metrics of a running service, scraped after one recording completed."""
    with ServiceProcess(make_config(), tmp_path / "service.log") as service:
        port = endpoint_port(service)
        (watch / "clip.mp4").write_bytes(b"not really an mp4, uploaded after the idle timeout")

        def after_a_completion() -> str | None:
            text = get(port, "/metrics")[1].decode()
            return text if re.search(r"^cefmp4_streams_completed_total\{", text, re.M) else None

        return poll(after_a_completion, what="a completed recording on /metrics")


def test_metrics_page_passes_promtool_check_metrics(page: str) -> None:
    result = subprocess.run(
        [promtool(), "check", "metrics"], input=page, capture_output=True, text=True, timeout=60
    )
    problems = {line.strip() for line in (result.stdout + result.stderr).splitlines() if line}
    assert problems <= SEED_LINT_EXEMPTIONS, problems
    # promtool exits non-zero for lint findings; only the exempted one is allowed.
    assert result.returncode == (3 if problems else 0), (result.returncode, problems)


def exported(page: str) -> set[str]:
    """Every sample name the page's families can have."""
    return {
        family.name + suffix
        for family in text_string_to_metric_families(page)
        for suffix in _SUFFIXES[family.type]
    }


def referenced(expression: str) -> set[str]:
    return {name for name in _IDENT.findall(expression) if name.startswith(SERVICE_PREFIXES)}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    return exprs


def rule_expressions() -> list[str]:
    """The ``expr:`` of each rule: a one-line value or an indented ``|`` block."""
    text = RULES.read_text()
    found = re.findall(r"^(\s*)expr: \|\n((?:\1  .*\n)+)|^\s*expr: (.+)$", text, re.M)
    exprs = [block or line for _, block, line in found]
    assert len(exprs) == len(re.findall(r"^\s*- alert: ", text, re.M)), "a rule without expr?"
    return exprs


def test_dashboard_and_alert_rules_query_only_metrics_the_service_exports(page: str) -> None:
    names = exported(page)
    expressions = dashboard_expressions() + rule_expressions()
    assert len(expressions) > 10
    missing: dict[str, set[str]] = {}
    for expression in expressions:
        used = referenced(expression)
        # An expression over nothing the service exports would query nothing.
        assert used, f"no CefMP4 metric in: {expression}"
        if used - names:
            missing[expression] = used - names
    assert not missing, missing


def test_the_reference_check_would_catch_a_metric_the_service_lacks(page: str) -> None:
    # Guards the check above against reading names it cannot miss.
    assert "cefmp4_not_durable_bytes" in exported(page)
    assert "cefmp4_streams_failed_total" in exported(page)
    assert referenced('sum(rate(cefmp4_no_such_thing_total{job="x"}[5m]))') == {
        "cefmp4_no_such_thing_total"
    }
    assert "cefmp4_no_such_thing_total" not in exported(page)
