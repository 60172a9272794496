"""Two synwatch nodes sharing one real PostgreSQL history (tests/support/pgcluster.py), the
two-node tests through a real pgbouncer in transaction mode (tests/support/pgbouncer.py), each
watching and acting on its own network namespace (its own server, clients and nftables), as two
web servers behind a load balancer.

- A concentrated flood against one node is banned in both nodes' nftables (a fleet ban, read
  from the fleet's changes); each node keeps its own allowlist.
- `unban` on the other node lifts it on both.
- `incidents list --all-hosts` shows both nodes' incidents.
- Stopping PostgreSQL during a flood loses no event: every kernel line is in the history once
  the server is back, exactly once, and the node never stopped detecting.
- Stopping the pooler during a flood, with a node joining the fleet while it is away: both go on,
  and once it is back the late node holds every fleet ban, the one decided meanwhile too.
"""

from __future__ import annotations

import itertools
import json
import socket
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from synwatch.actions.fleetcopy import BATCH
from synwatch.store.writes import FLEET_LOCK
from tests.support.cli import synwatch
from tests.support.harness import Service
from tests.support.lab import SPOOF_NET, Kmsg, Lab, banned_in_nft, flood_from, lab, lab_port
from tests.support.pgbouncer import Pooler
from tests.support.pgcluster import Cluster
from tests.support.wait import eventually

pytestmark = pytest.mark.needs_root
# every other /24: none fills a /23 with another, so each is banned as itself
ONE, TWO, THREE, FOUR = (f"{SPOOF_NET}.{n}.0/24" for n in (21, 23, 25, 27))


@pytest.fixture
def two_labs() -> Iterator[tuple[Lab, Lab]]:
    with ExitStack() as stack:
        made = []
        for _ in range(2):
            the_lab = stack.enter_context(lab())
            the_lab.sysctl("net.ipv4.tcp_synack_retries", 1)
            made.append(the_lab)
        yield made[0], made[1]


def node(the_lab: Lab, tmp_path: Path, url: str, host: str, extra: str = "") -> Service:
    return Service(the_lab, tmp_path / host, dry_run=False, storage=textwrap.dedent(f"""\
        url = "{url}"
        host = "{host}"
        state_dir = "{tmp_path / host}"
        """), extra=textwrap.dedent("""
        [actions.ban]
        scope = "fleet"
        """) + extra)


def listed(service: Service, *args: str) -> list[dict[str, Any]]:
    r = synwatch(*args, "--format", "json", "--config", str(service.config))
    assert r.code == 0, r.err
    found: list[dict[str, Any]] = json.loads(r.out)
    return found


@pytest.fixture
def pooled_url(pg: Cluster) -> Iterator[tuple[Pooler, str]]:
    """A new database of the session's server, reached through a pooler of its own."""
    if not pg.running:
        pg.start()
    pooler = Pooler(pg, pool_size=4).start()
    try:
        yield pooler, pooler.url(pg.new_database_name())
    finally:
        pooler.destroy()


def test_a_ban_on_one_node_is_a_ban_on_both_and_unban_lifts_both(
        two_labs: tuple[Lab, Lab], tmp_path: Path, pooled_url: tuple[Pooler, str]) -> None:
    lab_a, lab_b = two_labs
    pooler, pg_url = pooled_url
    a = node(lab_a, tmp_path, pg_url, "node-a")
    b = node(lab_b, tmp_path, pg_url, "node-b", extra=textwrap.dedent(f"""
        [allowlist]
        networks = ["{THREE}"]
        """))
    try:
        port_a, port_b = lab_port(), lab_port()
        lab_a.listen(port_a, backlog=64)
        lab_b.listen(port_b, backlog=64)
        flood_from(lab_a, port_a, [ONE, TWO, THREE], each=700)
        # node-a bans all three; node-b copies two: THREE is on its own allowlist
        eventually(lambda: set(banned_in_nft(lab_a)) == {ONE, TWO, THREE}, "node-a's bans")
        eventually(lambda: set(banned_in_nft(lab_b)) == {ONE, TWO},
                   "node-a's bans copied by node-b")
        b.wait_log(f"({THREE}) not copied: allowlisted ({THREE})")
        for n in (a, b):  # the pooler takes no startup options: its own timeouts hold
            n.wait_log("is a pooler that takes no startup options: statement timeout 5s")
        # and the other way round: a flood against node-b is banned on node-a too
        flood_from(lab_b, port_b, [FOUR], each=800)
        eventually(lambda: FOUR in banned_in_nft(lab_a), "node-b's ban copied by node-a")
        assert set(banned_in_nft(lab_b)) == {ONE, TWO, FOUR}

        rows = listed(a, "bans", "list", "--all-hosts")
        held = {(r["host"], r["prefix"]) for r in rows if r["active"]}
        assert held == {("node-a", ONE), ("node-a", TWO), ("node-a", THREE), ("node-a", FOUR),
                        ("node-b", ONE), ("node-b", TWO), ("node-b", FOUR)}
        assert {r["scope"] for r in rows} == {"fleet"}
        assert {(r["host"], r["prefix"]) for r in listed(b, "bans", "list")} == {
            ("node-b", p) for p in (ONE, TWO, FOUR)}  # THREE: refused, counted, not stored
        # node-b records what it did for node-a's incident
        [inc_a] = [i for i in listed(b, "incidents", "list", "--all-hosts")
                   if i["host"] == "node-a"]
        assert ("ban", ONE, "done") in {(x["action"], x["target"], x["status"])
                                        for x in inc_a["actions"]}
        hosts = {i["host"]: i["port"] for i in listed(a, "incidents", "list", "--all-hosts")}
        assert hosts == {"node-a": port_a, "node-b": port_b}
        assert [i["host"] for i in listed(a, "incidents", "list")] == ["node-a"]

        # an unban on node-b lifts node-a's ban of ONE in both firewalls
        r = synwatch("unban", ONE, "--config", str(b.config))
        assert r.code == 0, r.err
        assert set(banned_in_nft(lab_b)) == {TWO, FOUR}
        eventually(lambda: set(banned_in_nft(lab_a)) == {TWO, THREE, FOUR}, "node-a to lift ONE")
        assert not any(r["active"] for r in listed(a, "bans", "list", "--all-hosts")
                       if r["prefix"] == ONE)
        status = json.loads(synwatch("status", "--format", "json", "--config",
                                     str(a.config)).out)
        assert status["running"] and status["host"] == "node-a"
        assert {h["host"] for h in status["hosts"] if h["recent"]} == {"node-a", "node-b"}
        # two services, each with its CLI calls, on at most the pool's server connections
        assert 1 <= pooler.server_connections(pg_url.split("@/")[1].split("?")[0]) <= 4
    finally:
        a.stop()
        b.stop()


def test_a_pooler_away_during_a_flood_and_a_node_joining_meanwhile_lose_no_fleet_ban(
        two_labs: tuple[Lab, Lab], tmp_path: Path, pooled_url: tuple[Pooler, str]) -> None:
    """node-a bans a flood; the pooler stops; node-a bans a second flood on its own (spooled),
    and node-b starts, with no history to read. Once the pooler is back, node-a's spool reaches
    the history and node-b, catching up, holds both fleet bans; a third one, decided after,
    reaches it as a change."""
    lab_a, lab_b = two_labs
    pooler, url = pooled_url
    a = node(lab_a, tmp_path, url, "node-a")
    b: Service | None = None
    try:
        port = lab_port()
        lab_a.listen(port, backlog=64)
        flood_from(lab_a, port, [ONE], each=700)
        eventually(lambda: ONE in banned_in_nft(lab_a), "node-a's first ban")
        eventually(lambda: any(r["prefix"] == ONE for r in listed(a, "bans", "list")),
                   "the first ban in the history")
        pooler.stop()
        flood_from(lab_a, port, [TWO], each=700)
        eventually(lambda: TWO in banned_in_nft(lab_a), "a ban with the pooler away")
        a.wait_log("writes go to the spool")
        b = node(lab_b, tmp_path, url, "node-b")
        b.wait_log("starting on the spool")
        assert banned_in_nft(lab_b) == {}
        pooler.start()
        a.wait_log("recording directly again", timeout=30)
        eventually(lambda: set(banned_in_nft(lab_b)) == {ONE, TWO}, "node-b caught up",
                   timeout=30)
        flood_from(lab_a, port, [FOUR], each=700)
        eventually(lambda: FOUR in banned_in_nft(lab_b), "a later ban copied as a change")
        copies = [r for r in listed(b, "bans", "list") if r["active"]]
        assert sorted(r["prefix"] for r in copies) == sorted([ONE, TWO, FOUR])
        # node-b restarted knows its copies only from the history: an unban on node-a after
        # that is lifted from node-b's firewall all the same
        b.stop()
        b.start()
        b.wait_log("synwatch running")
        r = synwatch("unban", ONE, "--config", str(a.config))
        assert r.code == 0, r.err
        eventually(lambda: ONE not in banned_in_nft(lab_b), "the unban on the restarted node")
        assert set(banned_in_nft(lab_b)) == {TWO, FOUR}
        for n in (a, b):
            assert "Traceback" not in n.log.read_text()
    finally:
        a.stop()
        if b is not None:
            b.stop()


def kernel_lines(kmsg: Kmsg, ports: set[int], want: int) -> dict[int, int]:
    """How many SYN-flood lines the kernel printed for each of ``ports`` (read from /dev/kmsg
    as it printed them)."""
    seen: dict[int, int] = dict.fromkeys(ports, 0)

    def count(line: str) -> bool:
        for port in ports:
            if "Possible SYN flooding on port" in line and line.rstrip(". ").split(
                    "Sending cookies")[0].rstrip(". ").endswith(f":{port}"):
                seen[port] += 1
        return sum(seen.values()) >= want

    kmsg.records_until(count, timeout=20)
    return seen


def test_a_node_that_loses_the_database_keeps_acting_and_loses_no_event(
        the_lab_pg: tuple[Lab, Cluster], tmp_path: Path, pg_url: str) -> None:
    """PostgreSQL stops during a flood: the node keeps detecting and banning, spools what it
    must record, survives a restart while the database is away, and when it is back every
    kernel line is in the history exactly once, with the incident and its ban."""
    the_lab, pg = the_lab_pg
    kmsg = Kmsg()
    service = node(the_lab, tmp_path, pg_url, "node-a")
    ports = [lab_port() for _ in range(3)]
    try:
        for port in ports:
            the_lab.listen(port, backlog=64)
        the_lab.flood(ports[0], 300)
        eventually(lambda: listed(service, "events", "list"), "the first line recorded")
        pg.stop()
        # a concentrated flood while the database is gone: detected and banned all the same
        flood_from(the_lab, ports[1], [ONE], each=800)
        try:
            eventually(lambda: ONE in banned_in_nft(the_lab), "a ban without the database")
        except AssertionError as exc:  # what it decided, and why (the history is away)
            raise AssertionError(f"{exc}:\n{service.log.read_text()[-6000:]}") from exc
        service.wait_log("writes go to the spool")
        assert (tmp_path / "node-a" / "spool.jsonl").exists()
        # a restart while it is still gone: it starts on the spool and goes on
        service.stop()
        service.start()
        service.wait_log("starting on the spool")
        status = json.loads(synwatch("status", "--format", "json", "--config",
                                     str(service.config)).out)
        assert "history away" in status["summary"] and status["running"]
        the_lab.flood(ports[2], 300)
        printed = kernel_lines(kmsg, set(ports), want=3)
        service.wait_log(f":{ports[2]}", timeout=20)  # the line after the restart, read
        pg.start()
        service.wait_log("recording directly again", timeout=30)
        assert not (tmp_path / "node-a" / "spool.jsonl").exists()
        events = listed(service, "events", "list")
        recorded = {p: sum(1 for e in events if e["port"] == p and e["kind"] == "syn_flood")
                    for p in ports}
        assert recorded == printed == dict.fromkeys(ports, 1)
        incidents = {i["port"]: i for i in listed(service, "incidents", "list")}
        flooded = incidents[ports[1]]
        assert flooded["verdict"] == "concentrated"
        assert ("ban", ONE, "done") in {(a["action"], a["target"], a["status"])
                                        for a in flooded["actions"]}
        assert [(b["prefix"], b["incident_id"], b["active"])
                for b in listed(service, "bans", "list")] == [(ONE, flooded["id"], True)]
        assert all(e["incident_id"] == incidents[e["port"]]["id"] for e in events
                   if e["port"] in incidents)
    finally:
        kmsg.close()
        if not pg.running:
            pg.start()
        service.stop()


@pytest.fixture
def the_lab_pg(pg: Cluster) -> Iterator[tuple[Lab, Cluster]]:
    with lab() as made:
        made.sysctl("net.ipv4.tcp_synack_retries", 1)
        yield made, pg


WIDE = ["128.0.0.0/1", "2000::/3", "ff00::/8", "::ffff:0:0/96", "224.0.1.0/24",
        "169.254.7.0/24"]  # too wide, multicast, v4-mapped, link-local
GOOD, OTHER, UNNUMBERED = (f"{SPOOF_NET}.{n}.0/24" for n in (31, 33, 35))
BACKLOG, CAP = 10_000, 1_000


def hostile(pg: Cluster, url: str, sql: str, *, numbered: bool = True) -> None:
    """Rows written straight into the shared history, as any node (or anyone with its
    password) can, numbered as a node numbers its fleet bans (the next changes of the fleet),
    so the node reads them within a second; ``numbered=False``: as an older synwatch writes
    them, found when a node looks at every ban in force (at its start)."""
    with pg.connect(url.split("@/", 1)[1].split("?", maxsplit=1)[0]) as conn, \
            conn.transaction():
        [(before,)] = conn.execute("SELECT coalesce(max(id), 0) FROM bans").fetchall()
        conn.execute(sql)  # type: ignore[arg-type]
        if numbered:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [FLEET_LOCK])
            conn.execute("UPDATE bans SET fleet_seq = n.seq FROM (SELECT id, (SELECT "
                         "coalesce(max(fleet_seq), 0) FROM bans) + row_number() OVER "
                         "(ORDER BY id) AS seq FROM bans WHERE id > %s AND scope = 'fleet' "
                         "AND origin_id IS NULL) n WHERE bans.id = n.id", [before])


def probe_times(service: Service) -> list[datetime]:
    """When each probe ran, from the service's recording."""
    return [datetime.fromisoformat(json.loads(line)["now"])
            for line in service.recording.read_text().splitlines()
            if '"type":"evidence"' in line]


def test_hostile_fleet_rows_are_refused_and_a_backlog_never_blinds_the_node(
        the_lab_pg: tuple[Lab, Cluster], tmp_path: Path, pg_url: str) -> None:
    """issue 26: another "node" (the test, with SQL) writes fleet rows that are too wide, in
    special ranges, not a prefix at all, with an infinite or year-294276 expiry, from a node
    this one does not accept, then 10,000 at once. The real node refuses each bad one once
    (a WARNING naming its id), counts the refusals (status, /metrics) without storing them,
    copies the good row past them, keeps probing on schedule and bans its own flood, copies
    the backlog in batches up to its cap, and stops within seconds in the middle of it;
    `bans list --all-hosts`, `unban` and `status` keep working."""
    the_lab, pg = the_lab_pg
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    service = node(the_lab, tmp_path, pg_url, "node-b", extra=textwrap.dedent(f"""\
        fleet_from = ["node-a", "web*"]
        max_total = {CAP}
        [metrics]
        listen = "127.0.0.1:{metrics_port}"
        """))
    port = lab_port()
    values = "now() - interval '1 second', now() + interval '1 hour'"
    row = "INSERT INTO bans (prefix, backend, netns, created_at, expires_at, removed_at, " \
          "times_banned, host, scope) VALUES "
    try:
        the_lab.listen(port, backlog=64)
        hostile(pg, pg_url, row + ", ".join(
            [f"('{p}', 'nftables', '', {values}, NULL, 1, 'node-a', 'fleet')"
             for p in [*WIDE, "garbage"]]
            + [f"('{GOOD}', 'nftables', '', now(), 'infinity', NULL, 1, 'node-a', 'fleet')",
               f"('{GOOD}', 'nftables', '', now(), '294276-01-01 00:00:00+00', NULL, 1, "
               "'node-a', 'fleet')",
               f"('{OTHER}', 'nftables', '', {values}, NULL, 1, 'mallory', 'fleet')",
               f"('{GOOD}', 'nftables', '', {values}, NULL, 1, 'web7', 'fleet')"]))
        eventually(lambda: GOOD in banned_in_nft(the_lab), "the good row copied")
        service.wait_log("(garbage) not copied: prefix 'garbage' is not a network")
        service.wait_log("not copied: a time past what this node can hold")
        # and the node goes on detecting and banning its own flood meanwhile
        flood_from(the_lab, port, [ONE], each=700)
        try:
            eventually(lambda: ONE in banned_in_nft(the_lab), "its own ban", timeout=30)
        except AssertionError as exc:  # what it decided, and why
            raise AssertionError(f"{exc}: {service.incidents(port)}\n"
                                 f"{service.log.read_text()[-4000:]}") from exc
        # a row as an older synwatch writes it (no number): not a change, so it waits for the
        # node's next look at every ban in force (its restart below)
        hostile(pg, pg_url, row + f"('{UNNUMBERED}', 'nftables', '', {values}, NULL, 1, "
                "'node-a', 'fleet')", numbered=False)
        service.wait_probes(3)
        assert set(banned_in_nft(the_lab)) == {GOOD, ONE}
        assert "Traceback" not in service.log.read_text()
        bans = listed(service, "bans", "list", "--all-hosts")
        assert {b["prefix"] for b in bans if b["host"] == "node-b"} == {GOOD, ONE}
        assert [b["expires_at"][:4] for b in bans if b["host"] == "node-a"
                and b["prefix"] == GOOD][:2] == ["9999", "9999"]  # infinity, shown at its bound
        status = json.loads(synwatch("status", "--format", "json", "--config",
                                     str(service.config)).out)
        assert status["fleet_refused"] == len(WIDE) + 4, status  # garbage, 2 times, mallory
        r = synwatch("unban", f"{SPOOF_NET}.99.1", "--config", str(service.config))
        assert r.code == 1 and "no active ban covers it" in r.err, r.err

        # 10,000 rows at once: copied in batches up to the cap, the probes on schedule, and a
        # SIGTERM in the middle of it honoured within seconds
        inserted = datetime.now(timezone.utc)
        start = time.monotonic()
        hostile(pg, pg_url, row.removesuffix("VALUES ")
                + "SELECT '11.' || (i / 256) || '.' || (i % 256) || '.0/24', "
                f"'nftables', '', {values}, NULL, 1, 'web' || (i % 7), 'fleet' "
                f"FROM generate_series(1, {BACKLOG}) AS i")
        service.wait_log(f"{BATCH} fleet bans copied")
        first = time.monotonic() - start
        stopping = time.monotonic()
        service.stop()
        stopped = time.monotonic() - stopping
        copied = len(banned_in_nft(the_lab))
        assert stopped < 5
        assert BATCH <= copied < CAP
        restarted = datetime.now(timezone.utc)
        service.start()  # and it goes on from where it was, up to its cap
        eventually(lambda: len(banned_in_nft(the_lab)) == CAP, "the cap reached", timeout=60)
        done = time.monotonic()
        service.wait_probes(3)
        assert len(banned_in_nft(the_lab)) == CAP
        assert UNNUMBERED in banned_in_nft(the_lab)  # the look at every ban in force, at start
        times = [t for t in probe_times(service) if t >= inserted]
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)
                if not a <= restarted <= b]  # not the stop and start
        print(f"backlog: first batch after {first:.1f} s, {copied} copied when SIGTERM, which "
              f"took {stopped:.2f} s; the cap ({CAP}) reached {done - stopping:.1f} s after "
              f"it; {len(times)} probes, the longest gap {max(gaps):.2f} s")
        assert max(gaps) < 2.5, gaps
        mine = [b for b in listed(service, "bans", "list") if b["active"]]
        assert len(mine) == CAP  # the refusals are counted, not stored
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                         timeout=5).read().decode()
        assert 'synwatch_fleet_refused_total{reason="cap"}' in metrics
        assert "Traceback" not in service.log.read_text()
    finally:
        if service.proc.poll() is None:
            service.stop()
