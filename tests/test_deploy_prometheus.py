"""The alerting rules and the Grafana dashboard in deploy/: checked by the real promtool, and
every metric they query checked against what a real running relay's /metrics exports."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import RelayFactory, TLSFiles
from prometheus_client.parser import text_string_to_metric_families
from test_http import get
from tools import need
from watchrelay import SANDBOX_APPS, start_watched

from relay.sandbox import Sandbox

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "m365relay-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "m365relay-rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "m365relay.json"

# PromQL words that look like metric names: keywords, and Prometheus' own series.
_NOT_METRICS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                "group_left", "group_right", "inf", "nan", "up"}
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with Sandbox(tmp_path / "sandbox", apps=SANDBOX_APPS) as box:
        yield box


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need("promtool", "prometheus"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, label matchers, ranges, grouping
    clauses and function calls taken out first)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)
    names = set()
    for match in _IDENT.finditer(expr):
        rest = expr[match.end():].lstrip()
        if rest.startswith("(") or match.group().lower() in _NOT_METRICS:
            continue  # a function (rate, sum, histogram_quantile, time) or a keyword
        if match.start() and (expr[match.start() - 1].isdigit() or expr[match.start() - 1] == "."):
            continue  # the exponent of 1e6
        names.add(match.group())
    return names


def rule_exprs() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule["alert"], rule["expr"]


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"]
        match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
        assert match, query
        yield f"variable {variable['name']}", match.group(1)


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    checked = promtool("check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 12 rules found" in checked.stdout
    tested = promtool("test", "rules", RULE_TESTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_unit_test_and_says_what_to_do() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {case["alertname"] for test in tests for case in test["alert_rule_test"]
              if case["exp_alerts"]}
    quiet = {case["alertname"] for test in tests for case in test["alert_rule_test"]
             if not case["exp_alerts"]}
    alerts = {name for name, _ in rule_exprs()}
    assert alerts == firing, "every rule is tested firing"
    assert alerts - quiet <= {"M365RelayAppCertificateExpiring",
                              "M365RelayTLSCertificateExpiring"}, "and quiet before"
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            text = rule["annotations"]["description"]
            # What to do: a config key, a command or a Microsoft setting.
            assert re.search(r"\b[a-z_]+\.[a-z_]+|`m365relay |Entra|Set-|systemctl", text), \
                rule["alert"]
            assert rule["labels"]["severity"] in {"warning", "critical"}


def test_metric_names_are_found_in_promql() -> None:
    assert metric_names('sum by (le) (rate(a_bucket{x=~"$i"}[$__rate_interval]))') == \
        {"a_bucket"}
    assert metric_names("b - time() < 14 * 86400 and c > 1e6 or absent(up{job=\"j\"})") == \
        {"b", "c"}


async def test_dashboard_and_rules_query_only_metrics_a_real_relay_exports(
        relays: RelayFactory, sandbox: Sandbox, tls_files: TLSFiles) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "m365relay"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["targets"] for p in panels), "every panel queries something"
    # Importable anywhere: the data source is the one chosen at import, panels do not overlap.
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert {p["datasource"]["uid"] for p in panels} == {"${DS_PROMETHEUS}"}
    cells = set()
    for p in dashboard["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{p['title']} overlaps another panel"
        cells |= area
    watched = await start_watched(relays, sandbox, tls_files)
    status, _, body = await get(watched.relay, "/metrics")
    assert status == 200
    exported = {sample.name for family in text_string_to_metric_families(body)
                for sample in family.samples}
    wanted: dict[str, set[str]] = {}
    for where, expr in [*rule_exprs(), *dashboard_exprs(dashboard)]:
        names = metric_names(expr)
        # `up` is Prometheus' own series about the scrape, not the relay's.
        assert names or expr.startswith("up{"), f"{where}: {expr} selects no metric"
        for name in names:
            wanted.setdefault(name, set()).add(where)
    missing = {name: sorted(where) for name, where in wanted.items() if name not in exported}
    assert not missing, f"queried but not exported by a running relay: {missing}"
    # What the panels were asked for is really there.
    for name in ("m365relay_smtp_ack_seconds_bucket", "m365relay_upstream_mailbox_connections",
                 "m365relay_mailbox_pacing_rate", "m365relay_queue_messages_by_age",
                 "m365relay_token_expiry_seconds", "m365relay_throttled_total"):
        assert name in wanted
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(body) for s in f.samples}

    def value(metric: str, **labels: str) -> float:
        return samples[(metric, frozenset(labels.items()))]

    kinds = {dict(labels)["kind"] for name, labels in samples
             if name == "m365relay_certificate_expiry_timestamp_seconds"}
    assert kinds == {"app", "listener"}
    listener_cert = value("m365relay_certificate_expiry_timestamp_seconds",
                          kind="listener", name="lan")
    assert listener_cert > time.time() + 30 * 86400  # trustme issues for years
    # The values are the relay's state, not just names: 2 deferred under a minute old, the
    # busy mailbox throttled, 4 acknowledgements on the plain listener, one sign-in needed.
    assert value("m365relay_queue_messages") == value("m365relay_queue_deferred_messages") == 2
    assert value("m365relay_queue_messages_by_age", le="1m") == 2
    assert value("m365relay_queue_messages_by_age", le="older") == 0
    assert value("m365relay_throttled_total", app="contoso",
                 mailbox="printers@contoso.example") >= 1
    assert value("m365relay_smtp_ack_seconds_count", listener="local") == 4
    assert value("m365relay_smtp_ack_seconds_bucket", listener="local", le="+Inf") == 4
    assert value("m365relay_smtp_ack_seconds_count", listener="lan") == 0
    assert value("m365relay_signin_needed", account="personal") == 1
    assert value("m365relay_spool_free_bytes") > 0


def test_example_scrape_config_is_valid_for_promtool() -> None:
    example = DEPLOY / "prometheus" / "prometheus.example.yml"
    checked = promtool("check", "config", example)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    job, = yaml.safe_load(example.read_text())["scrape_configs"]
    assert job["job_name"] == "m365relay"  # what M365RelayDown selects
    assert job["scheme"] == "https" and "ca_file" in job["tls_config"]
    assert "password_file" in job["basic_auth"]
