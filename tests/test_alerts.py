"""deploy/prometheus: the alert rules are valid and their unit tests pass.

``promtool check rules`` validates the rules (PromQL, templates);
``promtool test rules`` runs alerts_test.yml, synthetic series on which each
alert must fire and must stay silent. A missing promtool is a failure
(deploy/bootstrap.sh installs it), never a skip.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.scrape import promtool

PROMETHEUS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts_test.yml"


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, cwd=PROMETHEUS
    )


def test_alert_rules_pass_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    alerts = set(re.findall(r"^\s*- alert: (\S+)", RULES.read_text(), re.M))
    assert len(alerts) >= 6
    cases = re.findall(
        r"alertname: (\S+)\n\s*exp_alerts:(.*)\n(\s*- exp_labels:)?", RULE_TESTS.read_text()
    )
    fires = {name for name, inline, items in cases if items and not inline.strip()}
    silent = {name for name, inline, items in cases if inline.strip() == "[]"}
    assert fires | silent <= alerts  # no case names an alert that does not exist
    assert alerts - fires == set(), "alerts never shown to fire"
    assert alerts - silent == set(), "alerts never shown to stay silent"


def test_rule_unit_tests_fail_when_an_alert_misbehaves(tmp_path: Path) -> None:
    # Guards the unit tests: with the watcher alert inverted, they must fail.
    rules = RULES.read_text().replace(
        "(sum(cefmp4_watcher_lease_held) or vector(0)) < 1",
        "(sum(cefmp4_watcher_lease_held) or vector(0)) >= 1",
    )
    assert rules != RULES.read_text()
    (tmp_path / "alerts.yml").write_text(rules)
    (tmp_path / "alerts_test.yml").write_text(RULE_TESTS.read_text())
    result = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "CefMP4NoWatcher" in result.stdout + result.stderr
