"""The shipped Prometheus files, checked by Prometheus' own promtool (Debian's `prometheus`
package; `make test` installs it):

- ``promtool check rules`` on compose/prometheus/alerts.yml and ``promtool check config`` on
  compose/prometheus/prometheus.yml;
- ``promtool test rules`` on compose/prometheus/alerts.test.yml, which must give every alert a
  case where it fires, is seen pending one evaluation before its ``for:`` has passed, and a
  case where it must not fire;
- the Kubernetes PrometheusRule is generated from alerts.yml (one source).

A real Prometheus scraping the real stack is tests/integration/test_observability.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "compose" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts.test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: apt-get install prometheus (`make test` installs it)")
    return found


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=cwd)


def seconds(duration: str) -> int:
    """A Prometheus duration (``1h30m``, ``2m``, ``30s``) in seconds."""
    parts = re.findall(r"(\d+)([hms])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def test_rules_pass_promtool_check(promtool: str) -> None:
    proc = run(promtool, "check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 5 rules found" in proc.stdout


def test_config_passes_promtool_check(promtool: str, tmp_path: Path) -> None:
    shipped = PROMETHEUS_DIR / "prometheus.yml"
    # As shipped (its rule file is a path inside the container) ...
    proc = run(promtool, "check", "config", "--syntax-only", str(shipped))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ... and in full, rules included, with the rule file where the container mounts it.
    config = yaml.safe_load(shipped.read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(ALERTS)]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config))
    proc = run(promtool, "check", "config", str(copy))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 5 rules found" in proc.stdout


def test_alert_unit_tests_pass(promtool: str) -> None:
    proc = run(promtool, "test", "rules", ALERT_TESTS.name, cwd=PROMETHEUS_DIR)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def _alerts() -> dict[str, int]:
    doc = yaml.safe_load(ALERTS.read_text())
    return {
        r["alert"]: seconds(r.get("for", "0s")) for g in doc["groups"] for r in g["rules"] if "alert" in r
    }


def _cases() -> tuple[int, list[tuple[str, list[tuple[str, int, bool]]]]]:
    """The evaluation interval and, per test group, ``(alert, eval_time_s, fires)`` checks."""
    doc: dict[str, Any] = yaml.safe_load(ALERT_TESTS.read_text())
    assert doc["rule_files"] == ["alerts.yml"]
    interval = seconds(doc.get("evaluation_interval", "1m"))
    groups = []
    for test in doc["tests"]:
        checks = [
            (c["alertname"], seconds(c["eval_time"]), bool(c.get("exp_alerts")))
            for c in test["alert_rule_test"]
        ]
        groups.append((test.get("name", "?"), checks))
    return interval, groups


def test_every_alert_has_a_firing_a_pending_and_a_quiet_case() -> None:
    interval, groups = _cases()
    for alert, for_s in _alerts().items():
        firing = pending_then_firing = quiet = False
        for _, checks in groups:
            mine = [(t, fires) for a, t, fires in checks if a == alert]
            fired_at = [t for t, fires in mine if fires]
            if fired_at:
                firing = True
                first = min(fired_at)
                assert first >= for_s, f"{alert} expected firing at {first}s, before its for: {for_s}s"
                # not yet firing one evaluation earlier: the for: duration is what holds it back
                if any(not fires and for_s - interval <= t < first <= t + interval for t, fires in mine):
                    pending_then_firing = True
            elif any(t > for_s for t, _ in mine):
                quiet = True  # evaluated past its for: and expected silent
        assert firing, f"{alert}: no test where it fires"
        assert pending_then_firing, f"{alert}: no test that it is still pending one evaluation before firing"
        assert quiet, f"{alert}: no test with series that must not make it fire"


def test_prometheusrule_is_generated_from_the_compose_rules() -> None:
    """One source: k8s/overlays/monitoring/prometheusrule.yaml is scripts/prometheusrule.py's
    output for compose/prometheus/alerts.yml (test_deploy checks the rendered objects agree)."""
    proc = run(sys.executable, str(ROOT / "scripts" / "prometheusrule.py"), "--check")
    assert proc.returncode == 0, proc.stderr
