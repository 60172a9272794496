"""Many network namespaces at once (`watch.netns` a list or "*"), on the real kernel: each
namespace's flood is its own incident with its own verdict and its own responses, a kernel line
goes to the namespace whose state bears it out, and a namespace that goes away mid-incident
closes it. Containers are network namespaces too; tests/test_containers_lab.py runs the same
with real Docker containers."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import synwatch
from tests.support.harness import Service
from tests.support.lab import SPOOF_NET, Lab, banned_in_nft, lab, lab_port, sh
from tests.support.wait import eventually

pytestmark = pytest.mark.needs_root


@pytest.fixture
def two_labs() -> Iterator[tuple[Lab, Lab]]:
    with lab() as a, lab() as b:
        yield a, b


def _cookies(the_lab: Lab) -> int:
    return int(the_lab.in_server("sysctl", "-n", "net.ipv4.tcp_syncookies").stdout)


def _tables(the_lab: Lab) -> str:
    return the_lab.in_server("nft", "list", "tables").stdout


def _incidents(service: Service, port: int) -> list[dict[str, Any]]:
    return service.incidents(port)


def _wait(service: Service, what: str, check: Any, timeout: float = 40) -> Any:
    return eventually(check, what, timeout, every=0.3, alive=service.proc,
                      seen=lambda: service.log.read_text()[-4000:])


def test_a_flood_in_one_of_two_namespaces_is_its_incident_alone(
        two_labs: tuple[Lab, Lab], tmp_path: Path) -> None:
    """Both namespaces listen on the same port, so the kernel's line fits both: only the
    flooded one's state bears it out. Its SYN cookies are raised and restored inside it; the
    other's are never touched, and no action ever runs there."""
    a, b = two_labs
    port = lab_port()
    for the_lab in (a, b):
        the_lab.sysctl("net.ipv4.tcp_syncookies", 0)
        the_lab.listen(port, backlog=16)
    service = Service(a, tmp_path, dry_run=False, quiet="3s",
                      watch=json.dumps([a.server_ns, b.server_ns]))
    try:
        service.wait_log(f"watching namespace {b.server_ns}")
        a.flood(port, 3000)
        [inc] = _wait(service, "an incident", lambda: _incidents(service, port) or None)
        assert inc["netns"] == a.server_ns
        _wait(service, "cookies raised in the flooded namespace", lambda: _cookies(a) == 1)
        [closed] = _wait(service, "the incident closed",
                         lambda: [i for i in _incidents(service, port)
                                  if i["status"] == "closed"] or None)
        _wait(service, "cookies restored there", lambda: _cookies(a) == 0)
        assert (closed["id"], closed["verdict"]) == (inc["id"], "spoofed"), closed
        service.wait_turns(3)
    finally:
        service.stop()
    assert _cookies(b) == 0
    assert "synwatch" not in _tables(b), "no action ever set up in the quiet namespace"
    assert [i["netns"] for i in _incidents(service, port)] == [a.server_ns]
    log = service.log.read_text()
    assert f"actions in {a.server_ns}: syncookies" in log and f"actions in {b.server_ns}" \
        not in log
    # the list finds it by its namespace's name, globs included
    listed = synwatch("incidents", "list", "--netns", f"{a.server_ns[:6]}*", "--format", "json",
                      "--config", str(service.config))
    assert [i["id"] for i in json.loads(listed.out)] == [inc["id"]], listed.err
    none = synwatch("incidents", "list", "--netns", b.server_ns, "--format", "json",
                    "--config", str(service.config))
    assert json.loads(none.out) == [], none.err


def test_two_namespaces_flooded_at_once_get_their_own_verdicts_and_bans(
        two_labs: tuple[Lab, Lab], tmp_path: Path) -> None:
    """A spoofed flood over a /16 in one, a flood from two /24s in the other, at the same time
    and on the same port: one spoofed incident (no ban), one concentrated incident whose bans
    land in its own namespace's nftables set and spare its real clients."""
    spoofed, concentrated = two_labs
    port = lab_port()
    spoofed.listen(port, backlog=16)
    concentrated.serve(port, 16)
    service = Service(spoofed, tmp_path, dry_run=False, quiet="5s",
                      watch=json.dumps([spoofed.server_ns, concentrated.server_ns]))
    try:
        service.wait_log(f"watching namespace {concentrated.server_ns}")
        clients = concentrated.real_clients(port, [f"{SPOOF_NET}.30.{i}" for i in range(1, 21)],
                                            seconds=30)
        nets = [f"{SPOOF_NET}.7", f"{SPOOF_NET}.8"]
        sources = [f"{random.choice(nets)}.{random.randint(1, 254)}" for _ in range(8000)]
        concentrated.start_flood(port, len(sources), sources, rate=1000)
        spoofed.start_flood(port, 8000, rate=1000)
        want = {f"{n}.0/24" for n in nets}
        _wait(service, "both /24s banned in the concentrated namespace",
              lambda: set(banned_in_nft(concentrated)) >= want)
        banned_at = time.time()
        def judged() -> dict[str, str] | None:
            v = {i["netns"]: i["verdict"] for i in _incidents(service, port)}
            return v if set(v.values()) == {"spoofed", "concentrated"} else None

        verdicts = _wait(service, "both verdicts", judged)
        assert verdicts == {spoofed.server_ns: "spoofed", concentrated.server_ns: "concentrated"}
        service.wait_turns(3)
        assert set(banned_in_nft(concentrated)) == want, "nothing else"
        assert banned_in_nft(spoofed) == {}, "nothing banned where the flood is spoofed"
        assert clients.stdout is not None
        after = []
        for line in clients.stdout:
            at, outcome = line.split()[:2]
            if float(at) > banned_at:
                after.append(outcome == "ok")
            if len(after) >= 40:
                break
        clients.kill()
        assert sum(after) / len(after) >= 0.95, after
    finally:
        service.stop()
    bans = json.loads(synwatch("bans", "list", "--format", "json", "--config",
                               str(service.config)).out)
    by_incident = {i["id"]: i["netns"] for i in _incidents(service, port)}
    assert {by_incident[b["incident_id"]] for b in bans} == {concentrated.server_ns}


def test_a_namespace_that_goes_away_mid_incident_closes_it(two_labs: tuple[Lab, Lab],
                                                           tmp_path: Path) -> None:
    """A container stopped mid-flood: its namespace goes, and with it everything the incident
    was about. The incident closes at the next look, without waiting for the quiet period, and
    the other namespace is still watched."""
    a, b = two_labs
    port = lab_port()
    a.listen(port, backlog=16)
    b.listen(port, backlog=16)
    service = Service(a, tmp_path, quiet="5m",
                      watch=json.dumps([a.server_ns, b.server_ns]))
    try:
        service.wait_log(f"watching namespace {b.server_ns}")
        a.flood(port, 3000)
        [inc] = _wait(service, "an incident", lambda: _incidents(service, port) or None)
        for proc in a.processes:
            proc.kill()
            proc.wait()
        a.processes.clear()
        sh("ip", "netns", "del", a.server_ns)
        [closed] = _wait(service, "the incident closed", lambda: [
            i for i in _incidents(service, port) if i["status"] == "closed"] or None, timeout=20)
        assert closed["id"] == inc["id"]
        service.wait_log(f"namespace {a.server_ns} is gone")
        b.flood(port, 3000)
        _wait(service, "the other namespace's incident", lambda: [
            i for i in _incidents(service, port) if i["netns"] == b.server_ns] or None)
    finally:
        service.stop()


def test_a_namespace_made_after_the_last_look_is_found_by_its_kernel_line(
        tmp_path: Path) -> None:
    """A container started a second ago and flooded at once: its kernel line fits no namespace
    watched yet, so synwatch looks again then, rather than at its next look (10 s)."""
    with lab() as first:
        service = Service(first, tmp_path, quiet="3s", watch='["swt-*-s"]')
        try:
            service.wait_log(f"watching namespace {first.server_ns}")
            with lab() as late:
                port = lab_port()
                late.listen(port, backlog=16)
                late.flood(port, 3000)
                [inc] = _wait(service, "its incident", lambda: service.incidents(port) or None)
                assert inc["netns"] == late.server_ns
                # found by a look a kernel line made (its own, or an earlier test's line still
                # within the quiet period), not by the next look, 10 s after the start
                log = service.log.read_text()
                assert "looking for namespaces new since the last look" in log
                assert log.index("looking for namespaces new") < log.index(
                    f"watching namespace {late.server_ns}")
        finally:
            service.stop()


def _path_tables(the_lab: Lab) -> set[str]:
    listed = json.loads(the_lab.in_server("nft", "-j", "list", "tables").stdout)["nftables"]
    return {t["table"]["name"] for t in listed
            if "table" in t and t["table"]["name"].startswith("synwatch_path_")}


def test_tables_on_the_path_to_containers_that_went_are_removed(two_labs: tuple[Lab, Lab],
                                                               tmp_path: Path) -> None:
    """A table on the path to a bridged container outlives nothing it guarded. At a start,
    one left for a namespace that went while synwatch was down, and one for a namespace
    replaced under its name (another container, its id told apart), are removed and their bans
    ended in the history; one for the namespace still there stays with its bans; a dry run only
    says so. The package's removal lifts the rest, bans and tables. Real nft in a namespace of
    the test's, standing for a bridge's."""
    from synwatch.actions.ban import PATH_PRESET
    from synwatch.actions.firewall import BanItem, Firewall
    from synwatch.actions.presets import load_presets
    from synwatch.daemon.bridging import PATH_SETTING, drop_stale
    from synwatch.records import Ban
    from synwatch.store import History
    from synwatch.system.bridgepath import BridgePath, record
    from synwatch.system.netnsfind import FoundNamespace, find_namespaces

    bridge, live = two_labs
    seen = find_namespaces()
    [bridge_ns] = [f for f in seen if f.name == bridge.server_ns]
    [live_ns] = [f for f in seen if f.name == live.server_ns]
    store = History.open(f"sqlite:///{tmp_path}/h.db")
    now = datetime.now(timezone.utc)
    tables = {}
    for name, container in (
            ("docker:gone", FoundNamespace((0, 11), "docker:gone", Path("/"), "container")),
            (bridge.server_ns, dataclasses.replace(bridge_ns, pid=999_999)),  # replaced
            (live.server_ns, live_ns)):
        path = BridgePath(bridge.server_ns, bridge_ns.ident, "docker0", "veth1", ("10.9.0.2",),
                          (), container.ident[1])
        fw = Firewall(load_presets()[PATH_PRESET], bridge.server_ns,
                      values=(("table", path.table), ("container", name)),
                      destinations=((4, path.addresses4),))
        fw.apply(fw.render_setup() + fw.render_ban([BanItem("198.51.100.0/24", 600)]))
        store.save_setting(name, PATH_SETTING, record(container, path), now)
        store.add_bans([Ban(prefix="198.51.100.0/24", backend=PATH_PRESET, netns=name,
                            incident_id=None, created_at=now,
                            expires_at=now + timedelta(seconds=600))])
        tables[name] = path.table
    assert _path_tables(bridge) == set(tables.values())
    drop_stale(store, seen, now, dry_run=True)
    assert _path_tables(bridge) == set(tables.values()), "a dry run removes nothing"
    assert store.saved_setting("docker:gone", PATH_SETTING) is not None
    drop_stale(store, seen, now, dry_run=False)  # the service's start, watching many
    assert _path_tables(bridge) == {tables[live.server_ns]}
    for name in ("docker:gone", bridge.server_ns):
        assert store.saved_setting(name, PATH_SETTING) is None
        assert not store.active_bans(name, now), f"{name}'s bans ended"
    assert store.saved_setting(live.server_ns, PATH_SETTING) is not None
    assert store.active_bans(live.server_ns, now)
    config = tmp_path / "synwatch.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n')
    # in a network namespace of its own for "the host's", as tests/test_packaging.py runs it
    locks = [lock for lock in (Path("/run/ufw.lock"), Path("/run/xtables.lock"))
             if not lock.exists()]  # ufw and iptables open them on the host's /run
    try:
        said = subprocess.run(["unshare", "--net", "--", sys.executable, "-m",
                               "synwatch.cli.uninstall"], capture_output=True, text=True,
                              timeout=60, check=True, env={**os.environ,
                                                           "SYNWATCH_CONFIG": str(config)})
    finally:
        for lock in locks:
            lock.unlink(missing_ok=True)
    assert (f"lifted the ban of 198.51.100.0/24 ({PATH_PRESET}, table inet "
            f"{tables[live.server_ns]}) in netns {bridge.server_ns}") in said.stdout, said
    assert _path_tables(bridge) == set()
    assert not store.active_bans(live.server_ns, now)
    assert store.saved_setting(live.server_ns, PATH_SETTING) is None
