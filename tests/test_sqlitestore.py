"""The service's sqlite3 store (synwatch/sqlitestore.py) against the SQLAlchemy Store: the same
calls on two new histories give the same answers and leave the same rows, byte for byte."""

from __future__ import annotations

import json
import sqlite3
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from synwatch.records import ActionRun, Ban, IncidentChange, TimelinePoint
from synwatch.sqlitestore import SQLiteStore
from synwatch.store import Store
from tests.test_store import _event

NOW = datetime(2026, 11, 20, 10, 0, 0, 123456, tzinfo=timezone.utc)


def _change(**kw: Any) -> IncidentChange:
    base: dict[str, Any] = dict(
        change="opened", serial=1, incident_id=None, host="web1", netns="ns", address="0.0.0.0",
        port=443, family=4, status="open", verdict="concentrated", trigger="log", opened_at=NOW,
        closed_at=None, first_evidence_at=NOW - timedelta(seconds=2), detected_at=NOW,
        peak_syn_recv=300, top_prefixes=(("198.51.100.0/24", 280, 0.93, 0),),
        recommendations=("ban 198.51.100.0/24",), reasons=("few prefixes",),
        state={"tally": {"n": 3}}, sample=TimelinePoint(NOW, 300, 0, 511, {"overflow": 9.5},
                                                        (("198.51.100.0/24", 280),)))
    base.update(kw)
    return IncidentChange(**base)


def _script(store: Any, other: Any, snapshot: Any) -> list[Any]:
    """Every call the service makes, in a plausible order; what each returned (and the tables
    before the retention pass)."""
    out: list[Any] = []
    later = NOW + timedelta(minutes=5)
    out.append(store.insert_events([_event(1), _event(2), _event(1)], NOW,
                                   ("journald", {"cursor": "a"})))
    out.append(store.insert_events([_event(2), _event(3, time=None)], later,
                                   ("journald", {"cursor": "b"})))
    inc = store.save_incident(_change(event_ids=(1, 2)))
    out.append(inc)
    out.append(store.save_incident(_change(change="closed", incident_id=inc, status="closed",
                                           closed_at=later, sample=None, event_ids=(3,))))
    out.append(store.save_incident(_change(incident_id=999, serial=2, port=80)))  # unknown id
    store.add_action_runs([ActionRun(incident_id=inc, action="notify", target="opened",
                                     status="failed", at=NOW, rendered="t\nb",
                                     detail="refused; retrying", retry_at=later),
                           ActionRun(incident_id=inc, action="notify", target="opened",
                                     status="done", at=later, host="web9")])
    ban = dict(backend="nftables", netns="ns", incident_id=inc, created_at=NOW)
    out.append(store.add_bans([Ban(prefix="198.51.100.0/24", expires_at=later, **ban),
                               Ban(prefix="203.0.113.0/24", scope="fleet",
                                   expires_at=NOW + timedelta(hours=1), **ban)]))
    [theirs] = other.add_bans([Ban(prefix="192.0.2.0/24", scope="fleet",
                                   expires_at=NOW + timedelta(hours=1), **ban)])
    out.append(store.fleet_bans_to_copy(NOW))
    [copy] = store.add_bans([Ban(prefix="192.0.2.0/24", scope="fleet", origin_id=theirs,
                                 expires_at=NOW + timedelta(hours=1), **ban)])
    out.append(store.fleet_bans_to_copy(NOW))
    for netns, backend in (("ns", None), ("ns", "nftables"), ("other", None)):
        out.append(store.active_bans(netns, NOW, backend))
    out.append(store.expired_bans("ns", later + timedelta(seconds=1), "nftables"))
    out += [store.times_banned("ns", "198.51.100.0/24"), store.incident_bans(inc)]
    store.mark_removed([copy], later, everywhere=True)  # lifts theirs too
    store.mark_removed([copy], later + timedelta(hours=1))  # gone already: its time stays
    out.append(other.active_bans("ns", NOW))
    store.save_setting("ns", "net.ipv4.tcp_syncookies", "0", NOW)
    store.save_setting("ns", "net.ipv4.tcp_syncookies", "2", later)
    store.save_setting("", "net.netfilter.nf_conntrack_tcp_loose", "1", NOW)
    store.forget_setting("", "net.netfilter.nf_conntrack_tcp_loose")
    out += [store.saved_setting("ns", "net.ipv4.tcp_syncookies"), store.saved_settings()]
    store.heartbeat(42, NOW, later, "0.1.0")
    store.heartbeat(43, NOW, later + timedelta(seconds=10), "0.1.0")
    out += [store.get_position("journald"), store.get_position("kmsg")]
    out.append(store.open_incidents("web1", "ns"))
    out.append(store.latest_runs("notify", store.host, "ns", NOW - timedelta(days=1)))
    out.append(store.action_runs(inc))
    out.append(snapshot())
    out.append(store.prune_events(NOW + timedelta(seconds=2), batch=1))
    out.append(store.prune_incidents(later + timedelta(days=1), later + timedelta(days=2)))
    return out


def _parsed(value: Any) -> Any:
    """JSON columns compared as values (whitespace in the text is not a difference)."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _tables(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(db)
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    out = {}
    for name in names:
        rows = sorted(conn.execute(f"SELECT * FROM {name}").fetchall(), key=repr)
        out[name] = [tuple(_parsed(v) for v in row) for row in rows]
    conn.close()
    return out


def test_the_sqlite3_store_writes_and_answers_as_the_sqlalchemy_store(tmp_path: Path) -> None:
    answers, tables = [], []
    for kind in ("sqlalchemy", "sqlite3"):
        db = tmp_path / f"{kind}.db"
        url = f"sqlite:///{db}"
        Store.open(url, host="web1").close()
        if kind == "sqlalchemy":
            store: Any = Store.open(url, host="web1")
            other: Any = Store.open(url, host="web2")
        else:
            store, other = SQLiteStore.open(url, "web1"), SQLiteStore.open(url, "web2")
        answers.append(_script(store, other, lambda db=db: _tables(db)))
        store.close()
        other.close()
        tables.append(_tables(db))
    assert answers[0] == answers[1]
    assert tables[0] == tables[1]
    assert all(tables[1][t] for t in ("events", "incidents", "nodes", "saved_settings",
                                      "source_positions"))


def test_the_service_migrates_in_a_child_and_never_imports_sqlalchemy(tmp_path: Path) -> None:
    """A new history is created and migrated by ``python -m synwatch.migrate``; the service
    process itself then runs without SQLAlchemy or Alembic (28 MiB of imports)."""
    import subprocess

    db = tmp_path / "sub" / "h.db"
    code = ("import sys\nfrom synwatch.sqlitestore import SQLiteStore\n"
            f"s = SQLiteStore.open({f'sqlite:///{db}'!r}, 'web1')\n"
            "print(s.schema_revision())\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in"
            " ('sqlalchemy', 'alembic')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == [Store.open(f"sqlite:///{db}").head_revision(), "[]"]
    assert oct(db.stat().st_mode & 0o777) == "0o600"


def test_retention_prunes_this_nodes_old_rows_in_batches_and_keeps_what_a_ban_holds(
        tmp_path: Path) -> None:
    """storage.retention through the service's own pass (Service._keep_up): events past
    `events` go in batches, closed incidents past `incidents` go with their timelines and
    runs (their events stay, unlinked), an incident with a ban in force stays, and another
    node's rows are never touched."""
    from synwatch.config import parse_config
    from synwatch.service import Service

    url = f"sqlite:///{tmp_path}/h.db"
    config = parse_config(f'[storage]\nurl = "{url}"\nhost = "web1"\n'
                          '[storage.retention]\nevents = "30d"\nincidents = "60d"\n', "test")
    now = datetime.now(timezone.utc)
    old, older = now - timedelta(days=40), now - timedelta(days=70)
    store, other = SQLiteStore.open(url, "web1"), SQLiteStore.open(url, "web2")
    for s in (store, other):
        s.insert_events([_event(i, time=old if i < 5 else now) for i in range(8)], now)
    gone = store.save_incident(_change(status="closed", opened_at=older, closed_at=older,
                                       event_ids=(1,)))
    held = store.save_incident(_change(status="closed", opened_at=older, closed_at=older,
                                       serial=2))
    store.add_bans([Ban(prefix="198.51.100.0/24", backend="nftables", netns="ns",
                        incident_id=held, created_at=older, expires_at=now + timedelta(hours=1))])
    store.add_action_runs([ActionRun(incident_id=gone, action="ban", target="x", status="done",
                                     at=older)])
    service = Service(config, None)
    service.store = store
    service._prune_due = 0.0
    for _ in range(20):  # one small batch a loop turn
        service._keep_up()
    events = {(r[0], r[1]) for r in store._read("SELECT host, incident_id FROM events")}
    assert store._read("SELECT count(*) FROM events WHERE host = 'web1'")[0][0] == 3
    assert store._read("SELECT count(*) FROM events WHERE host = 'web2'")[0][0] == 8
    assert ("web1", gone) not in events
    assert [r[0] for r in store._read("SELECT id FROM incidents")] == [held]
    assert store.action_runs(gone) == []
    assert store._read("SELECT count(*) FROM evidence_samples WHERE incident_id = ?",
                       [gone])[0][0] == 0
