"""The alert rules pass promtool's own unit tests, and the Grafana dashboard asks only for
series synwatch exports (read off a real registry, not a list kept by hand)."""

from __future__ import annotations

import gzip
import json
import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client import generate_latest

from synwatch.daemon.metrics import Metrics
from synwatch.probes.conntrack import Conntrack
from synwatch.probes.snapshot import ListenerState, Snapshot
from synwatch.probes.sockdiag import Listener
from tests.support import REPO

RULES = REPO / "packaging" / "prometheus"
DASHBOARD = REPO / "packaging" / "grafana" / "synwatch.json"
# what Prometheus itself adds, and functions and keywords of PromQL that look like names
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "and", "on", "le",
                "label_values", "instance"}


def exported() -> set[str]:
    """Every series name a running synwatch serves, with one listener probed."""
    metrics = Metrics()
    metrics.kernel.snapshots[""] = Snapshot(
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


def test_every_watched_namespace_is_in_the_metrics_under_its_name() -> None:
    """Watching many namespaces, each one's listeners and counters are there at once, labelled
    with the namespace's name (a container's, not an inode); one that went leaves."""
    metrics = Metrics()
    for netns, port, overflow in (("", 80, 5), ("docker:shop", 8080, 7), ("lab1", 80, 0)):
        metrics.kernel.snapshots[netns] = Snapshot(
            netns, (ListenerState(Listener(4, "0.0.0.0", port, 128, 0, 0), 3, (), 1),),
            {"TcpExt.TCPReqQFullDoCookies": overflow}, {}, None)
    text = generate_latest(metrics.registry).decode()
    assert 'synwatch_listener_syn_recv{address="0.0.0.0",netns="docker:shop",port="8080"} 3.0' \
        in text
    assert 'synwatch_syn_overflow_total{netns="docker:shop"} 7.0' in text
    assert 'synwatch_syn_overflow_total{netns=""} 5.0' in text
    assert text.count("# TYPE synwatch_syn_overflow_total counter") == 1
    assert "synwatch_conntrack_entries" not in text
    del metrics.kernel.snapshots["docker:shop"]
    assert "docker:shop" not in generate_latest(metrics.registry).decode()


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


def test_the_metrics_server_speaks_enough_http_for_prometheus_and_browsers() -> None:
    """What prometheus_client's own server did, on synwatch's bounded one: content
    negotiation (OpenMetrics for Prometheus), gzip, HEAD, and clear refusals."""
    metrics = Metrics()
    assert metrics.serve("127.0.0.1", 0)
    assert metrics._server is not None
    port = metrics._server.port

    def get(target: str, method: str = "GET", **headers: str) -> tuple[int, dict[str, str],
                                                                        bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{target}", method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    try:
        status, headers, body = get("/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert b"synwatch_incidents_open" in body and headers["Connection"] == "close"
        status, headers, body = get("/metrics", Accept="application/openmetrics-text; "
                                    "version=1.0.0", **{"Accept-Encoding": "gzip"})
        assert headers["Content-Encoding"] == "gzip"
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert gzip.decompress(body).endswith(b"# EOF\n")
        status, headers, body = get("/metrics", method="HEAD")
        assert status == 200 and int(headers["Content-Length"]) > 0 and body == b""
        assert get("/nothing")[0] == 404
        assert get("/metrics", method="POST")[0] == 405
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000)  # past MAX_REQUEST
            assert s.recv(100).startswith(b"HTTP/1.1 431 ")
    finally:
        metrics.stop()


def test_lag_is_measured_on_lines_printed_since_the_start_not_on_the_backlog(
        tmp_path: Path) -> None:
    """A start catches up on old lines (kmsg's ring, the journal since its cursor): their age
    is not lag, and the gauge the shipped alert watches (> 60 s for 5 min) must not sit at it
    until the next kernel line, which may be hours away. Lines printed since then are lag."""
    from datetime import UTC, datetime, timedelta

    from synwatch.config import parse_config
    from synwatch.daemon.telemetry import Telemetry
    from synwatch.records import LogRecord
    from synwatch.sources.base import Batch

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    config = parse_config(f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n'
                          f'[metrics]\nlisten = "127.0.0.1:{port}"\n', str(tmp_path / "c.toml"))
    telemetry = Telemetry(config)
    source = type("S", (), {"name": "kmsg", "position": {}})()
    telemetry.start([source])  # type: ignore[list-item]
    telemetry.stop_serving()

    def batch(age: float) -> Batch:
        at = datetime.now(UTC) - timedelta(seconds=age)
        return Batch("kmsg", (LogRecord(line="x", sink="kmsg", message="x", time=at, host=None,
                                        trusted=True, source="kmsg"),), {})

    telemetry.batch(batch(age=3600), [], datetime.now(UTC))  # the backlog of an hour
    assert telemetry.status.sources["kmsg"].lag_seconds is None
    assert telemetry.metrics is not None
    assert 'synwatch_source_lag_seconds{source="kmsg"}' not in \
        generate_latest(telemetry.metrics.registry).decode()
    telemetry.batch(batch(age=0.5), [], datetime.now(UTC))  # a line as it comes
    lag = telemetry.status.sources["kmsg"].lag_seconds
    assert lag is not None and 0.4 < lag < 5
