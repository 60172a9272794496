"""The store: migrations at open, WAL, exactly-once events, and the list/show commands' JSON."""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from synwatch.records import ActionRun, Ban
from synwatch.store import History
from synwatch.store.migrate import engine
from synwatch.store.models import IncidentRow
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


def _db(path: Path) -> str:
    return f"sqlite:///{path}"


def test_open_creates_and_migrates_the_schema_in_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "dir" / "h.db"
    store = History.open(_db(db))
    assert store.schema_revision() == store.head_revision() == "0006"
    tables = {r[0] for r in store.rows("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"events", "incidents", "evidence_samples", "action_runs", "bans",
            "source_positions", "alembic_version"} <= tables
    store.close()
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone() == ("wal",)
    # a second open is a no-op
    assert History.open(_db(db)).schema_revision() == "0006"


def test_migration_runs_down_and_up_with_data_kept(tmp_path: Path) -> None:
    check_down_and_up(History.open(_db(tmp_path / "h.db")))


@pytest.mark.parametrize("old", OLD_HISTORIES, ids=[p.stem for p in OLD_HISTORIES])
def test_a_history_written_by_an_older_schema_keeps_its_data(tmp_path: Path, old: Path) -> None:
    """Real files written at each older schema (tests/data/store/make_old_histories.py), opened
    by today's synwatch: migrated, a copy kept, every row still there and readable, and the
    retries that were prose in the detail converted to the retry_at column."""
    db = tmp_path / "h.db"
    shutil.copy(old, db)
    store = History.open(_db(db))
    assert store.schema_revision() == store.head_revision()
    assert (tmp_path / f"h.db.before-{store.head_revision()}").exists()
    check_old_history(store, old.stem.removeprefix("schema_"))


def test_events_are_recorded_exactly_once_with_their_position(tmp_path: Path) -> None:
    store = History.open(_db(tmp_path / "h.db"))
    now = T0 + timedelta(hours=1)
    assert store.record_events([event_no(1), event_no(2), event_no(2)], now,
                               ("journald", {"cursor": "c2"})) == 2
    assert store.record_events([event_no(2), event_no(3)], now, ("journald", {"cursor": "c3"})) == 1
    assert store.record_events([event_no(9, dedup_key=None)] * 2, now) == 2  # no key: no dedup
    assert [e.message for e in store.events()] == ["msg 1", "msg 2", "msg 3", "msg 9", "msg 9"]
    assert store.get_position("journald") == {"cursor": "c3"}
    assert store.get_position("kmsg") is None


def test_events_list_json_limit_and_since(tmp_path: Path, store_config: Path) -> None:
    store = History.open(_db(tmp_path / "history.db"))
    now = datetime.now(timezone.utc)
    store.record_events([event_no(i, time=now - timedelta(hours=10 - i)) for i in range(10)], now)
    store.record_events([event_no(20, time=None, source="file:/var/log/syslog", trusted=False,
                                kind="drop_open_request", port=None, address=None, mode=None,
                                source_ip="203.0.113.7", source_port=5555)], now)
    res = synwatch("events", "list", "--format", "json", "--config", str(store_config))
    assert res.code == 0, res.err
    rows = json.loads(res.out)
    assert len(rows) == 11
    assert list(rows[0]) == ["id", "time", "source", "trusted", "kind", "family", "address",
                             "port", "mode", "source_ip", "incident_id"]
    assert rows[0]["time"].endswith("+00:00") and rows[0]["trusted"] is True
    last = rows[-1]  # no kernel time: ordered by when it was recorded
    assert (last["source"], last["trusted"], last["source_ip"]) == (
        "file:/var/log/syslog", False, "203.0.113.7")
    limited = json.loads(synwatch("events", "list", "--format", "json", "--limit", "3",
                                  "--config", str(store_config)).out)
    assert [r["id"] for r in limited] == [r["id"] for r in rows[-3:]]
    recent = json.loads(synwatch("events", "list", "--format", "json", "--since", "3h30m",
                                 "--config", str(store_config)).out)
    assert [r["id"] for r in recent] == [r["id"] for r in rows[7:]]
    table = synwatch("events", "list", "--config", str(store_config)).out.splitlines()
    assert table[0].split()[:3] == ["ID", "TIME", "SOURCE"] and len(table) == 12


def _incident(**kw: object) -> IncidentRow:
    base: dict[str, object] = dict(
        host="web01", netns="", address="0.0.0.0", port=443, family=4, status="closed",
        verdict="concentrated", trigger="log", opened_at=T0, closed_at=T0 + timedelta(minutes=5),
        first_evidence_at=T0 - timedelta(seconds=2), detected_at=T0, peak_syn_recv=512,
        top_prefixes=[{"prefix": "198.51.100.0/24", "count": 300, "share": 0.6}],
        recommendations=["raise the backlog"], evidence={})
    base.update(kw)
    return IncidentRow(**base)


def test_the_port_history_counts_judged_incidents_and_the_peaks_of_real_load(
        tmp_path: Path) -> None:
    """What `doctor` advises from: an unknown verdict is no evidence, a flood fills any backlog,
    and an application that stopped accepting needs no larger one."""
    store = History.open(_db(tmp_path / "h.db"))
    added(store.url, [_incident(verdict="unknown", peak_syn_recv=4000),
                   _incident(verdict="concentrated", peak_syn_recv=2000),
                   _incident(verdict="capacity", peak_syn_recv=300),
                   _incident(verdict="capacity", peak_syn_recv=900, recommendations=[
                       "0.0.0.0:443 is not accepting connections: its accept queue has been "
                       "full (5 of 4) for 40 s"]),
                   _incident(verdict="unknown", port=8080)])
    history = store.port_history("")
    assert set(history) == {443}
    seen = history[443]
    assert (seen.incidents, seen.peak_syn_recv, seen.capacity_incidents, seen.not_accepting) \
        == (3, 300, 1, 1)


def test_incidents_list_and_show(tmp_path: Path, store_config: Path) -> None:
    store = History.open(_db(tmp_path / "history.db"))
    first = _incident()
    second = _incident(port=80, verdict="capacity", trigger="counters", status="open",
                       opened_at=T0 + timedelta(hours=1), closed_at=None, top_prefixes=[])
    added(store.url, [first, second])
    store.add_action_runs([ActionRun(incident_id=first.id, action="ban",
                                     target="198.51.100.0/24", status="done",
                                     at=T0 + timedelta(seconds=1), rendered="nft ...")])
    store.add_bans([Ban(prefix="198.51.100.0/24", backend="nftables", netns="",
                        incident_id=first.id, created_at=T0,
                        expires_at=datetime.now(timezone.utc) + timedelta(hours=1))])
    cfg = ["--config", str(store_config)]
    rows = json.loads(synwatch("incidents", "list", "--format", "json", "--host", "web01",
                               *cfg).out)
    assert [r["id"] for r in rows] == [first.id, second.id]
    # a fleet's history: another node's incidents are not ours (the default is this host)
    assert json.loads(synwatch("incidents", "list", "--format", "json", *cfg).out) == []
    assert rows[0] == {
        "id": first.id, "host": "web01", "netns": "", "address": "0.0.0.0", "port": 443,
        "family": 4, "status": "closed", "verdict": "concentrated", "trigger": "log",
        "opened_at": "2026-11-20T10:00:00+00:00", "closed_at": "2026-11-20T10:05:00+00:00",
        "first_evidence_at": "2026-11-20T09:59:58+00:00",
        "detected_at": "2026-11-20T10:00:00+00:00", "peak_syn_recv": 512,
        "top_prefixes": [{"prefix": "198.51.100.0/24", "count": 300, "share": 0.6,
                          "completed": 0}],
        "recommendations": ["raise the backlog"],
        "actions": [{"action": "ban", "target": "198.51.100.0/24", "status": "done",
                     "at": "2026-11-20T10:00:01+00:00"}]}
    by_port = json.loads(synwatch("incidents", "list", "--format", "json", "--port", "80",
                                  "--all-hosts", *cfg).out)
    assert [r["id"] for r in by_port] == [second.id]
    by_verdict = json.loads(synwatch("incidents", "list", "--format", "json", "--verdict",
                                     "concentrated", "--host", "web01", *cfg).out)
    assert [r["id"] for r in by_verdict] == [first.id]
    newest = json.loads(synwatch("incidents", "list", "--format", "json", "--limit", "1",
                                 "--all-hosts", *cfg).out)
    assert [r["id"] for r in newest] == [second.id]
    shown = json.loads(synwatch("incidents", "show", str(first.id), "--format", "json", *cfg).out)
    assert shown == rows[0]
    text = synwatch("incidents", "show", str(first.id), *cfg).out
    assert "verdict:           concentrated" in text and "198.51.100.0/24" in text
    missing = synwatch("incidents", "show", "999", *cfg)
    assert (missing.code, missing.err) == (1, "synwatch: incident 999: no such incident\n")
    bans = json.loads(synwatch("bans", "list", "--format", "json", "--all-hosts",
                               "--config", str(store_config)).out)
    assert bans == [{"host": store.host, "prefix": "198.51.100.0/24", "backend": "nftables",
                     "scope": "local", "incident_id": first.id,
                     "created_at": "2026-11-20T10:00:00+00:00",
                     "expires_at": bans[0]["expires_at"], "active": True,
                     "enforced": False}]  # no reconcile has checked it in a kernel
    assert json.loads(synwatch("bans", "list", "--format", "json", "--host", "web01",
                               *cfg).out) == []


def test_empty_history_lists_nothing(store_config: Path) -> None:
    res = synwatch("incidents", "list", "--format", "json", "--config", str(store_config))
    assert (res.code, json.loads(res.out)) == (0, [])


def test_unwritable_store_is_a_one_line_failure(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\nurl = "sqlite:///{blocker}/sub/h.db"\n')
    log = tmp_path / "kern.log"
    log.write_text("")
    res = synwatch("import", str(log), "--config", str(cfg))
    assert res.code == 1
    assert res.err == (f"synwatch: sqlite:///{blocker}/sub/h.db: {blocker} cannot take the "
                       "history file\n")
    # a list has nothing to show there, and never makes anything
    listed = synwatch("events", "list", "--config", str(cfg))
    assert (listed.code, listed.err) == (0, "") and blocker.is_file()


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_bad_limit_is_usage(store_config: Path, value: str) -> None:
    res = synwatch("events", "list", "--limit", value, "--config", str(store_config))
    assert res.code == 2 and res.err.startswith("synwatch: events list: argument --limit")


def test_incident_changes_are_saved_linked_and_resumed(tmp_path: Path) -> None:
    from dataclasses import replace

    from synwatch.records import IncidentChange, TimelinePoint

    store = History.open(_db(tmp_path / "h.db"))
    ids = store.insert_events([event_no(1), event_no(2), event_no(1)], T0)
    assert ids[0] is not None and ids[1] is not None and ids[2] is None
    opened = IncidentChange(
        change="opened", serial=1, incident_id=None, host="web01", netns="", address="0.0.0.0",
        port=443, family=4, status="open", verdict="unknown", trigger="log", opened_at=T0,
        closed_at=None, first_evidence_at=T0, detected_at=T0 + timedelta(milliseconds=20),
        peak_syn_recv=0, top_prefixes=(), recommendations=("r1",), reasons=("e1",),
        state={"tally": {"syns_overflowed": 5}, "last_activity": T0.isoformat()},
        sample=TimelinePoint(T0, 64, 0, 64, {"syns_overflowed": 10.0}, (("10.0.0.0/24", 64),)),
        event_ids=(ids[0],))
    incident_id = store.save_incident(opened)
    closed = replace(opened, change="closed", incident_id=incident_id, status="closed",
                     verdict="concentrated", closed_at=T0 + timedelta(minutes=1),
                     peak_syn_recv=64, top_prefixes=(("10.0.0.0/24", 64, 1.0, 0),), sample=None,
                     event_ids=(ids[1],))
    [left_open] = store.open_incidents("web01", "")
    assert (left_open.incident_id, left_open.state["tally"]) == (incident_id,
                                                                   {"syns_overflowed": 5})
    assert store.save_incident(closed) == incident_id
    assert store.open_incidents("web01", "") == []
    assert [e.incident_id for e in store.events()] == [incident_id, incident_id]
    [sample] = store.samples(incident_id)
    assert (sample.syn_recv, sample.top_prefixes) == (64, (("10.0.0.0/24", 64),))
    history = store.port_history("")
    assert (history[443].incidents, history[443].peak_syn_recv) == (1, 0)  # a flood's peak
    shown = json.loads(synwatch("incidents", "show", str(incident_id), "--format", "json",
                                "--evidence", env={"SYNWATCH_CONFIG": str(_config(tmp_path))}
                                ).out)
    assert shown["evidence"] == ["e1"]
    assert shown["timeline"] == [{"at": T0.isoformat(), "syn_recv": 64, "accept_queue": 0,
                                  "backlog": 64, "rates": {"syns_overflowed": 10.0},
                                  "top_prefixes": [{"prefix": "10.0.0.0/24", "count": 64}]}]


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[storage]\nurl = "{_db(tmp_path / "h.db")}"\n')
    return path


def test_a_new_sqlite_history_is_for_its_owner_only(tmp_path: Path) -> None:
    """It names attackers, listeners and bans: 0600 in a 0700 directory, whatever the umask."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        store = History.open(f"sqlite:///{tmp_path}/state/synwatch.db")
        store.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    for name in ("synwatch.db", "synwatch.db-wal", "synwatch.db-shm"):
        path = tmp_path / "state" / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name


def test_a_port_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n')
    for bad in ("70000", "0", "-1", "9" * 5000):
        r = synwatch("incidents", "list", "--port", bad, "--config", str(config))
        assert r.code == 2, bad
        assert "is not a TCP port (1-65535)" in r.err and "Traceback" not in r.err
    assert synwatch("incidents", "list", "--port", "443", "--config", str(config)).code == 0


def test_the_newest_events_come_from_an_index_not_a_sort(tmp_path: Path) -> None:
    """`events list --limit N` and `--since` order by when the line happened: at 1M events a
    sort of the whole table took 2.5 s, the index (migration 0004) reads the newest rows."""
    from sqlalchemy import func, select

    from synwatch.store.models import EventRow

    store = History.open(_db(tmp_path / "h.db"))
    order = func.coalesce(EventRow.time, EventRow.recorded_at)
    fleet = select(EventRow).order_by(order.desc(), EventRow.id.desc()).limit(100)
    # this node's (the default of `events list`): migration 0005's (host, when, id)
    mine = fleet.where(EventRow.host == "web1")
    made = engine(store.url)
    with made.connect() as conn:
        for query, index in ((fleet, "ix_events_when"), (mine, "ix_events_host_when")):
            sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
            plan = " ".join(str(row)
                            for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
            assert f"USING INDEX {index}" in plan and "TEMP B-TREE" not in plan, plan


def test_fleet_bans_written_before_0006_are_numbered_as_the_fleets_changes(
        tmp_path: Path) -> None:
    """A history of 0005 with fleet bans in it (two decided, one of them lifted, a copy and a
    local ban): 0006 numbers the fleet bans decided by id, and only those; a node reads them as
    changes, and the next fleet ban decided comes after them."""
    store = History.open(_db(tmp_path / "h.db"), migrate=False)
    alembic(store, "upgrade", "0005")
    row = ("INSERT INTO bans (prefix, backend, netns, created_at, expires_at, removed_at, "
           "times_banned, host, scope, origin_id) VALUES (?, 'nftables', '', ?, ?, ?, 1, ?, ?, ?)")
    later = T0 + timedelta(hours=1)
    with store.writing() as cur:
        for prefix, removed, host, scope, origin in (
                ("192.0.2.0/24", None, "web1", "fleet", None),
                ("192.0.2.0/24", None, "web2", "fleet", 1),
                ("198.51.100.0/24", None, "web1", "local", None),
                ("203.0.113.0/24", T0, "web2", "fleet", None)):
            cur.execute(row, [prefix, T0, later, removed, host, scope, origin])
    store.migrate()
    assert store.rows("SELECT id, fleet_seq FROM bans ORDER BY id") == [
        (1, 1), (2, None), (3, None), (4, 4)]
    assert [(n, b.prefix, b.removed_at) for n, b in store.fleet_changes(0, 10)] == [
        (1, "192.0.2.0/24", None), (4, "203.0.113.0/24", T0)]
    [new] = store.add_bans([Ban(prefix="10.0.0.0/24", backend="nftables", netns="",
                                incident_id=None, created_at=T0, expires_at=later,
                                scope="fleet")])
    assert [(n, b.id) for n, b in store.fleet_changes(4, 10)] == [(5, new)]
    assert store.fleet_cursor() == 5
    store.close()
