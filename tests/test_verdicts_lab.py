"""Verdicts on a default server (issue: "verdicts that hold"): the packet sampler, statistical
verdicts, the half-open build-up and attribution past an earlier flood's residue, each on the
real kernel with spoofed sources routed through the client namespace as on the internet."""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import synwatch
from tests.support.harness import Service
from tests.support.lab import SERVER_IP, SPOOF_NET, SPOOF_NET6, Lab, lab, lab_port
from tests.support.pictures import check_picture
from tests.support.wait import eventually

pytestmark = pytest.mark.needs_root


@pytest.fixture
def the_lab() -> Iterator[Lab]:
    with lab() as made:  # tcp_synack_retries stays the default 5: requests live ~63 s
        yield made


def _evidence(inc: dict[str, Any], service: Service) -> str:
    shown = synwatch("incidents", "show", str(inc["id"]), "--config", str(service.config))
    assert shown.code == 0, shown.err
    return shown.out


def _wait_verdict(service: Service, port: int, verdict: str, timeout: float = 40,
                  status: str | None = None, latest: bool = True) -> dict[str, Any]:
    """The port's latest incident once it has ``verdict`` (and ``status``); with
    ``latest=False``, any of its incidents that has."""
    found: list[dict[str, Any]] = []

    def judged() -> dict[str, Any] | None:
        found[:] = service.incidents(port)
        return next((inc for inc in (found[-1:] if latest else found)
                     if inc["verdict"] == verdict and status in (None, inc["status"])), None)

    with contextlib.suppress(AssertionError):
        return eventually(judged, f"a {verdict} incident on {port}", timeout, every=0.3)
    raise AssertionError(f"wanted a {verdict} incident on {port}, got {found}\n"
                         f"{service.log.read_text()[-4000:]}")


def _flood_until_spoofed(the_lab: Lab, tmp_path: Path, backlog: int, count: int,
                         sources: list[str] | None = None,
                         address: str = "0.0.0.0") -> tuple[Service, int, dict[str, Any]]:
    """`synwatch run` on its defaults (dry run, sampler "auto", no accounting set), a listener
    that never accepts, a spoofed flood, and the incident once it is closed as spoofed."""
    service = Service(the_lab, tmp_path)
    try:
        service.wait_log("sources of a flood: SYN sampler (")
        port = lab_port()
        the_lab.listen(port, backlog=backlog, address=address)
        flood = the_lab.start_flood(port, count, sources)
        assert flood.wait(timeout=120) == 0
        inc = _wait_verdict(service, port, "spoofed", status="closed")
    finally:
        service.stop()
    return service, port, inc


def test_spoofed_slash16_against_a_backlog_of_16_is_spoofed(the_lab: Lab,
                                                            tmp_path: Path) -> None:
    """16 request sockets cannot tell a /16 apart from a few networks; the packet sample can."""
    service, port, inc = _flood_until_spoofed(the_lab, tmp_path, backlog=16, count=6000)
    service.check_replay(port, "spoofed-sampled")
    assert inc["peak_syn_recv"] <= 17
    # no prefix stands out: each of the /16's 256 /24s has about 0.4 % of the SYNs; a sample
    # is a sample (one kept SYN counts for the 1-in-N of its moment, ~100 at this rate), so the
    # largest estimate can reach a few percent (7.8 % seen once on a loaded machine), far from
    # the few-networks case, where 2 prefixes carry half each
    top4 = sum(p["share"] for p in inc["top_prefixes"][:4])
    assert inc["top_prefixes"][0]["share"] < 0.15 and top4 < 0.4, inc["top_prefixes"][:4]
    shown = _evidence(inc, service)
    assert "packet sample" in shown and "95% bound" in shown
    seen = check_picture(service.config, inc["id"], "spoofed",
                         series=("syns_full", "syns_all", "syn_recv", "cookies_sent"))
    # the picture of spoofing: cookies sent, hardly any validated
    pic = seen["picture"]
    sent = sum(v or 0 for v in pic.cookies_sent.v)  # type: ignore[attr-defined]
    back = sum(v or 0 for v in pic.cookies_recv.v)  # type: ignore[attr-defined]
    assert sent > 0 and back < 0.05 * sent, (sent, back)


def test_cookies_for_every_syn_in_a_dry_run_are_spoofed_from_sampled_prefixes(
        the_lab: Lab, tmp_path: Path) -> None:
    """tcp_syncookies=2: no request socket, no log line, no accounting set in a dry run; the
    sample alone names the port and the sources."""
    the_lab.sysctl("net.ipv4.tcp_syncookies", 2)
    service, port, inc = _flood_until_spoofed(the_lab, tmp_path, backlog=64, count=5000)
    service.check_replay(port, "cookies2-sampled")
    assert (inc["trigger"], inc["peak_syn_recv"]) == ("counters", 0)
    assert len(inc["top_prefixes"]) == 10 and all(p["prefix"].startswith(f"{SPOOF_NET}.")
                                                  for p in inc["top_prefixes"])
    assert "SYN accounting off (actions are a dry run)" in service.log.read_text()


def test_ipv6_flood_over_a_slash48_is_spoofed(the_lab: Lab, tmp_path: Path) -> None:
    sources = [f"{SPOOF_NET6}:0:7:{random.randrange(65536):x}::{random.randrange(1, 65535):x}"
               for _ in range(5000)]
    _, _, inc = _flood_until_spoofed(the_lab, tmp_path, backlog=32, count=len(sources),
                                     sources=sources, address="::")
    assert inc["family"] == 6
    assert all(p["prefix"].startswith(f"{SPOOF_NET6}:0:7:") and p["prefix"].endswith("::/64")
               for p in inc["top_prefixes"])


def test_slow_build_up_from_one_slash22_is_half_open_and_concentrated(
        the_lab: Lab, tmp_path: Path) -> None:
    """The first seed: 8 SYN/s from four /24s of one /22 against backlog 511. The queue parks
    below half the backlog; no overflow counter moves and the kernel logs nothing.

    half_open_for is 4 s here, not the default 10 s: the seed's rate and backlog are what this
    is about (the queue needs 16 s at 8 SYN/s to reach a quarter of 511), not how long the
    rule waits, and nothing below depends on it (the recording carries it for the replay)."""
    service = Service(the_lab, tmp_path, quiet="60s", incident='half_open_for = "4s"\n')
    try:
        port = lab_port()
        the_lab.listen(port, backlog=511)
        # each /24's addresses spread over it from its first few SYNs on: drawn at random, the
        # 8 of a /24 sampled when the verdict is taken all fell in one half one run in 30 or
        # so, and the ban was rightly that /25, not the /22 this seed is about
        sources = [f"{SPOOF_NET}.{4 + i % 4}.{1 + 37 * i % 254}" for i in range(320)]
        the_lab.start_flood(port, len(sources), sources, rate=8)
        inc = _wait_verdict(service, port, "concentrated", timeout=45)
    finally:
        service.stop()
    service.check_replay(port, "half-open")
    assert inc["trigger"] == "half_open", inc
    assert inc["status"] == "open"
    assert service.events(port) == [], "the kernel logs nothing for a half-open build-up"
    assert 64 <= inc["peak_syn_recv"] < 256
    recs = " ".join(inc["recommendations"])
    assert f"block {SPOOF_NET}.4.0/22 ([actions.ban]" in recs, recs
    assert f"{SPOOF_NET}.4.0/22: 4 flooding /24s fill it" in recs, recs
    assert "harmless at this rate so far" in recs
    assert {p["prefix"] for p in inc["top_prefixes"]} == {f"{SPOOF_NET}.{n}.0/24"
                                                          for n in (4, 5, 6, 7)}
    # the build-up started well before the incident opened: half_open_for (4 s) earlier
    assert inc["first_evidence_at"] < inc["opened_at"]
    seen = check_picture(service.config, inc["id"], "half-open", series=("syn_recv",))
    assert seen["picture"].syn_recv.t[0] < -2, "its picture shows the build-up"  # type: ignore[attr-defined]


def test_a_new_flood_next_to_an_earlier_floods_residue_opens_one_incident(
        the_lab: Lab, tmp_path: Path) -> None:
    """An earlier flood's request sockets keep its queue full for a minute; the counters that
    move for a new flood on another port belong to that port only."""
    service = Service(the_lab, tmp_path)
    try:
        first, second = lab_port(), lab_port()
        the_lab.listen(first, backlog=16)
        the_lab.listen(second, backlog=16)
        the_lab.flood(first, 2000, [f"{SPOOF_NET}.9.{i % 250 + 1}" for i in range(2000)])
        [one] = service.wait_incidents(first, 1, "closed", timeout=30)
        assert one["verdict"] == "concentrated"
        the_lab.flood(second, 2000, [f"{SPOOF_NET}.10.{i % 250 + 1}" for i in range(2000)])
        [two] = service.wait_incidents(second, 1, "closed", timeout=30)
    finally:
        service.stop()
    assert service.incidents(first) == [one], "the residue got the new flood's incident"
    # the chance to get it wrong was there: a probe in which the counters moved while both
    # queues were full (the first one of residue only)
    probes = [json.loads(line) for line in service.recording.read_text().splitlines()]
    probes = [p for p in probes if p["type"] == "evidence"]

    def full(p: dict[str, Any], port: int) -> bool:
        return any(li["port"] == port and li["syn_recv"] >= li["backlog"]
                   for li in p["snapshot"]["listeners"])

    def overflowed(p: dict[str, Any]) -> int:
        return int(p["snapshot"]["counters"].get("TcpExt.TCPReqQFullDoCookies", 0))

    assert any(overflowed(b) > overflowed(a) and full(b, first) and full(b, second)
               for a, b in itertools.pairwise(probes))
    assert two["verdict"] == "concentrated"
    assert two["top_prefixes"][0]["prefix"] == f"{SPOOF_NET}.10.0/24"


def _wait_banned(the_lab: Lab, timeout: float = 10) -> set[str]:
    """The bans in the namespace's nftables once there are any (a ban lands within the probe
    that decided it, after the incident's change is stored)."""
    with contextlib.suppress(AssertionError):
        return eventually(lambda: _banned(the_lab), "a ban in nftables", timeout, every=0.2)
    return set()


def _banned(the_lab: Lab) -> set[str]:
    out = the_lab.in_server("nft", "-j", "list", "set", "inet", "synwatch", "bannet4").stdout
    return {f"{e['elem']['val']['prefix']['addr']}/{e['elem']['val']['prefix']['len']}"
            for item in json.loads(out)["nftables"] for e in item.get("set", {}).get("elem", [])}


def test_the_slow_build_up_is_banned_as_one_slash22(the_lab: Lab, tmp_path: Path) -> None:
    """half_open_for 2 s (4 probes): how long the rule waits is not what this is about, the
    /22 and the unban of one /24 inside it are."""
    service = Service(the_lab, tmp_path, quiet="60s", dry_run=False,
                      incident='half_open_for = "2s"\n')
    try:
        port = lab_port()
        the_lab.listen(port, backlog=256)  # half_open_min 64 = a quarter of the backlog
        # spread over each /24 from its first SYNs on (test_slow_build_up_from_one_slash22_...)
        sources = [f"{SPOOF_NET}.{4 + i % 4}.{1 + 37 * i % 254}" for i in range(400)]
        the_lab.start_flood(port, len(sources), sources, rate=16)
        inc = _wait_verdict(service, port, "concentrated", timeout=30)
        _wait_banned(the_lab)
    finally:
        service.stop()
    assert inc["trigger"] == "half_open"
    assert "WARNING synwatch: actions: LIVE: synwatch changes sysctls and firewall rules" in \
        service.log.read_text()
    assert _banned(the_lab) == {f"{SPOOF_NET}.4.0/22"}
    r = synwatch("bans", "list", "--format", "json", "--config", str(service.config))
    assert [b["prefix"] for b in json.loads(r.out)] == [f"{SPOOF_NET}.4.0/22"]
    # the admin lets one /24 back in: the rest of the /22 stays banned
    r = synwatch("unban", f"{SPOOF_NET}.5.0/24", "--config", str(service.config))
    assert r.code == 0, r.err
    assert f"{SPOOF_NET}.5.0/24 was inside it; the rest stays banned" in r.out
    assert _banned(the_lab) == {f"{SPOOF_NET}.4.0/24", f"{SPOOF_NET}.6.0/23"}


@contextmanager
def nginx(the_lab: Lab, tmp_path: Path, port: int, backlog: int) -> Iterator[None]:
    """Debian's nginx in the server namespace, `listen ... backlog=N`, answering 200."""
    conf = tmp_path / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""
        worker_processes 1;
        pid {tmp_path}/nginx.pid;
        error_log {tmp_path}/nginx-error.log;
        events {{ worker_connections 4096; }}
        http {{
            access_log off;
            server {{
                listen {SERVER_IP}:{port} backlog={backlog};
                location / {{ return 200 "ok"; }}
            }}
        }}
    """))
    proc = subprocess.Popen(["ip", "netns", "exec", the_lab.server_ns, "nginx", "-c", str(conf),
                             "-p", str(tmp_path), "-g", "daemon off;"])
    try:
        eventually(lambda: port in {li["port"] for li in _listeners(the_lab)}, "nginx listening",
                   10, every=0.05, alive=proc)
        yield
    finally:
        proc.terminate()  # the master stops its workers (SIGKILL would orphan them)
        proc.wait(timeout=10)


def _listeners(the_lab: Lab) -> list[dict[str, Any]]:
    out = the_lab.in_server("ss", "-Hltn").stdout
    return [{"port": int(line.split()[3].rsplit(":", 1)[1])} for line in out.splitlines()]


def test_a_real_burst_against_nginx_with_a_small_backlog_is_capacity(
        the_lab: Lab, tmp_path: Path) -> None:
    """ab's 1,000 concurrent clients against `listen ... backlog=64`: the kernel prints its
    line, every request is served, and the burst is over before the next probe."""
    port = lab_port()
    with nginx(the_lab, tmp_path, port, backlog=64):
        service = Service(the_lab, tmp_path)
        try:
            ab = subprocess.run(["ip", "netns", "exec", the_lab.client_ns, "sh", "-c",
                                 f"ulimit -n 8192; ab -q -c 1000 -n 30000 "
                                 f"http://{SERVER_IP}:{port}/"],
                                capture_output=True, text=True, timeout=120, check=False)
            assert ab.returncode == 0, ab.stderr
            assert "Complete requests:      30000" in ab.stdout
            # the burst's incident; a straggler's accept-queue overflow after it closed may
            # open a short one of its own (seen once in CI), which is not what this is about
            inc = _wait_verdict(service, port, "capacity", status="closed", latest=False)
        finally:
            service.stop()
    recs = " ".join(inc["recommendations"])
    assert "real clients" in recs or "does not accept() fast enough" in recs, recs
    assert re.search(rf"nginx: `listen {port} backlog=\d+;`", recs), recs
    assert inc["top_prefixes"][0]["prefix"] == "10.231.0.0/24"  # the client namespace itself
    assert not any(a["action"] == "ban" for a in inc["actions"])
    check_picture(service.config, inc["id"], "capacity", series=(),
                  some_of=("accept_queue", "syn_recv", "syns_all", "syns_full"))


PROBE_INTERVAL = 0.5  # incident.probe_interval of the harness's Service


def _just_probed(service: Service, timeout: float = 10) -> None:
    """Returns as soon as the service has taken a new probe (each writes its evidence line to
    the recording as it is taken): the moment a burst's phase is counted from."""
    seen = service.probes()
    eventually(lambda: service.probes() != seen, "probe", timeout, every=0.01,
               alive=service.proc, seen=lambda: service.log.read_text()[-3000:])


def test_the_nginx_burst_is_capacity_at_every_phase_of_the_probe(the_lab: Lab,
                                                                  tmp_path: Path) -> None:
    """A one-second burst of real requests (ab -c 2000 -n 40000 against `listen ... backlog=128`,
    all served) falls anywhere between two probes: its verdict must not depend on where. Three
    bursts, each started at its own phase of the probe interval (right after a probe, a third
    and two thirds of the interval after one: the phases five bursts in a row used to reach by
    chance), three incidents, each capacity."""
    port = lab_port()
    with nginx(the_lab, tmp_path, port, backlog=128):
        service = Service(the_lab, tmp_path)
        try:
            for run, phase in enumerate((0.0, 1 / 3, 2 / 3), start=1):
                _just_probed(service)
                time.sleep(phase * PROBE_INTERVAL)  # the burst's phase, not a wait for anything
                ab = subprocess.run(["ip", "netns", "exec", the_lab.client_ns, "sh", "-c",
                                     f"ulimit -n 8192; ab -q -c 2000 -n 40000 "
                                     f"http://{SERVER_IP}:{port}/"],
                                    capture_output=True, text=True, timeout=120, check=False)
                assert ab.returncode == 0, ab.stderr
                assert "Complete requests:      40000" in ab.stdout
                def all_closed(run: int = run) -> list[dict[str, Any]] | None:
                    got = service.incidents(port)
                    return got if len(got) >= run and all(
                        i["status"] == "closed" for i in got) else None

                found = eventually(all_closed, f"{run} closed incidents", 40, every=0.3)
        finally:
            service.stop()
    assert [i["verdict"] for i in found] == ["capacity"] * len(found), [
        (i["verdict"], i["recommendations"][:1]) for i in found]
    assert len(found) >= 3


def test_nginx_spoofed_then_concentrated_is_banned_in_its_second_phase(
        the_lab: Lab, tmp_path: Path) -> None:
    """An attacker opens with spoofed noise and follows with a bannable flood within the quiet
    period: one incident, a second phase judged on its own evidence, and the ban."""
    port = lab_port()
    with nginx(the_lab, tmp_path, port, backlog=511):
        service = Service(the_lab, tmp_path, quiet="20s", dry_run=False,
                          incident='verdict_window = "3s"\n')
        try:
            the_lab.flood(port, 6000)  # all over 10.232.0.0/16
            first = _wait_verdict(service, port, "spoofed")
            assert _banned(the_lab) == set()
            sources = [f"{SPOOF_NET}.5.{random.randint(1, 254)}" for _ in range(3000)]
            the_lab.start_flood(port, len(sources), sources, rate=400)
            second = _wait_verdict(service, port, "concentrated", timeout=30)
            _wait_banned(the_lab)
        finally:
            service.stop()
    assert second["id"] == first["id"], "one incident, not a storm"
    assert second["status"] == "open"
    assert _banned(the_lab) == {f"{SPOOF_NET}.5.0/24"}
    shown = _evidence(second, service)
    assert "phase:             spoofed from" in shown
    assert "phase:             concentrated from" in shown
    assert [i["id"] for i in service.incidents(port)] == [first["id"]]
    seen = check_picture(service.config, first["id"], "two-phases",
                         series=("syns_full", "syn_recv", "cookies_sent"), bans=1)
    phases = [m.label for m in seen["picture"].markers  # type: ignore[attr-defined]
              if m.kind == "phase"]
    assert phases == ["spoofed", "concentrated"], phases
    drawn = synwatch("incidents", "show", str(first["id"]), "--plot",
                     str(tmp_path / "two-phases.png"), "--config", str(service.config))
    assert drawn.code == 0 and (tmp_path / "two-phases.png").read_bytes().startswith(
        b"\x89PNG"), drawn.err


def test_real_clients_on_a_slow_link_hold_requests_half_open_and_open_nothing(
        the_lab: Lab, tmp_path: Path) -> None:
    """Handshakes that complete late keep SYN-RECV high for as long as the build-up rule waits,
    but PassiveOpens keeps up: no half_open incident, no incident at all.

    The rule waits 3 s and the clients run 15 s (they were 5 s and 20 s): the stretch the
    queue must stay high for scales with the rule, and a shorter rule is the harder case for
    the verdict (fewer completions counted against the same SYN-RECV when it decides)."""
    rule, seconds = 3, 15
    service = Service(the_lab, tmp_path, incident=f'half_open_for = "{rule}s"\n')
    try:
        port = lab_port()
        the_lab.serve(port, backlog=256)  # half_open_min 64 = a quarter of the backlog
        clients = the_lab.slow_clients(port, seconds=seconds)  # a congested link has lulls
        out, _ = clients.communicate(timeout=60)
        completed, failed = map(int, out.split())
    finally:
        service.stop()
    # 150 attempts a second; at least 125 of them completed (2,500 of the 3,000 in 20 s)
    assert completed >= 125 * seconds and failed == 0, out
    # the rule had its chance: the listener stayed at or above 64 half-open requests for longer
    # than half_open_for, probe after probe, while nothing overflowed
    probes = [json.loads(line) for line in service.recording.read_text().splitlines()]
    held = [next(li["syn_recv"] for li in p["snapshot"]["listeners"] if li["port"] == port)
            for p in probes if p["type"] == "evidence"
            and any(li["port"] == port for li in p["snapshot"]["listeners"])]
    longest = max(len(list(run)) for high, run in itertools.groupby(x >= 64 for x in held)
                  if high)
    assert longest * 0.5 > rule + 1, held  # probes 0.5 s apart: past the rule, and a probe
    assert service.incidents(port) == []


def test_floods_during_a_held_store_lock_are_detected_at_their_own_times(
        the_lab: Lab, tmp_path: Path) -> None:
    """Another process holds the SQLite history exclusively for 8 s while three floods come
    2 s apart. Probes and correlation go on; the incidents are written when the lock goes,
    with the times of their evidence, their verdicts, and the kernel lines linked."""
    service = Service(the_lab, tmp_path, quiet="30s")
    ports = [lab_port() for _ in range(3)]
    for port in ports:
        the_lab.listen(port, backlog=16)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sqlite3, sys, time
            db = sqlite3.connect({str(tmp_path / "h.db")!r}, isolation_level=None)
            db.execute("BEGIN EXCLUSIVE")
            print("locked", flush=True)
            time.sleep(8)
            db.execute("COMMIT")
        """)], stdout=subprocess.PIPE, text=True)
    started: dict[int, datetime] = {}
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        for n, port in enumerate(ports):
            started[port] = datetime.now(timezone.utc)
            the_lab.flood(port, 1500, [f"{SPOOF_NET}.{30 + n}.{i % 250 + 1}" for i in range(1500)])
            time.sleep(2)
        assert holder.wait(timeout=20) == 0
        eventually(lambda: all(service.incidents(p) and service.events(p)
                               and service.events(p)[0]["incident_id"] for p in ports),
                   "every flood's incident and its line", 20, every=0.3,
                   seen=lambda: service.log.read_text()[-3000:])
    finally:
        holder.kill()
        service.stop()
    for n, port in enumerate(ports):
        [inc] = service.incidents(port)
        first = datetime.fromisoformat(inc["first_evidence_at"])
        opened = datetime.fromisoformat(inc["opened_at"])
        # the store was locked: these are the evidence's times, not the write's (a probe
        # interval is 0.5 s, the kernel line is printed as the flood starts)
        assert abs((first - started[port]).total_seconds()) < 1.5, (n, inc)
        assert (opened - started[port]).total_seconds() < 1.5, (n, inc)
        assert inc["verdict"] == "concentrated"
        assert inc["top_prefixes"][0]["prefix"] == f"{SPOOF_NET}.{30 + n}.0/24"
        [event] = service.events(port)
        assert event["incident_id"] == inc["id"]
    assert service.log.read_text().count("detection and actions go on") == 1, \
        "logged once, not per try"
