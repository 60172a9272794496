"""Every ban backend applied for real inside a namespace the test makes: the setup is idempotent,
a banned /24 really drops SYNs (no request socket is made for it) while its neighbour still gets
through, listing reads back what is banned with its time left, and an unban lets it in again."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from synwatch.actions.firewall import BanItem, Firewall
from synwatch.actions.presets import load_presets
from synwatch.probes.snapshot import take
from tests.conftest import REPO
from tests.lab import SPOOF_NET, Lab, lab, lab_port
from tests.unitjail import confined

pytestmark = pytest.mark.needs_root
BANNED, OPEN = f"{SPOOF_NET}.1.0/24", f"{SPOOF_NET}.2.0/24"
LOCKS = (Path("/run/ufw.lock"), Path("/run/xtables.lock"))  # ufw's, iptables-legacy's


@pytest.fixture
def the_lab() -> Iterator[Lab]:
    with lab() as made:
        made.sysctl("net.ipv4.tcp_syncookies", 0)  # every SYN makes a request socket
        made.sysctl("net.ipv4.tcp_synack_retries", 1)
        etc = Path("/etc/netns") / made.server_ns
        made_netns_dir = not etc.parent.exists()
        # every ufw run opens /run/ufw.lock, which `ip netns exec` does not separate
        made_locks = [lock for lock in LOCKS if not lock.exists()]
        try:
            # ufw keeps its rules in /etc/ufw; `ip netns exec` binds /etc/netns/NS/ufw over it,
            # so the namespace gets its own ufw and the host's is never touched
            shutil.copytree("/etc/ufw", etc / "ufw")
            yield made
        finally:
            shutil.rmtree(etc, ignore_errors=True)
            if made_netns_dir:
                shutil.rmtree(etc.parent, ignore_errors=True)
            for lock in made_locks:
                lock.unlink(missing_ok=True)


def syn_recv_by_prefix(the_lab: Lab, port: int) -> dict[str, int]:
    snap = take(the_lab.server_ns)
    [state] = [s for s in snap.listeners if s.listener.port == port]
    return dict(state.prefixes)


def iptables_rules(the_lab: Lab) -> str:
    return the_lab.in_server("iptables", "-S", "INPUT").stdout


@pytest.mark.parametrize("backend", ["nftables", "ufw", "iptables-ipset"])
def test_a_banned_slash24_drops_syns_and_an_unban_lets_it_back(the_lab: Lab,
                                                              backend: str) -> None:
    if backend == "ufw":
        the_lab.in_server("ufw", "default", "allow", "incoming")
        the_lab.in_server("ufw", "--force", "enable")
    fw = Firewall(load_presets()[backend], the_lab.server_ns)
    for _ in range(2):  # idempotent: the second setup changes nothing
        fw.apply(fw.render_setup())
    if backend == "nftables":
        chain = the_lab.in_server("nft", "list", "chain", "inet", "synwatch", "ban").stdout
        assert chain.count("drop") == 2
    if backend == "iptables-ipset":
        assert iptables_rules(the_lab).count("--match-set synwatch-ban4 src -j DROP") == 1

    fw.apply(fw.render_ban([BanItem(BANNED, 60, "synwatch incident 1"),
                            BanItem("2001:db8:7::/64", 120, "synwatch incident 1")]))
    fw.apply(fw.render_ban([BanItem(BANNED, 60, "synwatch incident 1")]))  # a refresh
    listed = fw.listed()
    assert set(listed) == {BANNED, "2001:db8:7::/64"}
    if fw.preset.kernel_timeouts:
        assert 50 <= (listed[BANNED] or 0) <= 60
        assert 110 <= (listed["2001:db8:7::/64"] or 0) <= 120
    else:
        assert listed[BANNED] is None

    port = lab_port()
    the_lab.listen(port, backlog=512)
    the_lab.flood(port, 200, [f"{SPOOF_NET}.1.{i % 250 + 1}" for i in range(100)]
                  + [f"{SPOOF_NET}.2.{i % 250 + 1}" for i in range(100)])
    seen = syn_recv_by_prefix(the_lab, port)
    assert seen.get(OPEN, 0) >= 90, seen
    assert BANNED not in seen, seen

    fw.apply(fw.render_unban([BANNED]))
    fw.apply(fw.render_unban([BANNED]))  # unbanning twice is not an error
    assert set(fw.listed()) == {"2001:db8:7::/64"}
    the_lab.flood(port, 100, [f"{SPOOF_NET}.1.{i % 250 + 1}" for i in range(100)])
    assert syn_recv_by_prefix(the_lab, port).get(BANNED, 0) >= 90


def test_foreign_ufw_rules_are_not_ours(the_lab: Lab) -> None:
    the_lab.in_server("ufw", "default", "allow", "incoming")
    the_lab.in_server("ufw", "--force", "enable")
    the_lab.in_server("ufw", "deny", "from", "192.0.2.0/24", "comment", "the admin rule")
    fw = Firewall(load_presets()["ufw"], the_lab.server_ns)
    fw.apply(fw.render_ban([BanItem(BANNED, 60, "synwatch incident 4")]))
    assert fw.listed() == {BANNED: None}
    assert "192.0.2.0/24" in the_lab.in_server("ufw", "status").stdout


UNIT = REPO / "packaging" / "synwatch.service"
TMPFILES = REPO / "packaging" / "synwatch.tmpfiles"
# setup, a ban, the listing, an unban and the listing again: what the service does to a backend
BAN_CYCLE = """
import json, sys
from synwatch.actions.firewall import BanItem, Firewall
from synwatch.actions.presets import load_presets
backend, netns, prefix = sys.argv[1:4]
fw = Firewall(load_presets()[backend], netns)
fw.apply(fw.render_setup())
fw.apply(fw.render_ban([BanItem(prefix, 60, "synwatch incident 9")]))
banned = fw.listed()
fw.apply(fw.render_unban([prefix]))
print(json.dumps({"banned": sorted(banned), "after": sorted(fw.listed())}))
"""


def under_unit(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(confined(list(argv), UNIT), capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=False)


def as_after_a_reboot() -> None:
    """/run is a tmpfs, empty after a reboot, and the lock files come back only from
    systemd-tmpfiles reading the shipped synwatch.tmpfiles (the lab fixture removes them)."""
    for lock in LOCKS:
        lock.unlink(missing_ok=True)
    subprocess.run(["systemd-tmpfiles", "--create", str(TMPFILES)], check=True,
                   capture_output=True)


def test_the_unit_jail_is_read_only_where_the_unit_is(the_lab: Lab) -> None:
    """The reproduction of ProtectSystem=strict really forbids writes (so the test below can
    fail), and the unit's own ReadWritePaths are writable in it."""
    probe = "/etc/synwatch-unitjail-probe"
    res = under_unit("sh", "-c", f"touch {probe}")
    assert res.returncode != 0 and "Read-only file system" in res.stderr, res
    assert not Path(probe).exists()
    res = under_unit("ip", "netns", "exec", the_lab.server_ns, "sh", "-c",
                     "touch /etc/ufw/synwatch-probe && rm /etc/ufw/synwatch-probe")
    assert res.returncode == 0, res.stderr  # /etc/netns/NS/ufw, bound over /etc/ufw


@pytest.mark.parametrize("backend", ["nftables", "ufw", "iptables-ipset"])
def test_every_backend_works_under_the_shipped_unit(the_lab: Lab, backend: str) -> None:
    """issue 9, finding 6: under ProtectSystem=strict, /etc/ufw, /etc/netns and /run are
    read-only, so ufw could not write its rules or take its lock. Every backend runs its whole
    ban cycle inside the unit's mount restrictions."""
    if backend == "ufw":  # the admin's firewall, enabled outside synwatch
        the_lab.in_server("ufw", "default", "allow", "incoming")
        the_lab.in_server("ufw", "--force", "enable")
    as_after_a_reboot()
    res = under_unit(sys.executable, "-c", BAN_CYCLE, backend, the_lab.server_ns, BANNED)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"banned": [BANNED], "after": []}
