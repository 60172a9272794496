"""Every ban backend applied for real inside a namespace the test makes: the setup is idempotent,
a banned /24 really drops SYNs (no request socket is made for it) while its neighbour still gets
through, listing reads back what is banned with its time left, and an unban lets it in again.
And the bans proven where they act: a real `synwatch run` puts back every kind of drift (an
element deleted, a shorter timeout, another prefix length, a flushed ruleset, a ufw rule
removed) within one reconcile, warns once and counts it."""

from __future__ import annotations

import json
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from synwatch.actions.firewall import BanItem, Firewall
from synwatch.actions.presets import load_presets
from synwatch.probes.snapshot import take
from synwatch.records import Ban
from synwatch.store import History
from tests.support import REPO
from tests.support.cli import synwatch
from tests.support.harness import Service
from tests.support.lab import SPOOF_NET, Lab, lab, lab_port, sh
from tests.support.unitjail import confined
from tests.support.wait import eventually

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
    # each ban names its incident where the admin looks
    shown = {"nftables": ("nft", "list", "set", "inet", "synwatch", "bannet4"),
             "ufw": ("ufw", "status"), "iptables-ipset": ("ipset", "save", "synwatch-ban4")}
    assert "synwatch incident 1" in the_lab.in_server(*shown[backend]).stdout
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


def test_an_ipset_set_made_without_comments_is_made_again_with_them(the_lab: Lab) -> None:
    """Sets made before bans named their incident cannot take a comment, and ipset cannot give
    them one: the setup swaps in sets with comments under the same rule (the reconcile after a
    start puts the bans back), once."""
    for argv in (("ipset", "create", "synwatch-ban4", "hash:net", "family", "inet", "timeout",
                  "0"),
                 ("ipset", "add", "synwatch-ban4", BANNED, "timeout", "600"),
                 ("iptables", "-I", "INPUT", "-m", "set", "--match-set", "synwatch-ban4", "src",
                  "-j", "DROP")):
        the_lab.in_server(*argv)
    fw = Firewall(load_presets()["iptables-ipset"], the_lab.server_ns)
    fw.apply(fw.render_setup())
    assert fw.listed() == {}  # the old entries went with the old set (the reconcile's to redo)
    fw.apply(fw.render_ban([BanItem(BANNED, 60, "synwatch incident 3")]))
    fw.apply(fw.render_setup())  # finds the new sets and leaves them, entries and all
    assert set(fw.listed()) == {BANNED}
    saved = the_lab.in_server("ipset", "save", "synwatch-ban4").stdout
    assert " comment " in saved.splitlines()[0], saved  # the set's header
    assert f'add synwatch-ban4 {BANNED} timeout' in saved and '"synwatch incident 3"' in saved
    assert iptables_rules(the_lab).count("--match-set synwatch-ban4 src -j DROP") == 1
    assert set(fw.listed()) == {BANNED}


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


# -- bans proven in the kernel (issue 20, item 6) -------------------------------------------------

RECONCILE = 2.0  # actions.ban.reconcile in these tests (60 s by default; 1 s is the least)
TWO, SIX, MAPPED = f"{SPOOF_NET}.2.0/24", "2001:db8:7::/64", "::ffff:0:0/96"
DRIFT = "not enforced by {} in the kernel"  # the one warning of a reconcile that found drift


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proven:
    """A real `synwatch run` (actions on) in the lab's namespace whose history and firewall
    start out holding ``prefixes`` as active bans of ``backend``, reconciled every
    ``reconcile`` seconds."""

    def __init__(self, the_lab: Lab, tmp_path: Path, backend: str, prefixes: list[str],
                 reconcile: float = RECONCILE) -> None:
        self.backend, self.db, self.reconcile = backend, tmp_path / "h.db", reconcile
        store = History.open(f"sqlite:///{self.db}")
        now = datetime.now(timezone.utc)
        store.add_bans([Ban(prefix=p, backend=backend, netns=the_lab.server_ns, incident_id=None,
                            created_at=now, expires_at=now + timedelta(hours=1))
                        for p in prefixes])
        store.close()
        fw = Firewall(load_presets()[backend], the_lab.server_ns)
        fw.apply(fw.render_setup() + fw.render_ban([BanItem(p, 3600) for p in prefixes]))
        self.metrics = _free_port()
        self.service = Service(the_lab, tmp_path, dry_run=False, quiet="60s", extra=(
            f'[actions.ban]\nbackend = "{backend}"\nreconcile = "{reconcile:.0f}s"\n'
            f'[metrics]\nlisten = "127.0.0.1:{self.metrics}"\n'))
        self.wait_checked()  # the start's reconcile found every ban as the history has it
        assert self.enforced() == dict.fromkeys(prefixes, True)
        assert self.warnings() == 0

    def log(self) -> str:
        return self.service.log.read_text()

    def warnings(self) -> int:
        return self.log().count(DRIFT.format(self.backend))

    def repairs(self) -> int:
        return self.log().count(f"action ban {self.backend} reconcile (synwatch)")

    def checked_at(self) -> datetime | None:
        conn = sqlite3.connect(self.db)
        try:
            rows = conn.execute("SELECT value FROM saved_settings WHERE name = 'ban.check'")
            found = [json.loads(v) for (v,) in rows]
        finally:
            conn.close()
        return datetime.fromisoformat(found[0]["at"]) if found else None

    def wait_checked(self, after: datetime | None = None) -> None:
        """Until a reconcile that listed the firewall after ``after`` has kept its outcome:
        the positive marker before asserting that it found nothing more."""
        since = after or datetime.min.replace(tzinfo=timezone.utc)
        eventually(lambda: (self.checked_at() or since) > since, "a later check",
                 timeout=3 * self.reconcile + 10)

    def enforced(self) -> dict[str, bool]:
        r = synwatch("bans", "list", "--format", "json", "--config", str(self.service.config))
        assert r.code == 0, r.err
        return {b["prefix"]: b["enforced"] for b in json.loads(r.out) if b["active"]}

    def drift_total(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics",
                                    timeout=10) as page:
            text = page.read().decode()
        series = f'synwatch_bans_drift_total{{backend="{self.backend}"}} '
        found = re.search(rf"^{re.escape(series)}(\S+)$", text, re.MULTILINE)
        assert found, text
        return float(found.group(1))

    def drift(self, make: Callable[[], object], repaired: Callable[[], bool],
              drifted: int = 1) -> str:
        """Make a drift, see it repaired within one reconcile, logged once, counted; returns
        the warning."""
        warned, repairs, counted = self.warnings(), self.repairs(), self.drift_total()
        started = time.monotonic()
        make()
        eventually(repaired, "the repair", timeout=self.reconcile + 10)
        took = time.monotonic() - started
        # a reconcile is due every `reconcile` s; a loaded machine gets a little more
        assert took < self.reconcile + 4, f"repaired after {took:.1f} s"
        self.wait_checked(after=datetime.now(timezone.utc) + timedelta(seconds=1))
        assert (self.warnings(), self.repairs()) == (warned + 1, repairs + 1), self.log()
        assert self.drift_total() == counted + drifted
        assert all(self.enforced().values()), self.enforced()
        return self.log().split(DRIFT.format(self.backend))[-1].splitlines()[0]


def nft_held(the_lab: Lab) -> dict[str, int]:
    """Our nft elements as `nft -j` lists them: prefix -> seconds left."""
    found: dict[str, int] = {}
    for family in ("bannet4", "bannet6"):
        listed = sh("ip", "netns", "exec", the_lab.server_ns, "nft", "-j", "list", "set",
                    "inet", "synwatch", family, check=False)
        if listed.returncode != 0:
            continue
        for item in json.loads(listed.stdout)["nftables"]:
            for e in item.get("set", {}).get("elem", []):
                val = e["elem"]["val"]
                key = (f"{val['prefix']['addr']}/{val['prefix']['len']}"
                       if isinstance(val, dict) else val)
                found[key] = e["elem"]["expires"]
    return found


def nft(the_lab: Lab, script: str) -> None:
    sh("ip", "netns", "exec", the_lab.server_ns, "sh", "-c", f"nft -f - <<'EOF'\n{script}\nEOF")


def test_every_kind_of_nftables_drift_is_repaired_within_one_reconcile(the_lab: Lab,
                                                                        tmp_path: Path) -> None:
    """An element deleted by hand, a shortened timeout, the /24 held as its .0 address, a
    flushed ruleset: each is put back by the next reconcile, logged once as a WARNING, counted
    in synwatch_bans_drift_total, and `bans list` says enforced. A repair that cannot be done
    (a set of ours of the wrong type) leaves `enforced: false` and is not warned again at every
    reconcile; the v4-mapped ::ffff:0:0/96 (listed by nft as ::ffff:0.0.0.0/96) is never
    touched (issue 26: removed and restored at every reconcile).

    Reconciled every second (the least the setting takes): listing an nft set is cheap, and
    every wait below is one or a few reconciles, so the test takes about half the time of a
    2 s reconcile; "within one reconcile" and "not warned again" mean the same at either."""
    run = Proven(the_lab, tmp_path, "nftables", [BANNED, TWO, SIX, MAPPED], reconcile=1.0)
    try:
        assert set(nft_held(the_lab)) == {BANNED, TWO, SIX, "::ffff:0.0.0.0/96"}

        def back_in_full(prefix: str) -> bool:
            return nft_held(the_lab).get(prefix, 0) > 3500

        delete = "delete element inet synwatch bannet4 {{ {} }}\n"
        add = "add element inet synwatch bannet4 {{ {} timeout {} }}\n"
        why = run.drift(lambda: nft(the_lab, delete.format(BANNED)),
                        lambda: back_in_full(BANNED))
        assert f"{BANNED} missing from the kernel" in why
        why = run.drift(lambda: nft(the_lab, delete.format(TWO) + add.format(TWO, "30s")),
                        lambda: back_in_full(TWO))
        assert f"{TWO} times out in " in why
        dot_zero = BANNED.split("/", maxsplit=1)[0]
        why = run.drift(lambda: nft(the_lab, delete.format(BANNED) + add.format(dot_zero, "1h")),
                        lambda: back_in_full(BANNED) and dot_zero not in nft_held(the_lab))
        assert f"held as {dot_zero}/32 instead" in why
        why = run.drift(lambda: the_lab.in_server("nft", "flush", "ruleset"),
                        lambda: len(nft_held(the_lab)) == 4, drifted=4)
        assert all(p in why for p in (BANNED, TWO, SIX, MAPPED)), why
        chain = the_lab.in_server("nft", "list", "chain", "inet", "synwatch", "ban").stdout
        assert chain.count("drop") == 2, "the table came back with its rules"
        assert run.service.proc.poll() is None

        # a repair that fails: the check says so, warned once however often it is retried
        warned, failed = run.warnings(), run.log().count("action ban nftables reconcile failed")
        nft(the_lab, "flush ruleset\nadd table inet synwatch\n"
                     "add set inet synwatch bannet4 { type ipv6_addr; }")
        eventually(lambda: run.log().count(
            "action ban nftables reconcile failed") >= failed + 2, "two failed repairs",
            timeout=3 * run.reconcile + 10)
        run.wait_checked(after=datetime.now(timezone.utc))
        assert run.enforced() == dict.fromkeys([BANNED, TWO, SIX, MAPPED], False)
        assert run.warnings() == warned + 1
        status = json.loads(synwatch("status", "--format", "json", "--config",
                                     str(run.service.config)).out)
        assert status["bans_drift"] == 11 and run.drift_total() == 11
        assert "4 bans (11 drifts repaired)" in status["summary"], status["summary"]
        text = synwatch("status", "--config", str(run.service.config)).out
        assert "ban drift: 11 repaired, the last at " in text, text
        the_lab.in_server("nft", "delete", "table", "inet", "synwatch")  # the admin's fix
        eventually(lambda: len(nft_held(the_lab)) == 4, "the bans back",
                 timeout=run.reconcile + 10)
        run.wait_checked(after=datetime.now(timezone.utc) + timedelta(seconds=1))
        assert all(run.enforced().values())
        assert run.warnings() == warned + 1, "the same drift is not warned again"
    finally:
        run.service.stop()


@pytest.mark.parametrize("backend", ["ufw", "iptables-ipset"])
def test_ufw_and_ipset_drift_is_repaired_within_one_reconcile(the_lab: Lab, tmp_path: Path,
                                                               backend: str) -> None:
    """A ufw rule removed by hand; an ipset element deleted, or re-added with a shorter
    timeout: each put back by the next reconcile, logged once, counted."""
    if backend == "ufw":
        the_lab.in_server("ufw", "default", "allow", "incoming")
        the_lab.in_server("ufw", "--force", "enable")
    run = Proven(the_lab, tmp_path, backend, [BANNED, SIX])
    try:
        if backend == "ufw":
            def ours() -> str:
                return "\n".join(line for line in the_lab.in_server("ufw", "status")
                                 .stdout.splitlines() if "# synwatch" in line)

            assert BANNED in ours() and SIX in ours()
            why = run.drift(lambda: the_lab.in_server("ufw", "delete", "deny", "from", BANNED),
                            lambda: BANNED in ours())
            assert "missing from the kernel" in why
            return

        def left(prefix: str) -> int:
            saved = the_lab.in_server("ipset", "save", "synwatch-ban4").stdout
            found = re.search(rf"^add \S+ {re.escape(prefix)} timeout (\d+)\b", saved,
                              re.MULTILINE)
            return int(found.group(1)) if found else 0

        run.drift(lambda: the_lab.in_server("ipset", "del", "synwatch-ban4", BANNED),
                  lambda: left(BANNED) > 3500)
        why = run.drift(lambda: the_lab.in_server("ipset", "add", "synwatch-ban4", BANNED,
                                                  "timeout", "30", "-exist"),
                        lambda: left(BANNED) > 3500)
        assert "times out in " in why
    finally:
        run.service.stop()
