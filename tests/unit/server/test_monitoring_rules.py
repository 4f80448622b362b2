"""The Prometheus rules and the Grafana dashboard in deploy/: promtool, and references to real metrics."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from helpers import require_binary
from lossd.server.monitoring import Monitoring
from lossd.server.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
PROMETHEUS = ROOT / "deploy/prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
GRAFANA = ROOT / "deploy/grafana"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_binary("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_promtool_check_rules() -> None:
    assert RULE_FILES, "no rule files in deploy/prometheus/rules"
    result = _promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests() -> None:
    tests = sorted((PROMETHEUS / "tests").glob("*.yml"))
    assert tests, "no promtool tests in deploy/prometheus/tests"
    result = _promtool("test", "rules", *map(str, tests))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# promtool check config of prometheus.yml needs the TLS files it names:
# tests/unit/test_deploy.py::test_prometheus_config_passes_promtool_and_scrapes_over_tls_with_a_token.


def _recorded() -> set[str]:
    names = set()
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {r["record"] for r in group["rules"] if "record" in r}
    return names


def _exported() -> set[str]:
    """Every sample name a lossd process can export (histograms with their suffixes)."""
    registry = CollectorRegistry()
    Monitoring(Settings(device="cpu"), registry=registry)
    names = set()
    for family in registry.collect():
        kind = family.type
        base = family.name
        if kind == "counter":
            names.add(base + "_total")
        elif kind == "histogram":
            names |= {base + s for s in ("_bucket", "_sum", "_count")}
        elif kind == "info":
            names.add(base + "_info")
        else:
            names.add(base)
    return names


_IDENT = re.compile(r"\b([a-z_][a-z0-9_]*(?::[a-z0-9_$]+)+|(?:lossd|grpc)_[a-z0-9_]+)\b")


_LABEL_LISTS = re.compile(r"\{[^}]*\}|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def _referenced(expr: str) -> set[str]:
    """Series names in a PromQL expression (label matchers and grouping lists removed)."""
    found = set()
    for name in _IDENT.findall(_LABEL_LISTS.sub("", expr)):
        for window in ("5m", "1h"):
            found.add(name.replace("$window", window))
    return found


def test_rules_read_only_exported_metrics() -> None:
    exported, recorded = _exported(), _recorded()
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                unknown = _referenced(rule["expr"]) - exported - recorded
                assert not unknown, f"{path.name}: {rule.get('record') or rule.get('alert')} reads unknown series {sorted(unknown)}"


def test_grafana_dashboard_reads_recorded_or_exported_series() -> None:
    dashboard = json.loads((GRAFANA / "dashboards/lossd.json").read_text())
    known = _exported() | _recorded()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    for expr in exprs:
        unknown = _referenced(expr) - known
        assert not unknown, f"dashboard query {expr!r} reads unknown series {sorted(unknown)}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"model", "dataset", "split", "window"} <= variables
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] if p["type"] != "row")
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/lossd.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
