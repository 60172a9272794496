"""Whether a ban is enforced (synwatch/actions/banproof.py), without a kernel: a firewall's listing
against the history's active bans (prefixes compared as networks, lengths, time left), what the
reconcile keeps of its check and how `bans list` reads it back through both SQL paths. The
kernel itself is in tests/test_firewall_lab.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from synwatch.actions.banproof import CHECK, UNENFORCED, Check, compare, drift_count, enforced
from synwatch.actions.presets import load_presets
from synwatch.config import parse_config
from synwatch.errors import ConfigError
from synwatch.records import Ban
from synwatch.store import History

NOW = datetime(2026, 11, 20, 10, 0, 0, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)
# `nft -j list set` of bannet6 holding the history's ::ffff:0:0/96 (nft 1.0.6, real output)
MAPPED = ('{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", '
          '"json_schema_version": 1}}, {"set": {"family": "inet", "name": "bannet6", "table": '
          '"synwatch", "type": "ipv6_addr", "handle": 2, "flags": ["interval", "timeout"], '
          '"elem": [{"elem": {"val": {"prefix": {"addr": "::ffff:0.0.0.0", "len": 96}}, '
          '"timeout": 3600, "expires": 3599, "counter": {"packets": 0, "bytes": 0}}}], '
          '"stmt": [{"counter": null}]}}]}')


def ban(prefix: str, left: timedelta = HOUR, **kw: object) -> Ban:
    base: dict[str, object] = dict(backend="nftables", netns="ns", incident_id=3,
                                   created_at=NOW - timedelta(minutes=1), expires_at=NOW + left,
                                   id=1, host="web1")
    base.update(kw)
    return Ban(prefix=prefix, **base)  # type: ignore[arg-type]


def test_a_v4_mapped_prefix_is_the_one_nft_lists() -> None:
    """issue 26: the history writes ::ffff:0:0/96 and nft lists ::ffff:0.0.0.0/96; compared as
    strings, the reconcile removed and restored it at every pass."""
    have = load_presets()["nftables"].parse_list(MAPPED, 6, 64)
    assert have == {"::ffff:0:0/96": 3599}
    seen = compare([ban("::ffff:0:0/96")], have, NOW, kernel_timeouts=True, tolerance=5)
    assert (seen.drifted, seen.stale) == ((), ())
    assert [b.prefix for b in seen.enforced] == ["::ffff:0:0/96"]


def test_every_kind_of_drift_is_found_and_nothing_else() -> None:
    bans = [ban("10.0.1.0/24", id=1), ban("10.0.2.0/24", id=2), ban("10.0.3.0/24", id=3),
            ban("10.0.4.0/24", id=4), ban("10.0.5.0/24", timedelta(seconds=3), id=5),
            ban("2001:db8::/64", id=6)]
    have: dict[str, int | None] = {
        "10.0.1.0/24": 3598,  # as the history says, within the tolerance
        "10.0.2.0/24": 30,  # a shortened timeout
        "10.0.3.0/32": 3600,  # the .0 address only, not the /24
        # 10.0.4.0/24 deleted by hand; 10.0.5.0/24 gone a moment early: left to end
        "2001:db8:0:0::/64": 3601,  # another spelling
        "192.0.2.0/24": 100,  # no active ban wants it
    }
    seen = compare(bans, have, NOW, kernel_timeouts=True, tolerance=5)
    assert {d.ban.id: d.why for d in seen.drifted} == {
        2: "times out in 30 s, the history in 3600 s",
        3: "held as 10.0.3.0/32 instead",
        4: "missing from the kernel"}
    assert seen.stale == ("10.0.3.0/32", "192.0.2.0/24")
    assert sorted(b.id or 0 for b in seen.enforced) == [1, 5, 6]
    # ufw keeps no timeouts: presence is all there is to prove
    ufw = compare(bans[:2], {"10.0.1.0/24": None, "10.0.2.0/24": None}, NOW,
                  kernel_timeouts=False, tolerance=5)
    assert ufw.drifted == () and len(ufw.enforced) == 2


def test_enforced_means_checked_after_it_was_made_and_not_found_wanting() -> None:
    b = ban("10.0.1.0/24", id=7)
    check = {("web1", "ns", CHECK): Check(NOW, "nftables", 2, NOW).encode()}
    assert enforced(b, check, NOW)
    assert not enforced(b, {**check, ("web1", "ns", f"{UNENFORCED}7"): "missing"}, NOW)
    assert not enforced(ban("10.0.1.0/24", created_at=NOW + timedelta(seconds=1)), check, NOW)
    assert not enforced(ban("10.0.1.0/24", backend="ufw"), check, NOW)
    assert not enforced(ban("10.0.1.0/24", removed_at=NOW), check, NOW)
    assert not enforced(b, check, NOW + 2 * HOUR)  # expired
    assert not enforced(b, {}, NOW)  # never checked
    assert drift_count(check, "web1", "ns") == (2, NOW)
    assert drift_count(check, "web1", "") == (0, None)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_the_check_reads_back_alike_through_both_sql_paths(tmp_path: Path, kind: str,
                                                           request: pytest.FixtureRequest) -> None:
    """What the service writes of its checks, `bans list` reads back, on both databases."""
    url = (f"sqlite:///{tmp_path}/h.db" if kind == "sqlite"
           else request.getfixturevalue("pg_url"))
    store = History.open(url, host="web1")
    service = History.open(url, host="web1", bounded=True)
    other = History.open(url, host="web2")
    service.save_setting("ns", CHECK, Check(NOW, "nftables", 1, NOW).encode(), NOW)
    service.save_setting("ns", f"{UNENFORCED}4", "missing from the kernel", NOW)
    service.save_setting("ns", "net.ipv4.tcp_syncookies", "0", NOW)  # not the bans'
    other.save_setting("", CHECK, Check(NOW, "ufw").encode(), NOW)
    reader = History.open(url, host="web1", write=False)
    for host in ("web1", None):
        assert reader.ban_checks(host=host) == store.ban_checks(host=host)
    assert reader.ban_checks(host="web2") == {("web2", "", CHECK): Check(NOW, "ufw").encode()}
    assert set(store.ban_checks(host="web1")) == {("web1", "ns", CHECK),
                                                  ("web1", "ns", f"{UNENFORCED}4")}
    assert len(store.ban_checks()) == 3
    reader.close()


def test_the_reconcile_period_is_a_setting() -> None:
    assert parse_config("", "t").ban.reconcile == 60
    assert parse_config('[actions.ban]\nreconcile = "2s"\n', "t").ban.reconcile == 2
    for bad in ('"0.5s"', '"2h"', "60"):
        with pytest.raises(ConfigError, match=r"actions\.ban\.reconcile"):
            parse_config(f"[actions.ban]\nreconcile = {bad}\n", "t")
