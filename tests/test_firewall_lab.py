"""Every ban backend applied for real inside a namespace the test makes: the setup is idempotent,
a banned /24 really drops SYNs (no request socket is made for it) while its neighbour still gets
through, listing reads back what is banned with its time left, and an unban lets it in again."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from synwatch.actions.firewall import BanItem, Firewall
from synwatch.actions.presets import load_presets
from synwatch.probes.snapshot import take
from tests.lab import SPOOF_NET, Lab, lab, lab_port

pytestmark = pytest.mark.needs_root
BANNED, OPEN = f"{SPOOF_NET}.1.0/24", f"{SPOOF_NET}.2.0/24"


@pytest.fixture
def the_lab() -> Iterator[Lab]:
    with lab() as made:
        made.sysctl("net.ipv4.tcp_syncookies", 0)  # every SYN makes a request socket
        made.sysctl("net.ipv4.tcp_synack_retries", 1)
        etc = Path("/etc/netns") / made.server_ns
        try:
            # ufw keeps its rules in /etc/ufw; `ip netns exec` binds /etc/netns/NS/ufw over it,
            # so the namespace gets its own ufw and the host's is never touched
            shutil.copytree("/etc/ufw", etc / "ufw")
            yield made
        finally:
            shutil.rmtree(etc, ignore_errors=True)


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
