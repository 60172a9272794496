"""Which networks a ban takes (synwatch.detect.bantargets), on the cases the lab measures: pure."""

from __future__ import annotations

from synwatch.detect.bantargets import TargetPlan, plan_targets

RULES: dict[str, float] = {"v4_len": 24, "v6_len": 64, "widest_v4": 16, "widest_v6": 48,
                           "floor": 0.05, "coverage": 0.95}


def _plan(flood: dict[str, int], completed: dict[str, int], **kw: float) -> TargetPlan:
    rules = {**RULES, **kw}
    return plan_targets(flood, sum(flood.values()), completed, v4_len=int(rules["v4_len"]),
                        v6_len=int(rules["v6_len"]), widest_v4=int(rules["widest_v4"]),
                        widest_v6=int(rules["widest_v6"]), floor=rules["floor"],
                        coverage=rules["coverage"])


def test_real_clients_beside_a_flood_are_never_in_its_ban() -> None:
    flood = {f"10.98.7.{i}": 20 for i in range(1, 255)}
    flood |= {f"10.99.30.{i}": 8 for i in range(1, 21)}  # the clients' SYNs: 3%
    plan = _plan(flood, {f"10.99.30.{i}/32": 30 for i in range(1, 21)})
    assert [t.prefix for t in plan.ban] == ["10.98.7.0/24"]
    assert plan.limit == ()


def test_flooding_addresses_inside_a_clients_prefix_are_banned_as_their_own_block() -> None:
    flood = {f"10.98.9.{i}": 800 for i in range(1, 7)}
    flood |= {f"10.98.9.{i}": 2 for i in range(100, 120)}
    plan = _plan(flood, {f"10.98.9.{i}/32": 15 for i in range(100, 120)})
    [target] = plan.ban
    assert target.prefix == "10.98.9.0/29"
    assert target.why == ("10.98.9.0/29: 6 addresses, 99% of the SYNs, no handshake completed; "
                          "the rest of 10.98.9.0/24 completed 300 (ACKs and connections seen): "
                          "not banned")


def test_a_one_address_flood_is_that_address_in_both_families() -> None:
    for flood, want in (({"10.98.5.5": 5000}, "10.98.5.5/32"),
                        ({"fd98:77::5": 5000, "fd98:77::9": 3}, "fd98:77::5/128")):
        plan = _plan(flood, {"fd98:77::9/128": 5})
        assert [t.prefix for t in plan.ban] == [want]


def test_whole_prefixes_that_fill_a_block_are_that_block_unless_a_client_is_in_it() -> None:
    flood = {f"10.98.{j}.{i}": 3 for j in (4, 5, 6, 7) for i in range(1, 255)}
    assert [t.prefix for t in _plan(flood, {}).ban] == ["10.98.4.0/22"]
    narrow = _plan(flood, {}, widest_v4=23)
    assert [t.prefix for t in narrow.ban] == ["10.98.4.0/23", "10.98.6.0/23"]
    # a client at 10.98.6.200 keeps the /22 (and its own /24) out of it
    flood.pop("10.98.6.200")
    split = _plan(flood, {"10.98.6.200/32": 4})
    prefixes = [t.prefix for t in split.ban]
    assert "10.98.4.0/22" not in prefixes and "10.98.6.0/24" not in prefixes
    assert {"10.98.4.0/24", "10.98.5.0/24", "10.98.7.0/24"} <= set(prefixes) or \
        "10.98.4.0/23" in prefixes


def test_an_address_that_floods_and_completes_is_rate_limited_never_banned() -> None:
    plan = _plan({"10.98.5.5": 5000, "10.98.6.1": 50}, {"10.98.5.5/32": 40})
    assert plan.ban == ()
    assert [t.prefix for t in plan.limit] == ["10.98.5.5/32"]
    assert "under the 5% a ban needs on its own" in plan.spared[0]


def test_a_block_needs_a_real_share_and_the_bans_stop_at_the_coverage() -> None:
    flood = {"10.1.1.1": 900, "10.2.2.2": 60, "10.3.3.3": 40}
    plan = _plan(flood, {})
    assert [t.prefix for t in plan.ban] == ["10.1.1.1/32", "10.2.2.2/32"]
    assert plan.covered == 0.96
    assert [t.prefix for t in _plan(flood, {}, coverage=0.5).ban] == ["10.1.1.1/32"]


def test_prefix_level_evidence_with_a_client_in_the_prefix_bans_nothing_there() -> None:
    plan = _plan({"10.98.5.0/24": 5000, "10.98.6.0/24": 4000}, {"10.98.5.77/32": 3})
    assert [t.prefix for t in plan.ban] == ["10.98.6.0/24"]


def test_a_client_seen_only_in_the_socket_table_is_spared_by_the_verdict() -> None:
    """The sampler keeps 1 in N ACKs and may miss a client; its connections in the socket table
    (inet_diag) are enough to keep it out of a ban."""
    from synwatch.config import Thresholds
    from synwatch.detect.tally import Tally
    from synwatch.detect.verdict import targets

    t = Tally(port=80, sampled_addr={**{f"10.98.9.{i}": 800 for i in range(1, 7)},
                                     "10.98.9.200": 40},
              sampled_syns=4840, connected={"10.98.9.200/32": 3})
    plan = targets(t, Thresholds())
    assert [x.prefix for x in plan.ban] == ["10.98.9.0/29"]
    # without it the /24 is the narrowest common block of all seven
    assert [x.prefix for x in targets(Tally(port=80, sampled_addr=t.sampled_addr,
                                            sampled_syns=4840), Thresholds()).ban] == \
        ["10.98.9.0/24"]


def test_a_phase_keeps_who_completed_before_it() -> None:
    """A client seen completing in an earlier phase, idle since, is never in a later phase's
    ban (a flood at .1 and .254 of a shared-hosting /24, a client at .50)."""
    from synwatch.config import Thresholds
    from synwatch.detect.tally import Tally
    from synwatch.detect.verdict import targets

    earlier = Tally(port=80, completed={"10.98.9.50/32": 12}, sampler_on=True)
    now = Tally(port=80, sampled_addr={"10.98.9.1": 900, "10.98.9.254": 900},
                sampled_n=400, sampled_syns=1800, sampler_on=True)
    assert [x.prefix for x in targets(now, Thresholds()).ban] == ["10.98.9.0/24"]
    now.keep_peaks(earlier)
    assert "10.98.9.0/24" not in [x.prefix for x in targets(now, Thresholds()).ban]


def test_an_overflow_the_sampler_did_not_see_bans_nothing() -> None:
    """A local user floods over lo (the counters move, the sampler skips lo) while real
    clients come from outside: the sample holds only them, and must not make them a target."""
    from synwatch.config import Thresholds
    from synwatch.detect.tally import Tally
    from synwatch.detect.verdict import targets

    t = Tally(port=80, sampled_addr={"10.98.9.7": 60}, sampled_n=60, sampled_syns=60,
              sampler_on=True, overflow_watched=5000, syns_overflowed=5000)
    plan = targets(t, Thresholds())
    assert plan.ban == () and plan.limit == ()
    assert "this host itself" in plan.spared[0]


def test_completing_sources_stay_bounded_and_are_never_forgotten() -> None:
    from synwatch.detect.delta import MAX_PREFIXES, add_completed

    counts: dict[str, int] = {}
    for round_ in range(4):
        counts = add_completed(counts, ((f"fd{round_:02x}:{i:x}::{i:x}/128", 1)
                                        for i in range(3000)))
    assert len(counts) <= MAX_PREFIXES
    assert sum(counts.values()) == 12000  # folded into wider blocks, never dropped


def test_a_prefix_with_an_ipv6_scope_never_reaches_a_firewall_command() -> None:
    """ipaddress takes "2001:db8::1%<text>/128" and keeps the text: a fleet row so written is
    refused, and a ban item renders from the numbers."""
    from synwatch.actions.firewall import BanItem
    from synwatch.actions.fleetcopy import is_plain_prefix

    hostile = "2001:db8::1%}\nflush ruleset\n/128"
    assert not is_plain_prefix(hostile)
    assert not is_plain_prefix("10.0.0.1/24") and is_plain_prefix("10.0.0.0/24")
    assert BanItem(hostile, 5).fields()["prefix"] == "2001:db8::1/128"
