"""The four lab scenarios of the correlator, on the real kernel, through `synwatch run`.

Each test makes its own namespaces, runs the service on them (kmsg as the trusted log source,
probes inside the server namespace), floods, and reads the verdict back through the CLI.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import synwatch
from tests.support.harness import Service
from tests.support.lab import CLIENT_IP, SPOOF_NET, Lab, client_outcomes, lab, lab_port
from tests.support.wait import eventually

pytestmark = pytest.mark.needs_root


@pytest.fixture
def the_lab() -> Iterator[Lab]:
    with lab() as made:
        # request sockets live ~3 s instead of ~63 s, so a flood's traces clear quickly
        made.sysctl("net.ipv4.tcp_synack_retries", 1)
        yield made


@pytest.fixture
def service(the_lab: Lab, tmp_path: Path) -> Iterator[Service]:
    svc = Service(the_lab, tmp_path)
    yield svc
    svc.stop()


def _sources(*nets: str, each: int) -> list[str]:
    return [f"{net}.{random.randint(1, 254)}" for net in nets for _ in range(each)]


def test_two_slash24s_are_concentrated(the_lab: Lab, service: Service) -> None:
    port = lab_port()
    the_lab.listen(port, backlog=64)
    sources = _sources(f"{SPOOF_NET}.1", f"{SPOOF_NET}.2", each=1500)
    random.shuffle(sources)
    the_lab.flood(port, len(sources), sources)
    [inc] = service.wait_incidents(port, 1, "closed")
    assert inc["verdict"] == "concentrated", inc
    assert inc["trigger"] == "log"
    assert (inc["address"], inc["family"], inc["netns"]) == ("0.0.0.0", 4, the_lab.server_ns)
    assert {p["prefix"] for p in inc["top_prefixes"][:2]} == {f"{SPOOF_NET}.1.0/24",
                                                              f"{SPOOF_NET}.2.0/24"}
    assert sum(p["share"] for p in inc["top_prefixes"]) == pytest.approx(1.0, abs=0.01)
    assert 64 <= inc["peak_syn_recv"] <= 65
    assert any(f"{SPOOF_NET}.1.0/24" in r and "block" in r for r in inc["recommendations"])
    assert inc["opened_at"] <= inc["detected_at"] and inc["closed_at"] > inc["opened_at"]
    [event] = service.events(port)
    assert event["trusted"] and event["incident_id"] == inc["id"]
    shown = synwatch("incidents", "show", str(inc["id"]), "--config", str(service.config))
    assert shown.code == 0 and "SYN-RECV" in shown.out and "SYNs found the SYN queue" in shown.out
    service.check_replay(port, "concentrated")


def test_spread_over_a_slash16_is_spoofed(the_lab: Lab, service: Service) -> None:
    port = lab_port()
    the_lab.listen(port, backlog=128)
    the_lab.flood(port, 4000)  # random sources all over 10.232.0.0/16
    [inc] = service.wait_incidents(port, 1, "closed")
    assert inc["verdict"] == "spoofed", inc
    assert inc["top_prefixes"][0]["share"] < 0.1
    assert any("forged" in r for r in inc["recommendations"])
    assert any("upstream" in r for r in inc["recommendations"])
    service.check_replay(port, "spoofed")


def test_real_clients_on_a_small_backlog_are_capacity_without_a_log_line(
        the_lab: Lab, service: Service) -> None:
    port = lab_port()
    the_lab.listen(port, backlog=4)  # and never accepts
    the_lab.connect_burst(port, established=5, attempts=300, hold=1.5)
    [inc] = service.wait_incidents(port, 1, "closed")
    assert inc["verdict"] == "capacity", inc
    assert inc["trigger"] == "counters"
    assert service.events(port) == [], "the kernel logs nothing for an accept-queue overflow"
    recs = " ".join(inc["recommendations"])
    assert "accept queue peaked at 5 of 4" in recs
    m = re.search(r"raise the listen backlog of 0\.0\.0\.0:\d+ from 4 to (\d+)", recs)
    assert m, recs
    want = int(m.group(1))
    assert want >= 128 and want & (want - 1) == 0  # a power of two, never below 128
    assert f"ListenBacklog {want}`" in recs and f"backlog={want};" in recs
    assert "somaxconn" not in recs  # 4096 in the namespace: it does not clamp
    service.check_replay(port, "capacity")


def test_second_flood_on_a_socket_is_seen_from_the_counters(
        the_lab: Lab, service: Service) -> None:
    port = lab_port()
    the_lab.listen(port, backlog=16)
    the_lab.flood(port, 2000, _sources(f"{SPOOF_NET}.7", each=2000))
    [first] = service.wait_incidents(port, 1, "closed")
    assert first["trigger"] == "log"
    the_lab.flood(port, 2000, _sources(f"{SPOOF_NET}.8", each=2000))
    first_again, second = service.wait_incidents(port, 2, "closed")
    assert first_again == first
    assert second["trigger"] == "counters", second
    assert second["verdict"] == "concentrated"
    assert second["top_prefixes"][0]["prefix"] == f"{SPOOF_NET}.8.0/24"
    assert second["first_evidence_at"] <= second["detected_at"]
    assert len(service.events(port)) == 1, "the kernel logs once per socket"
    service.check_replay(port, "second-flood")


def test_cookies_for_every_syn_are_attributed_by_the_accounting_set(
        the_lab: Lab, tmp_path: Path) -> None:
    """tcp_syncookies=2: no log line, no request sockets; only counters and the nftables set
    see the flood, and the set tells whose SYNs they are."""
    the_lab.sysctl("net.ipv4.tcp_syncookies", 2)
    port = lab_port()
    the_lab.listen(port, backlog=64)
    service = Service(the_lab, tmp_path, dry_run=False)  # accounting = "auto": on
    try:
        service.wait_log("SYN accounting (nftables table inet synwatch")
        sources = _sources(f"{SPOOF_NET}.3", each=1500) + _sources(f"{SPOOF_NET}.4", each=500)
        random.shuffle(sources)
        the_lab.flood(port, len(sources), sources)
        [inc] = service.wait_incidents(port, 1, "closed")
    finally:
        service.stop()
    assert (inc["trigger"], inc["verdict"], inc["peak_syn_recv"]) == ("counters",
                                                                       "concentrated", 0)
    assert [(p["prefix"], p["count"]) for p in inc["top_prefixes"]] == [
        (f"{SPOOF_NET}.3.0/24", 1500), (f"{SPOOF_NET}.4.0/24", 500)]
    assert service.events(port) == []
    ruleset = subprocess.run(["ip", "netns", "exec", the_lab.server_ns, "nft", "list",
                              "ruleset"], capture_output=True, text=True, check=True).stdout
    assert "chain account" not in ruleset, "the accounting chain is removed at stop"


def test_with_cookies_for_every_syn_a_real_load_opens_nothing_and_a_flood_does(
        the_lab: Lab, service: Service) -> None:
    """tcp_syncookies=2 counts every SYN, real ones too, as if it found a full queue, and prints
    nothing: a busy healthy server must open nothing, and a flood (cookies sent that never come
    back) must still open an incident, here in a dry run (no accounting set).

    Two seconds of load (four probe intervals of 200 SYNs/s counted as overflowing, ten times
    the open_rate of 20/s) give a wrong incident its chance at every probe; four seconds gave
    it the same chance eight times."""
    the_lab.sysctl("net.ipv4.tcp_syncookies", 2)
    port = lab_port()
    the_lab.serve(port, backlog=128)
    load = the_lab.real_clients(port, [CLIENT_IP], seconds=2, per_second=200)
    results = client_outcomes(load)
    assert sum(ok for _, ok in results) >= 300, "a real load, served"  # 3/4 of 400
    service.wait_probes(3)
    assert service.incidents(port) == [], "real clients validate their cookies"
    sources = _sources(f"{SPOOF_NET}.21", each=4000)
    the_lab.start_flood(port, len(sources), sources, rate=2000).wait(timeout=60)
    [inc] = service.wait_incidents(port, 1, "closed")
    assert inc["trigger"] == "counters" and inc["verdict"] == "concentrated", inc
    assert service.events(port) == [], "the kernel printed nothing"


def test_a_flood_in_another_namespace_opens_nothing_here(the_lab: Lab, service: Service) -> None:
    """The kernel's log is shared by all namespaces and its lines do not say whose: a line for a
    port nothing listens on in the watched namespace is recorded and opens no incident."""
    port = lab_port()
    with lab() as other:
        other.listen(port, backlog=8)
        other.flood(port, 300)
        [event] = eventually(lambda: service.events(port), "the kernel line recorded", 15)
        assert event["trusted"], "a real kernel line"
        service.wait_log(f"nothing listens on port {port} in {the_lab.server_ns}")
    service.wait_probes(3)
    assert service.incidents(port) == []
    assert service.events(port)[0]["incident_id"] is None


def test_a_watched_namespace_that_does_not_exist_opens_nothing(tmp_path: Path) -> None:
    """Probes fail for a namespace that is not there; held kernel lines are then dropped, not
    trusted: a missing namespace must never widen synwatch to every namespace's floods."""
    missing = f"swt-missing-{os.getpid()}"
    config = tmp_path / "synwatch.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n'
                      '[sources]\njournald = false\nkmsg = true\n'
                      f'[watch]\nnetns = "{missing}"\n'
                      '[incident]\nquiet_period = "3s"\nprobe_interval = "0.5s"\n')
    r = synwatch("check-config", "--config", str(config))
    assert r.code == 2 and f'there is no network namespace "{missing}"' in r.err
    log = tmp_path / "service.log"
    proc = subprocess.Popen([sys.executable, "-m", "synwatch", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True)
    try:
        port = lab_port()
        with lab() as other:
            other.listen(port, backlog=8)
            eventually(lambda: "synwatch running" in log.read_text(), "the start", 20,
                       alive=proc, seen=log.read_text)
            other.flood(port, 300)
            eventually(lambda: f"netns {missing} does not exist" in log.read_text(),
                       "the missing namespace said", 20, alive=proc, seen=log.read_text)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    listed = synwatch("incidents", "list", "--format", "json", "--config", str(config))
    assert json.loads(listed.out) == []
    events = json.loads(synwatch("events", "list", "--format", "json", "--config",
                                 str(config)).out)
    assert any(e["port"] == port and e["trusted"] for e in events), "recorded, as an event"


def test_a_line_from_another_namespace_for_a_port_listened_on_here_starts_nothing(
        the_lab: Lab, tmp_path: Path) -> None:
    """Anyone can make the kernel print a genuine line for any port (`unshare -rn`, a veth, raw
    SYNs): a line whose port an idle listener here also has opens no incident and runs no
    action, as the watched namespace saw no overflow; the same flood against that listener
    opens one, and its exec hook is told the namespace."""
    the_lab.sysctl("net.ipv4.tcp_syncookies", 0)  # an incident here would raise it to 1
    hook = tmp_path / "hook"

    def syncookies() -> int:
        return int(the_lab.in_server("sysctl", "-n", "net.ipv4.tcp_syncookies").stdout)

    service = Service(the_lab, tmp_path / "svc", quiet="30s", dry_run=False, extra=(
        '[actions.exec]\nenabled = true\nargv = ["/bin/sh", "-c", '
        f'"env | grep ^SYNWATCH_ > {hook}-$SYNWATCH_CHANGE"]\n'))
    try:
        port = lab_port()
        the_lab.listen(port, backlog=8)  # idle
        with lab() as other:
            other.listen(port, backlog=8)
            other.flood(port, 300)
            [event] = eventually(lambda: service.events(port), "the kernel line recorded", 15)
            assert event["trusted"], "a real kernel line"
        service.wait_probes(3)
        assert service.incidents(port) == []
        assert service.events(port)[0]["incident_id"] is None
        assert not list(tmp_path.glob("hook-*")), "no exec hook ran"
        assert syncookies() == 0
        service.wait_log(f"port {port}: no overflow in {the_lab.server_ns}: another "
                         "namespace's line")

        the_lab.flood(port, 300)  # the same flood, against the listener watched here
        [inc] = service.wait_incidents(port, 1, "open")
        # the line or the probe after it, whichever the service reads first (a loaded machine
        # can read the counters' jump before the line): either way the line joins this incident
        assert inc["trigger"] in ("log", "counters") and inc["netns"] == the_lab.server_ns
        opened = tmp_path / "hook-opened"
        eventually(lambda: "SYNWATCH_VERDICT" in (opened.read_text() if opened.exists() else "")
                   and syncookies() == 1, "the hook and the cookies", 15,
                   seen=service.log.read_text)
        assert f"SYNWATCH_NETNS={the_lab.server_ns}\n" in opened.read_text()
        eventually(lambda: [e["incident_id"] for e in service.events(port)] == [None, inc["id"]],
                   "the second line in the incident, the first in none", 15,
                   seen=lambda: f"{service.events(port)}\n{service.log.read_text()}")
    finally:
        service.stop()
