"""The alert rules pass promtool's own unit tests, and the Grafana dashboard asks only for
series synwatch exports (read off a real registry, not a list kept by hand)."""

from __future__ import annotations

import json
import re
import subprocess

from prometheus_client import generate_latest

from synwatch.metrics import Metrics
from synwatch.probes.conntrack import Conntrack
from synwatch.probes.snapshot import ListenerState, Snapshot
from synwatch.probes.sockdiag import Listener
from tests.conftest import REPO

RULES = REPO / "packaging" / "prometheus"
DASHBOARD = REPO / "packaging" / "grafana" / "synwatch.json"
# what Prometheus itself adds, and functions and keywords of PromQL that look like names
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "and", "on", "le",
                "label_values", "instance"}


def exported() -> set[str]:
    """Every series name a running synwatch serves, with one listener probed."""
    metrics = Metrics()
    metrics.kernel.snapshot = Snapshot(
        "", (ListenerState(Listener(4, "0.0.0.0", 80, 128, 0, 0), 3, (("10.0.0.0/24", 3),), 1),),
        {"TcpExt.TCPReqQFullDoCookies": 5}, {}, Conntrack(10, 262144, 2))
    metrics.events.labels("kmsg", "true", "syn_flood").inc()
    metrics.source_lag.labels("kmsg").set(0.1)
    metrics.actions.labels("ban", "done").inc()
    metrics.bans({"nftables": 1}, ["nftables"])
    metrics.probe_duration.observe(0.01)
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def test_the_alert_rules_pass_their_promtool_tests() -> None:
    check = subprocess.run(["promtool", "check", "rules", "synwatch.rules.yml"], cwd=RULES,
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(["promtool", "test", "rules", "synwatch.rules.test.yml"], cwd=RULES,
                          capture_output=True, text=True, check=False)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def _names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|on|without|ignoring)\s*\([^)]*\)",
                            " ", without_strings)
    return {w for w in re.findall(r"\b[a-z_][a-z0-9_]*\b", without_labels)
            if w not in PROMQL_WORDS and not w.isdigit()}


def test_every_dashboard_and_rule_expression_names_an_exported_series() -> None:
    have = exported() | {"up"}
    assert {"synwatch_listener_syn_recv", "synwatch_syn_overflow_total",
            "synwatch_incidents_open", "synwatch_probe_duration_seconds_bucket",
            "synwatch_conntrack_entries", "synwatch_conntrack_dropped_total"} <= have
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["query"])
    rules = (RULES / "synwatch.rules.yml").read_text()
    exprs += [m.group(1) for m in re.finditer(r"expr: (?:>-\n)?((?:.+\n?)+?)(?=\s+for:)", rules)]
    assert len(exprs) >= 16
    for expr in exprs:
        names = _names(expr)
        assert names, expr
        assert names <= have, f"{expr}: {names - have} is not exported"
