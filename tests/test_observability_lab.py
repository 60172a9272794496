"""Seeing synwatch work: a real flood in the lab shows in /metrics (scraped over HTTP while it
lasts, and linted by promtool), in `synwatch status` (running, its source, the open incident;
exit 3 once stopped) and in the status line sd_notify would carry."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import REPO
from tests.support.cli import synwatch
from tests.support.harness import (
    NotifySocket,
    Service,
    host_config,
    log_of,
    start_service,
    stop_service,
)
from tests.support.lab import CLIENT_IP, SPOOF_NET, Lab, lab, lab_port
from tests.support.wait import eventually

pytestmark = pytest.mark.needs_root
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(text) for s in family.samples}
    return text, values


def value(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float | None:
    return values.get((name, tuple(sorted(labels.items()))))


class Scraper:
    """Scrapes /metrics every half second on a thread, as Prometheus would (faster)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.scrapes: list[dict[Any, float]] = [scrape(port)[1]]  # before the flood
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.5):
            try:
                self.scrapes.append(scrape(self.port)[1])
            except OSError:  # the service stopped (a failed test's cleanup): stop too
                return

    def stop(self, name: str, **labels: str) -> list[float]:
        self.done.set()
        self.thread.join(10)
        self.scrapes.append(scrape(self.port)[1])  # after what the caller waited for
        return [value(v, name, **labels) or 0 for v in self.scrapes]


def fires_on_the_flood(open_series: list[float], tmp_path: Path) -> None:
    """The shipped alert rules, run by promtool on what this flood's scrapes said (each scrape
    one 15 s step): SynFloodInProgress fires once the incident was open for 30 s of steps, and
    is quiet before the flood and after it."""
    ones = [i for i in range(2, len(open_series)) if open_series[i - 2:i + 1] == [1, 1, 1]]
    assert ones and open_series[0] == 0 and open_series[-1] == 0, open_series
    alert = {"exp_labels": {"instance": "lab", "verdict": "concentrated",
                            "severity": "critical"},
             "exp_annotations": {
                 "summary": "concentrated SYN flood on lab",
                 "description": "1 open concentrated incident(s); `synwatch incidents list "
                                "--verdict concentrated` has the evidence and the "
                                "recommendations."}}
    test = {"rule_files": [str(REPO / "packaging" / "prometheus" / "synwatch.rules.yml")],
            "evaluation_interval": "15s",
            "tests": [{"interval": "15s",
                       "input_series": [{
                           "series": 'synwatch_incidents_open{job="synwatch",instance="lab",'
                                     'verdict="concentrated"}',
                           "values": " ".join(f"{v:g}" for v in open_series)}],
                       "alert_rule_test": [
                           {"eval_time": "0s", "alertname": "SynFloodInProgress",
                            "exp_alerts": []},
                           {"eval_time": f"{ones[0] * 15}s", "alertname": "SynFloodInProgress",
                            "exp_alerts": [alert]},
                           {"eval_time": f"{(len(open_series) - 1) * 15}s",
                            "alertname": "SynFloodInProgress", "exp_alerts": []}]}]}
    path = tmp_path / "flood.rules.test.yml"
    path.write_text(json.dumps(test))  # JSON is YAML
    run = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True,
                         text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def status_of(service: Service) -> dict[str, Any]:
    view: dict[str, Any] = json.loads(synwatch("status", "--format", "json", "--config",
                                               str(service.config)).out)
    return view


@pytest.fixture
def the_lab() -> Iterator[Lab]:
    with lab() as made:
        yield made


def test_a_flood_shows_in_metrics_status_and_the_status_line(the_lab: Lab,
                                                             tmp_path: Path) -> None:
    metrics_port = free_port()
    service = Service(the_lab, tmp_path, quiet="4s",
                      extra=f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    try:
        port = lab_port()
        the_lab.listen(port, backlog=64)
        listener = {"netns": the_lab.server_ns, "address": "0.0.0.0", "port": str(port)}

        def probed() -> dict[Any, float] | None:  # the next probe sees the new listener
            _, now = scrape(metrics_port)
            return now if value(now, "synwatch_listener_backlog", **listener) == 64 else None

        before = eventually(probed, "the listener in /metrics", timeout=10)
        assert value(before, "synwatch_incidents_open", verdict="concentrated") == 0
        sources = [f"{SPOOF_NET}.{n}.{random.randint(1, 254)}" for n in (7, 8)
                   for _ in range(1500)]
        random.shuffle(sources)
        overflow_before = value(before, "synwatch_syn_overflow_total",
                                netns=the_lab.server_ns) or 0
        scraper = Scraper(metrics_port)  # every scrape, for the alert rules below
        the_lab.flood(port, len(sources), sources)
        [inc] = service.wait_incidents(port, 1, "open", timeout=20)

        def during() -> dict[Any, float] | None:
            # the flood's sender is done before the server's softirq has taken every SYN
            # (the veth has a queue): the counter is waited for, probe by probe
            _, now = scrape(metrics_port)
            overflowed = (value(now, "synwatch_syn_overflow_total", netns=the_lab.server_ns)
                          or 0) > overflow_before + 1000
            return now if overflowed and value(now, "synwatch_incidents_open",
                                               verdict="concentrated") == 1 else None

        values = eventually(during, "the concentrated incident and the overflows in /metrics", 30)
        assert (value(values, "synwatch_listener_syn_recv", **listener) or 0) >= 60
        assert (value(values, "synwatch_events_total", source="kmsg", trusted="true",
                      kind="syn_flood") or 0) >= 1
        assert (value(values, "synwatch_probe_duration_seconds_count") or 0) >= 2
        assert value(values, "synwatch_bans_active", backend="nftables") == 0  # a dry run
        assert (value(values, "synwatch_actions_total", action="ban", status="dry-run")
                or 0) >= 2
        assert (value(values, "process_resident_memory_bytes") or 0) > 0
        # cardinality: listeners only, never a source prefix
        assert all(key != "prefix" for (_, labels) in values for key, _ in labels)

        status = synwatch("status", "--format", "json", "--config", str(service.config))
        view = json.loads(status.out)
        assert status.code == 0 and view["running"] and view["pid"] == service.proc.pid
        assert inc["id"] in view["open_incidents"]
        [kmsg] = view["sources"]
        assert (kmsg["name"], kmsg["state"]) == ("kmsg", "running")
        assert kmsg["position"]["seq"] > 0  # where it has read to in the ring buffer

        def summary() -> str | None:
            said = status_of(service)["summary"]
            return said if "concentrated" in said else None

        assert (f"1 open incident (#{inc['id']} concentrated on 0.0.0.0:{port})"
                in eventually(summary, "the verdict in the status line", 30))

        service.wait_incidents(port, 1, "closed")

        def closed() -> dict[Any, float] | None:
            _, now = scrape(metrics_port)
            return now if value(now, "synwatch_incidents_total",
                                verdict="concentrated") == 1 else None

        after = eventually(closed, "the close in /metrics", 30)
        assert value(after, "synwatch_incidents_open", verdict="concentrated") == 0
        open_series = scraper.stop("synwatch_incidents_open", verdict="concentrated")
        fires_on_the_flood(open_series, tmp_path)
        text, _ = scrape(metrics_port)
        lint = subprocess.run(["promtool", "check", "metrics"], input=text,
                              capture_output=True, text=True, check=False)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    finally:
        service.stop()
    stopped = synwatch("status", "--format", "json", "--config", str(service.config))
    assert stopped.code == 3 and json.loads(stopped.out)["running"] is False
    assert json.loads(stopped.out)["open_incidents"] == []


RISING = "▂▃▄▅▆▇█"  # a sparkline's blocks above its lowest


class Tmux:
    """A real terminal: a tmux server of the test's own (its own socket), killed at the end."""

    def __init__(self, name: str) -> None:
        self.socket = f"synwatch-test-{name}-{os.getpid()}"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, check=False, timeout=20)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top").stdout

    def alive(self) -> bool:
        return self.run("has-session", "-t", "top").returncode == 0

    def kill(self) -> None:
        self.run("kill-server")


def test_top_shows_the_flooded_listener_its_prefixes_and_the_incident(the_lab: Lab,
                                                                     tmp_path: Path) -> None:
    service = Service(the_lab, tmp_path, quiet="20s")
    term = Tmux("top")
    try:
        port = lab_port()
        the_lab.listen(port, backlog=64)
        started = term.run("new-session", "-d", "-s", "top", "-x", "200", "-y", "50",
                           # the pane's size, not one the test's environment may carry
                           f"env -u COLUMNS -u LINES {sys.executable} -m synwatch top "
                           "--interval 0.5 "
                           f"--config {service.config}")
        assert started.returncode == 0, started.stderr
        term.run("resize-window", "-t", "top", "-x", "200", "-y", "50")  # as wide as asked
        def row_of(screen: str) -> str:
            return next((line for line in screen.splitlines() if f"0.0.0.0:{port}" in line), "")

        quiet = eventually(lambda: f"0.0.0.0:{port}" in (s := term.screen()) and "▁" in
                           row_of(s) and s, "the listener and its sparklines on the screen", 30)
        assert not set(row_of(quiet)) & set(RISING), row_of(quiet)  # flat: nothing happened
        sources = [f"{SPOOF_NET}.{n}.{random.randint(1, 254)}" for n in (7, 8)
                   for _ in range(1500)]
        the_lab.flood(port, len(sources), sources)
        [inc] = service.wait_incidents(port, 1, "open", timeout=20)

        def flooded() -> str | None:
            screen = term.screen()
            return screen if (f"{SPOOF_NET}.7.0/24" in screen and "concentrated" in screen
                              and "█" in row_of(screen)) else None

        screen = eventually(flooded, "the flood on the screen", timeout=20, seen=term.screen)
        row = row_of(screen)
        assert f"{SPOOF_NET}.7.0/24" in row, screen  # the listener's own prefixes
        assert re.search(r"6[45]/64", row), screen  # its SYN-RECV against its backlog
        assert "SYN-RECV" in row and "█" in row.split("│")[5], screen  # its sparkline rose
        # the incident's picture in the terminal: its series, in colour
        term.run("new-window", "-t", "top", "-n", "plot",
                 f"env -u COLUMNS -u LINES {sys.executable} -m synwatch incidents show "
                 f"{inc['id']} --plot --config {service.config}; sleep 60")
        def plot() -> str | None:
            shown = term.run("capture-pane", "-e", "-p", "-t", "top:plot").stdout
            return shown if "SYN-RECV" in shown and "cookies validated" in shown else None

        plotted = eventually(plot, "the plot", 20)
        assert "found the queue full" in plotted and "\x1b[" in plotted, plotted
        assert any(c in plotted for c in "▀▄█▌▐▖▗▘▝▞▚▙▛▜▟"), plotted
        term.run("kill-window", "-t", "top:plot")
        piped = synwatch("incidents", "show", str(inc["id"]), "--plot", "--config",
                         str(service.config))
        assert piped.code == 0 and "found the queue full" in piped.out
        assert "\x1b[" not in piped.out, "plain in a pipe"
        # an application that stopped accepting: its accept queue full (5 of backlog 4) for
        # as long as its clients hold on; and an idle listener with a long backlog
        stuck, idle = lab_port(), lab_port()
        the_lab.listen(stuck, backlog=4)
        the_lab.listen(idle, backlog=511)
        the_lab.held_clients(stuck, [CLIENT_IP], 5)
        for width in (80, 120):  # whole numbers, and the full queue in the alarm colour
            term.run("resize-window", "-t", "top", "-x", str(width), "-y", "50")

            def drawn(width: int = width) -> list[str] | None:
                lines = term.run("capture-pane", "-e", "-p", "-t", "top").stdout.splitlines()
                at = [n for n, line in enumerate(lines) if f"0.0.0.0:{stuck}" in line]
                ok = (at and any(f"0.0.0.0:{idle}" in line and "0/511" in line for line in lines)
                      and "5/4" in lines[at[0]]
                      and max(len(re.sub(r"\x1b\[[0-9;]*m", "", x)) for x in lines) <= width)
                return lines[at[0]:at[0] + 2] if ok else None

            row, bar = eventually(drawn, f"the queues drawn at {width} columns", 30,
                                  seen=term.screen)
            accept_bar = bar.split("│")[2]  # listener │ accept queue │ ...
            assert "\x1b[31m" in accept_bar and "\x1b[32m" not in accept_bar, repr(bar)
        term.run("send-keys", "-t", "top", "q")
        eventually(lambda: not term.alive(), "top to quit on q", timeout=10)
    finally:
        term.kill()
        service.stop()


def test_slow_clients_on_the_metrics_port_cost_no_thread_and_are_closed(
        tmp_path: Path) -> None:
    """80 connections that never finish their request (each sends a byte now and then, as
    slowloris does) used to cost a thread each, for ever: under the unit's TasksMax the
    service stopped ("can't start new thread"). Now one thread serves them all, a scraper is
    still answered meanwhile, every slow connection is closed within the request timeout, and
    SIGTERM ends the service at once."""
    from synwatch.daemon.metricsserver import REQUEST_TIMEOUT

    metrics_port = free_port()
    config = host_config(tmp_path, "[sources]\njournald = false\nkmsg = false\n"
                                   f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = start_service(config, notify)
    slow: list[socket.socket] = []
    try:
        notify.wait_for("READY=1")
        eventually(lambda: "synwatch_incidents_open" in scrape(metrics_port)[0], "/metrics", 30,
                 seen=log_of(config).read_text)

        def tasks() -> int:
            return sum(1 for _ in Path(f"/proc/{proc.pid}/task").iterdir())

        before = tasks()
        opened = time.monotonic()
        for _ in range(80):
            s = socket.create_connection(("127.0.0.1", metrics_port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        # a scraper behind the 80 in the accept queue: once it is answered, the server has
        # taken all 80 (a thread each, before)
        text, _ = scrape(metrics_port)
        assert "synwatch_incidents_open" in text
        assert tasks() <= before + 2, (before, tasks())  # no thread per connection
        # the slow ones are closed by the server, however they dribble
        open_ = list(slow)
        while open_:
            assert time.monotonic() - opened < REQUEST_TIMEOUT + 2, \
                f"{len(open_)} slow connections still open"
            for s in list(open_):
                try:
                    s.setblocking(False)
                    closed = s.recv(4096) == b""
                    if not closed:
                        s.send(b"X")
                except BlockingIOError:
                    s.send(b"X")  # one byte more of a header line that never ends
                    closed = False
                except OSError:  # reset
                    closed = True
                if closed:
                    open_.remove(s)
            assert tasks() <= before + 2, (before, tasks())
            time.sleep(0.2)
        assert proc.poll() is None
        assert "synwatch_incidents_open" in scrape(metrics_port)[0]
    finally:
        for s in slow:
            s.close()
        began = time.monotonic()
        code, err = stop_service(proc)
        took = time.monotonic() - began
        notify.sock.close()
    assert code == 0, err
    assert took < 2.0, f"SIGTERM took {took:.1f} s"
    assert "Traceback" not in err and "can't start new thread" not in err, err
    assert err.count("metrics: more than 16 connections at once") == 1, err
