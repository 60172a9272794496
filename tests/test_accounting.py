"""SYN accounting in nftables: the rendered batch, and the same batch on a real namespace."""

from __future__ import annotations

import pytest

from synwatch.probes.accounting import SynAccounting, parse_set
from synwatch.system.runner import run
from tests.support.lab import SPOOF_NET, lab, lab_port

SETUP_24_64 = """\
add table inet synwatch
add set inet synwatch syn4 { type ipv4_addr . inet_service; flags dynamic, timeout; timeout 2m; size 8192; counter; }
add set inet synwatch syn6 { type ipv6_addr . inet_service; flags dynamic, timeout; timeout 2m; size 8192; counter; }
add chain inet synwatch account { type filter hook prerouting priority -290; policy accept; }
flush chain inet synwatch account
add rule inet synwatch account tcp flags & (syn | ack) == syn update @syn4 { ip saddr and 255.255.255.0 . tcp dport }
add rule inet synwatch account tcp flags & (syn | ack) == syn update @syn6 { ip6 saddr and ffff:ffff:ffff:ffff:: . tcp dport }
"""  # noqa: E501 - one nft statement per line, as nft reads it


def test_render() -> None:
    assert SynAccounting().render_setup() == SETUP_24_64
    assert "ip saddr and 255.255.0.0 " in SynAccounting(v4_len=16).render_setup()
    assert "ip6 saddr and ffff:ffff:ffff:: " in SynAccounting(v6_len=48).render_setup()
    assert SynAccounting().render_teardown() == (
        "delete chain inet synwatch account\n"
        "delete set inet synwatch syn4\ndelete set inet synwatch syn6\n")


def test_parse() -> None:
    text = ('{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {"family": "inet", '
            '"name": "syn4", "elem": [{"elem": {"val": {"concat": ["127.0.0.0", 9999]}, '
            '"expires": 119, "counter": {"packets": 5, "bytes": 300}}}]}}]}')
    assert parse_set(text, 24) == {(9999, "127.0.0.0/24"): 5}
    six = ('{"nftables": [{"set": {"elem": [{"elem": {"val": {"concat": ["2001:db8:0:1::", 80]}'
           ', "counter": {"packets": 7}}}]}}]}')
    assert parse_set(six, 64) == {(80, "2001:db8:0:1::/64"): 7}


@pytest.mark.needs_root
def test_counts_every_syn_per_prefix_and_port_in_a_namespace() -> None:
    port = lab_port()
    with lab() as the_lab:
        acct = SynAccounting(the_lab.server_ns)
        acct.setup()
        acct.setup()  # idempotent: the chain is flushed and refilled, elements survive
        chain = run(["nft", "list", "chain", "inet", "synwatch", "account"],
                    netns=the_lab.server_ns)
        assert chain.count("update @syn") == 2
        the_lab.listen(port, backlog=8)  # cookies hide most of these from the socket table
        sources = ([f"{SPOOF_NET}.1.{i % 250 + 1}" for i in range(300)]
                   + [f"{SPOOF_NET}.2.{i % 250 + 1}" for i in range(200)])
        the_lab.flood(port, len(sources), sources)
        counted = acct.read()
        assert counted[(port, f"{SPOOF_NET}.1.0/24")] == 300
        assert counted[(port, f"{SPOOF_NET}.2.0/24")] == 200
        acct.teardown()
        acct.teardown()  # nothing left to remove is not an error
        ruleset = run(["nft", "list", "table", "inet", "synwatch"], netns=the_lab.server_ns)
        assert "account" not in ruleset and "syn4" not in ruleset


@pytest.mark.parametrize(("toml", "euid", "nft", "off"), [
    ("", 0, True, "actions are a dry run"),  # the default: a dry run changes no firewall
    ("[actions]\ndry_run = false\n", 0, True, None),
    ("[actions]\ndry_run = false\n", 1000, True, "not root"),
    ("[actions]\ndry_run = false\n", 0, False, "nft is not installed"),
    ("[incident]\naccounting = false\n[actions]\ndry_run = false\n", 0, True,
     "incident.accounting = false"),
    ("[incident]\naccounting = true\n", 1000, False, None),  # asked for: tried, and said
])
def test_whether_the_accounting_set_runs_and_why_not(toml: str, euid: int, nft: bool,
                                                     off: str | None) -> None:
    from synwatch.config import parse_config
    from synwatch.probes import accounting_off, sampler_off

    config = parse_config(toml, "t")
    assert accounting_off(config, euid=euid, nft=nft) == off
    assert sampler_off(config) is None
    assert sampler_off(parse_config("[incident]\nsampler = false\n", "t")) == \
        "incident.sampler = false"
