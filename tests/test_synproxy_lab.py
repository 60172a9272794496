"""SYNPROXY against a spoofed flood on a host that tracks connections, on the real kernel.

A server namespace with a `ct state` rule (as ufw, firewalld or Docker have), a listener that
accepts, a spoofed flood routed through the client namespace as on the internet, and
`synwatch run` live with `[actions.synproxy] enabled = true` (bans and the accounting set off,
so synwatch's table holds only what this action adds). Without SYNPROXY every forged SYN is a
conntrack entry; once it is on, the table grows by about the real connections only, and real
clients from the attacker's namespace still connect. When the incident closes the ruleset and
the sysctls are exactly as before. nf_conntrack_max is global: the test never lowers it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from synwatch.probes.snapshot import take
from tests.support import NOW
from tests.support.harness import Service
from tests.support.lab import SERVER_IP, Lab, lab_port
from tests.support.wait import eventually

pytestmark = pytest.mark.needs_root
CLIENTS = 300


def state(the_lab: Lab) -> tuple[str, str, str]:
    return (the_lab.in_server("nft", "list", "ruleset").stdout,
            the_lab.in_server("sysctl", "-n", "net.netfilter.nf_conntrack_tcp_loose").stdout,
            the_lab.in_server("sysctl", "-n", "net.ipv4.tcp_syncookies").stdout)


def back_to(the_lab: Lab, before: tuple[str, str, str], timeout: float = 10) -> None:
    """Wait until the ruleset and the sysctls are exactly ``before`` again."""
    eventually(lambda: state(the_lab) == before, "the ruleset and sysctls as before", timeout,
               every=0.3, seen=lambda: (before, state(the_lab)))


def real_clients(the_lab: Lab, port: int, count: int) -> tuple[int, float]:
    """``count`` connections one after the other from the client namespace: how many
    succeeded, and the median connect time in ms."""
    code = textwrap.dedent(f"""
        import socket, statistics, time
        ok, took = 0, []
        for _ in range({count}):
            start = time.monotonic()
            try:
                socket.create_connection(({SERVER_IP!r}, {port}), timeout=3).close()
                ok += 1
                took.append(time.monotonic() - start)
            except OSError:
                pass
            time.sleep(0.01)
        print(ok, statistics.median(took) * 1000 if took else 0)
    """)
    out = the_lab.in_client("python3", "-c", code).stdout.split()
    return int(out[0]), float(out[1])


def service(the_lab: Lab, tmp_path: Path, dry_run: bool) -> Service:
    return Service(the_lab, tmp_path, quiet="4s", dry_run=dry_run,
                   incident='accounting = false\n',
                   extra="[actions.ban]\nenabled = false\n[actions.synproxy]\nenabled = true\n"
                         '[actions.policy]\nspoofed = ["synproxy", "notify", "exec"]\n')


def wait_for_run(svc: Service, port: int, status: str, timeout: float = 30) -> dict:
    def with_run() -> dict | None:
        return next((inc for inc in svc.incidents(port)
                     if any(a["action"] == "synproxy" and a["status"] == status
                            for a in inc["actions"])), None)

    return eventually(with_run, f"synproxy {status} on {port}", timeout, every=0.3,
                      seen=lambda: svc.log.read_text()[-3000:])


def test_synproxy_keeps_a_spoofed_flood_out_of_conntrack(tracked: Lab, tmp_path: Path) -> None:
    before = state(tracked)
    port = lab_port()
    tracked.serve(port, backlog=128)
    svc = service(tracked, tmp_path, dry_run=False)
    try:
        flood = tracked.start_flood(port, 40_000, rate=4000)  # spoofed, all over a /16
        inc = wait_for_run(svc, port, "done")
        assert inc["verdict"] == "spoofed"
        chain = tracked.in_server("nft", "list", "chain", "inet", "synwatch",
                                  f"synproxy_in_{port}").stdout
        assert "synproxy mss 1460 wscale" in chain and "timestamp sack-perm" in chain
        assert state(tracked)[1].strip() == "0"  # nf_conntrack_tcp_loose while it lasts
        ct0 = take(tracked.server_ns).conntrack
        ok, median_ms = real_clients(tracked, port, CLIENTS)
        ct1 = take(tracked.server_ns).conntrack
        assert ct0 is not None and ct1 is not None
        grew = ct1.count - ct0.count
        print(f"\nsynproxy on: {ok}/{CLIENTS} real connections during the flood "
              f"(median connect {median_ms:.1f} ms); conntrack grew by {grew} while "
              "4000 forged SYNs/s arrived")
        assert ok >= CLIENTS * 0.99
        # the real connections, not the forged SYNs
        assert grew <= CLIENTS + 50, (ct0, ct1, svc.log.read_text()[-3000:])
        flood.kill()
        svc.wait_incidents(port, 1, "closed")
        back_to(tracked, before)  # removed at the close, loose put back
    finally:
        svc.stop()
    runs = [a for a in svc.incidents(port)[0]["actions"] if a["action"] == "synproxy"]
    assert [a["status"] for a in runs] == ["done", "done"], runs


def test_a_dry_run_renders_synproxy_and_changes_nothing(tracked: Lab, tmp_path: Path) -> None:
    before = state(tracked)
    port = lab_port()
    tracked.serve(port, backlog=128)
    svc = service(tracked, tmp_path, dry_run=True)
    try:
        flood = tracked.start_flood(port, 20_000, rate=4000)
        inc = wait_for_run(svc, port, "dry-run")
        assert inc["verdict"] == "spoofed"
        assert state(tracked) == before
        flood.kill()
    finally:
        svc.stop()
    log = svc.log.read_text()
    assert f"synproxy_in_{port}" in log and "synproxy mss" in log and "[dry run" in log
    assert state(tracked) == before


def test_preflight_refuses_with_the_reason(tracked: Lab) -> None:
    """Without TCP timestamps SYNPROXY would strip window scaling and SACK from every
    connection: refused, with that reason; with them (the default) it goes ahead."""
    from synwatch.actions.synproxy import preflight
    from synwatch.records import IncidentChange

    change = IncidentChange(
        change="updated", serial=1, incident_id=1, host="h", netns=tracked.server_ns,
        address="0.0.0.0", port=8080, family=4, status="open", verdict="spoofed",
        trigger="counters", opened_at=NOW, closed_at=None, first_evidence_at=None,
        detected_at=NOW, peak_syn_recv=0, top_prefixes=(), recommendations=(), reasons=(),
        state={})
    assert preflight(tracked.server_ns, change) is None
    tracked.sysctl("net.ipv4.tcp_timestamps", 0)
    why = preflight(tracked.server_ns, change)
    assert why is not None and "tcp_timestamps is off" in why
    tracked.sysctl("net.ipv4.tcp_timestamps", 1)
    tracked.sysctl("net.ipv4.tcp_syncookies", 0)
    why = preflight(tracked.server_ns, change)
    assert why is not None and "tcp_syncookies is 0" in why


def test_synproxy_is_reconciled_after_a_crash(tracked: Lab, tmp_path: Path) -> None:
    """A crash mid-flood leaves the chains and tcp_loose=0; the restart takes them down (no
    running incident owns them yet), the resumed spoofed incident puts them back, and its close
    leaves the ruleset and the sysctls as they were before the flood."""
    before = state(tracked)
    port = lab_port()
    tracked.serve(port, backlog=128)
    svc = service(tracked, tmp_path, dry_run=False)
    try:
        flood = tracked.start_flood(port, 100_000, rate=4000)
        wait_for_run(svc, port, "done")
        svc.proc.kill()  # SIGKILL: nothing is cleaned up
        svc.proc.wait(10)
        assert f"synproxy_in_{port}" in tracked.in_server("nft", "list", "ruleset").stdout
        svc.start()

        def put_back() -> bool:
            runs = [a for i in svc.incidents(port) for a in i["actions"]
                    if a["action"] == "synproxy" and a["status"] == "done"]
            return len(runs) >= 2

        eventually(put_back, "SYNPROXY put back", 30, every=0.3,
                   seen=lambda: svc.log.read_text()[-3000:])
        assert f"synproxy_in_{port}" in tracked.in_server("nft", "list", "ruleset").stdout
        assert state(tracked)[1].strip() == "0"
        flood.kill()
        svc.wait_incidents(port, 1, "closed", timeout=40)
        back_to(tracked, before)
    finally:
        svc.stop()
