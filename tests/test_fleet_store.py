"""The history on a real PostgreSQL server (tests/support/pgcluster.py): the same migrations as on
SQLite, from an old schema with data; many nodes writing at once; the fleet views of the CLI."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import MetaData, create_engine, insert, select, text

from synwatch.records import Ban
from synwatch.store import History
from synwatch.store.migrate import engine
from tests.support.cli import synwatch
from tests.support.history import (
    OLD_HISTORIES,
    T0,
    added,
    alembic,
    check_down_and_up,
    check_old_history,
    event_no,
)
from tests.support.pgbouncer import Pooler
from tests.support.pgcluster import Cluster


def _copy_old_history(sqlite_file: Path, url: str, revision: str) -> None:
    """The old SQLite history's rows, copied into a PostgreSQL database at the same schema
    revision (made by the same migrations), as an older synwatch would have written them."""
    store = History.open(url, migrate=False)
    alembic(store, "upgrade", revision)
    source = create_engine(f"sqlite:///{sqlite_file}")
    old, new = MetaData(), MetaData()
    old.reflect(source)
    target = engine(url)
    new.reflect(target)
    with source.connect() as src, target.begin() as dst:
        dst.execute(text("SET TIME ZONE 'UTC'"))  # SQLite's naive times are UTC
        for table in old.sorted_tables:
            if table.name == "alembic_version":
                continue
            rows = [dict(r._mapping) for r in src.execute(select(table))]
            if rows:
                dst.execute(insert(new.tables[table.name]), rows)
        for seq in ("incidents", "events", "action_runs", "bans", "evidence_samples"):
            dst.execute(text(f"SELECT setval(pg_get_serial_sequence('{seq}', 'id'), "
                             f"(SELECT coalesce(max(id), 0) + 1 FROM {seq}), false)"))
    source.dispose()
    target.dispose()
    store.close()


@pytest.mark.parametrize("old", OLD_HISTORIES, ids=[p.stem for p in OLD_HISTORIES])
def test_postgresql_migrates_an_old_history_with_its_data(pg_url: str, old: Path) -> None:
    revision = old.stem.removeprefix("schema_")
    _copy_old_history(old, pg_url, revision)
    store = History.open(pg_url)
    assert store.dialect == "postgresql"
    assert store.schema_revision() == store.head_revision() == "0006"
    check_old_history(store, revision)


def test_postgresql_migrations_run_down_and_up(pg_url: str) -> None:
    check_down_and_up(History.open(pg_url))


def test_nodes_starting_together_migrate_once(pg_url: str) -> None:
    """Four nodes open a new fleet history at the same moment: one migrates (an advisory
    lock), the others wait and find the schema current; none fails."""
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def node(name: str) -> None:
        try:
            start.wait()
            History.open(pg_url, host=name).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(f"web{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert History.open(pg_url).schema_revision() == "0006"


def test_nodes_writing_at_once_lose_nothing_and_duplicate_nothing(pg_url: str) -> None:
    """Four nodes on one machine read the same journal and write at once: each records every
    entry once under its own name, and a second pass (a restart) adds nothing."""
    History.open(pg_url).close()
    entries = [event_no(i) for i in range(300)]
    counts: dict[str, list[int]] = {}

    def node(name: str) -> None:
        store = History.open(pg_url, host=name)
        counts[name] = [store.record_events(entries[i:i + 25], T0, ("journald", {"n": i}))
                        for i in range(0, len(entries), 25)]
        counts[name].append(store.record_events(entries, T0))  # again, after a "restart"
        store.close()

    threads = [threading.Thread(target=node, args=(f"web{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {name: (sum(c[:-1]), c[-1]) for name, c in counts.items()} == {
        f"web{i}": (300, 0) for i in range(4)}
    store = History.open(pg_url, host="web2")
    assert len(store.events(host="web2")) == 300
    assert len(store.events()) == 1200
    assert store.get_position("journald") == {"n": 275}


def _fleet_config(tmp_path: Path, url: str, host: str) -> Path:
    path = tmp_path / f"{host}.toml"
    path.write_text(f'[storage]\nurl = "{url}"\nhost = "{host}"\n'
                    f'state_dir = "{tmp_path / host}"\n')
    return path


def test_fleet_views_show_this_host_one_host_or_all(tmp_path: Path, pg_url: str) -> None:
    from synwatch.store.models import IncidentRow

    now = datetime.now(timezone.utc)
    for host, port in (("web1", 443), ("web2", 80)):
        store = History.open(pg_url, host=host)
        row = IncidentRow(host=host, netns="", address="0.0.0.0", port=port, family=4,
                          status="closed", verdict="concentrated", trigger="log",
                          opened_at=now, closed_at=now, peak_syn_recv=10,
                          top_prefixes=[], recommendations=[], evidence={})
        added(pg_url, [row])
        store.add_bans([Ban(prefix=f"198.51.{port}.0/24", backend="nftables", netns="",
                            incident_id=row.id, created_at=now,
                            expires_at=now + timedelta(hours=1))])
        store.heartbeat(1, now, now, "test")
    web1 = _fleet_config(tmp_path, pg_url, "web1")

    def listed(*args: str) -> list[tuple[str, object]]:
        res = synwatch(*args, "--format", "json", "--config", str(web1))
        assert res.code == 0, res.err
        return [(r["host"], r.get("port") or r.get("prefix")) for r in json.loads(res.out)]

    assert listed("incidents", "list") == [("web1", 443)]
    assert listed("incidents", "list", "--host", "web2") == [("web2", 80)]
    assert listed("incidents", "list", "--all-hosts") == [("web1", 443), ("web2", 80)]
    assert listed("bans", "list") == [("web1", "198.51.443.0/24")]
    assert listed("bans", "list", "--all-hosts") == [("web1", "198.51.443.0/24"),
                                                     ("web2", "198.51.80.0/24")]
    status = synwatch("status", "--format", "json", "--config", str(web1))
    view = json.loads(status.out)
    assert status.code == 3  # no daemon
    assert view["store"].startswith("postgresql+psycopg://postgres@/synwatch_")
    assert view["host"] == "web1"
    assert sorted((h["host"], h["recent"]) for h in view["hosts"]) == [("web1", True),
                                                                      ("web2", True)]
    text_ = synwatch("incidents", "list", "--all-hosts", "--config", str(web1)).out
    assert "web2" in text_.splitlines()[-1]


def test_check_config_names_the_node_and_does_not_fail_on_a_server_that_is_down(
        tmp_path: Path, pg_url: str) -> None:
    up = _fleet_config(tmp_path, pg_url, "web1")
    r = synwatch("check-config", "--config", str(up))
    assert r.code == 0, r.out + r.err
    assert "ok    storage.url: postgresql+psycopg://postgres@/synwatch_" in r.out
    assert "opens (this node: web1)" in r.out
    down = _fleet_config(tmp_path, f"postgresql+psycopg://postgres@/x?host={tmp_path}/no",
                         "web2")
    r = synwatch("check-config", "--config", str(down))
    assert r.code == 0, r.out + r.err
    assert "warn  storage.url:" in r.out and "would start on its spool" in r.out
    shared = tmp_path / "shared.toml"
    shared.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n'
                      '[actions.ban]\nscope = "fleet"\n')
    r = synwatch("check-config", "--config", str(shared))
    assert "warn  actions.ban.scope: fleet bans with an SQLite history" in r.out


def _history(url: str, now: datetime) -> History:
    """Two nodes' events, incidents, action runs and bans, over three days."""
    from synwatch.records import ActionRun
    from synwatch.store.models import IncidentRow

    for n, host in enumerate(("web1", "web2")):
        store = History.open(url, host=host)
        store.record_events([event_no(i, time=now - timedelta(hours=i * 7 + n))
                             for i in range(12)], now, ("journald", {"c": n}))
        rows = [IncidentRow(host=host, netns=("", "docker:web_1", "docker:webX1")[i % 3],
                            address="0.0.0.0", port=80 + i, family=4,
                            status="closed" if i else "open",
                            verdict=("capacity", "concentrated", "spoofed")[i % 3],
                            trigger="log", opened_at=now - timedelta(hours=i * 9 + n),
                            closed_at=None, peak_syn_recv=i,
                            top_prefixes=[{"prefix": "198.51.100.0/24", "count": i,
                                           "share": 0.5}],
                            recommendations=[f"r{i}"], evidence={"reasons": ["x"]})
                for i in range(7)]
        added(url, rows)
        ids = [r.id for r in rows]
        store.add_action_runs([ActionRun(incident_id=i, action="ban", target="198.51.100.0/24",
                                         status="done", at=now, detail="d") for i in ids[:3]])
        store.add_bans([Ban(prefix=f"198.51.{n}.0/24", backend="nftables", netns="",
                            incident_id=ids[0], created_at=now,
                            expires_at=now + timedelta(hours=1), scope="fleet")])
    return store


def test_every_filter_of_the_lists_reads_alike_on_both_databases(tmp_path: Path,
                                                                 pg: Cluster) -> None:
    """The lists' queries, for every filter, on SQLite and on PostgreSQL: the same records, and
    the filters filter."""
    now = datetime.now(timezone.utc).replace(microsecond=123456)
    lite, server = (_history(url, now) for url in (f"sqlite:///{tmp_path}/h.db",
                                                   pg.new_database()))
    day = now - timedelta(days=1)
    for kw, n in (({}, 24), ({"host": "web1"}, 12), ({"since": day}, 8), ({"limit": 5}, 5),
                  ({"limit": 3, "host": "web2"}, 3), ({"since": day, "limit": 2,
                                                       "host": "web1"}, 2)):
        found = lite.events(**kw)  # type: ignore[arg-type]
        assert found == server.events(**kw) and len(found) == n, kw  # type: ignore[arg-type]
    for kw, n in (({}, 14), ({"host": "web2"}, 7), ({"since": day}, 6), ({"port": 81}, 2),
                  ({"verdict": "spoofed"}, 4), ({"status": "open"}, 2),
                  ({"limit": 4, "host": "web1"}, 4), ({"netns": ""}, 6),
                  ({"netns": "docker:*"}, 8), ({"netns": "docker:web_1"}, 4),
                  ({"netns": "docker:web?1"}, 8), ({"netns": "Docker:*"}, 0),
                  ({"netns": "docker:%"}, 0), ({"netns": "*X1", "host": "web2"}, 2)):
        got = lite.incidents(**kw)  # type: ignore[arg-type]
        assert got == server.incidents(**kw) and len(got) == n, kw  # type: ignore[arg-type]
    ids = [i.id for i in lite.incidents()]
    assert lite.actions_by_incident(ids) == server.actions_by_incident(ids)
    assert sum(map(len, lite.actions_by_incident(ids).values())) == 6
    for host, n in ((None, 2), ("web1", 1)):
        assert lite.bans(host=host) == server.bans(host=host) and len(lite.bans(host)) == n


def test_listing_a_current_history_does_not_import_sqlalchemy(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n')
    _history(f"sqlite:///{tmp_path}/h.db", datetime.now(timezone.utc))
    code = ("import sys\nfrom synwatch.cli import main\n"
            "for args in (['incidents', 'list'], ['events', 'list', '--limit', '5'],"
            " ['bans', 'list', '--all-hosts']):\n"
            f"    main([*args, '--format', 'json', '--config', {str(config)!r}])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in"
            " ('sqlalchemy', 'alembic')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[-1] == "[]"


def test_the_spool_keeps_order_ids_and_positions_across_a_restart(
        tmp_path: Path, pg: Cluster, pg_url: str) -> None:
    """While the server is down: writes get provisional ids and go to the spool in order; a
    new process on the same spool resumes its open incident and positions and numbers below
    the old ids; when the server answers, everything is written with the links mapped."""
    from synwatch.errors import StoreError
    from synwatch.records import IncidentChange
    from synwatch.store.spool import Spool
    from synwatch.store.spooled import SpooledStore

    now = datetime.now(timezone.utc)
    path = tmp_path / "spool.jsonl"
    first = SpooledStore(History.open(pg_url, host="n1"), Spool(path, 10), migrated=True)
    [before] = first.insert_events([event_no(1)], now, ("journald", {"c": 1}))
    assert before > 0 and not path.exists()
    pg.stop()
    try:
        [during] = first.insert_events([event_no(2)], now, ("journald", {"c": 2}))
        change = IncidentChange(
            change="opened", serial=1, incident_id=None, host="n1", netns="", address="0.0.0.0",
            port=443, family=4, status="open", verdict="concentrated", trigger="log",
            opened_at=now, closed_at=None, first_evidence_at=now, detected_at=now,
            peak_syn_recv=9, top_prefixes=(("198.51.100.0/24", 9, 1.0, 0),),
            recommendations=("ban",), reasons=("r",), state={"k": 1}, event_ids=(during,))
        incident = first.save_incident(change)
        [ban] = first.add_bans([Ban(prefix="198.51.100.0/24", backend="nftables", netns="",
                                    incident_id=incident, created_at=now,
                                    expires_at=now + timedelta(hours=1))])
        assert during < 0 and incident < 0 and ban < 0
        assert [op["op"] for op in Spool(path, 10).ops] == ["events", "incident", "bans"]
        with pytest.raises(StoreError, match="the spool is full"):
            first.insert_events([event_no(i) for i in range(3, 12)], now)
        # a restart while the server is still down
        second = SpooledStore(History.open(pg_url, host="n1", migrate=False), Spool(path, 10),
                              migrated=False)
        assert second.get_position("journald") == {"c": 2}
        [resumed] = second.open_incidents("n1", "")
        assert (resumed.incident_id, resumed.port, resumed.state) == (incident, 443, {"k": 1})
        [later] = second.insert_events([event_no(3)], now, ("journald", {"c": 3}))
        assert later < min(during, incident, ban)
        second.save_incident(replace(resumed, change="closed", status="closed", closed_at=now,
                                     event_ids=(later,)))
    finally:
        pg.start()
    assert second.catch_up() == 0 and not path.exists()
    store = History.open(pg_url, host="n1")
    events = store.events(host="n1")
    [inc] = store.incidents(host="n1")
    assert [e.dedup_key for e in events] == ["cursor-1", "cursor-2", "cursor-3"]
    assert [e.incident_id for e in events] == [None, inc.id, inc.id]
    assert (inc.status, inc.closed_at is not None) == ("closed", True)
    assert [(b.prefix, b.incident_id) for b in store.bans(host="n1")] == [
        ("198.51.100.0/24", inc.id)]
    assert store.get_position("journald") == {"c": 3}


def test_a_live_write_the_server_refuses_is_set_aside_and_the_rest_goes_on(
        tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A kernel line PostgreSQL refuses for what it is (a NUL in its text) and an opening it
    refuses are set aside in spool.rejected.jsonl with one ERROR each, never spooled for ever
    and never a crash of the service; the next lines are written, and the incident's later
    changes are numbered by the history and linked."""
    from synwatch.records import IncidentChange
    from synwatch.store.spool import Spool
    from synwatch.store.spooled import SpooledStore

    now = datetime.now(timezone.utc)
    store = SpooledStore(History.open(pg_url, host="n1", bounded=True),
                         Spool(tmp_path / "spool.jsonl", 100), migrated=True)
    [bad] = store.insert_events([replace(event_no(1), message="a\x00b")], now)
    [good] = store.insert_events([event_no(2)], now)
    assert bad is not None and bad < 0 and good is not None and good > 0
    opening = IncidentChange(
        change="opened", serial=1, incident_id=None, host="n1", netns="", address="0.0.0.0",
        port=443, family=4, status="open", verdict="unknown", trigger="log", opened_at=now,
        closed_at=None, first_evidence_at=now, detected_at=now, peak_syn_recv=9,
        top_prefixes=(), recommendations=(), reasons=(), state={})
    provisional = store.save_incident(replace(opening, netns="a\x00b"))
    assert provisional < 0
    assert store.save_incident(replace(opening, change="updated", incident_id=provisional,
                                       recommendations=("fine",), event_ids=(good,))) \
        == provisional  # the id the service knows it by stays
    numbered = store.save_incident(replace(opening, change="closed", incident_id=provisional,
                                           status="closed", closed_at=now,
                                           recommendations=("fine",)))
    assert not store.spooling and not (tmp_path / "spool.jsonl").exists()
    rejected = (tmp_path / "spool.rejected.jsonl").read_text().splitlines()
    assert [json.loads(line)["op"] for line in rejected] == ["events", "incident"]
    assert caplog.text.count("is refused by") == 2
    reader = History.open(pg_url, host="n1", write=False)
    [inc] = reader.incidents()  # one row: the close went to the history's number
    assert (inc.id, inc.recommendations, inc.status) == (numbered, ("fine",), "closed")
    assert [(e.dedup_key, e.incident_id) for e in reader.events()] == [("cursor-2", inc.id)]


def test_a_database_that_is_not_there_is_an_error_not_an_outage(pg_url: str) -> None:
    """A server that answers no (no such database) is a mistake to fix, not an outage to
    spool through for ever; a server that does not answer is an outage."""
    from synwatch.errors import StoreError, StoreOutage

    base, query = pg_url.split("?", 1)
    missing = base.rsplit("/", 1)[0] + "/no_such_db?" + query
    with pytest.raises(StoreError, match="does not exist") as refused:
        History.open(missing, write=False)
    assert not isinstance(refused.value, StoreOutage)
    with pytest.raises(StoreOutage):
        History.open("postgresql+psycopg://postgres@/x?host=/nonexistent-socket-dir",
                     write=False)


def test_the_fleets_changes_are_read_in_commit_order_through_a_pooler(pg: Cluster) -> None:
    """Four nodes decide fleet bans one by one and lift some everywhere, through a real
    pgbouncer in transaction mode, while a fifth polls the changes after the last it saw, as
    every node does: it misses no ban and no lift, and reads numbers only ever higher (a
    number handed out before another's commit would be skipped by a reader already past it),
    all of it on the pool's few server connections."""
    if not pg.running:
        pg.start()
    pooler = Pooler(pg, pool_size=3).start()
    try:
        name = pg.new_database_name()
        url = pooler.url(name)
        History.open(url).close()
        decided: dict[int, str] = {}
        lifted: set[int] = set()
        done = threading.Event()

        def writer(host: str) -> None:
            store = History.open(url, host=host)
            for i in range(40):
                now = datetime.now(timezone.utc)
                [ban] = store.add_bans([Ban(prefix=f"10.{len(host)}.{i}.0/24", backend="nft",
                                            netns="", incident_id=None, created_at=now,
                                            expires_at=now + timedelta(hours=1),
                                            scope="fleet")])
                decided[ban] = host
                if i % 5 == 4:
                    store.mark_removed([ban], now, everywhere=True)
                    lifted.add(ban)
            store.close()

        seen: list[tuple[int, int, bool]] = []

        def reader() -> None:
            store, cursor = History.open(url, host="reader"), 0
            while True:
                finished = done.is_set()
                for seq, b in store.fleet_changes(cursor, 50):
                    seen.append((seq, b.id or 0, b.removed_at is not None))
                    cursor = seq
                if finished:
                    break
            store.close()

        threads = [threading.Thread(target=writer, args=(f"web{'x' * i}",)) for i in range(4)]
        polling = threading.Thread(target=reader)
        polling.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        polling.join()
        # a ban lifted before the reader looked is seen once, lifted (its number moved on);
        # every number the reader saw is higher than the one before it
        numbers = [n for n, _, _ in seen]
        assert numbers == sorted(set(numbers))
        assert {i for _, i, _ in seen} == set(decided)
        assert {i for _, i, gone in seen if gone} == lifted
        assert {i for _, i, gone in seen if not gone} >= set(decided) - lifted
        assert 1 <= pooler.server_connections(name) <= 3
    finally:
        pooler.destroy()
