"""The history (synwatch/store): every call the service makes answers the same on SQLite and on
PostgreSQL, the migrated schema is the models' own, the resident service never imports
SQLAlchemy, read-only opens never create or migrate, and retention keeps what a ban holds."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from synwatch.errors import StaleSchema
from synwatch.records import ActionRun, Ban
from synwatch.store import History
from synwatch.store.dialect import head_revision
from tests.support.history import NOW, alembic, change, event_no


def _script(store: Any, other: Any) -> list[Any]:
    """Every call the service makes, in a plausible order; what each returned."""
    out: list[Any] = []
    later = NOW + timedelta(minutes=5)
    out.append(store.insert_events([event_no(1), event_no(2), event_no(1)], NOW,
                                   ("journald", {"cursor": "a"})))
    out.append(store.insert_events([event_no(2), event_no(3, time=None)], later,
                                   ("journald", {"cursor": "b"})))
    inc = store.save_incident(change(event_ids=(1, 2)))
    out.append(inc)
    out.append(store.save_incident(change(change="closed", incident_id=inc, status="closed",
                                          closed_at=later, sample=None, event_ids=(3,))))
    out.append(store.save_incident(change(incident_id=999, serial=2, port=80)))  # unknown id
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
    out.append(store.fleet_bans_to_copy(NOW, netns="ns"))
    [copy] = store.add_bans([Ban(prefix="192.0.2.0/24", scope="fleet", origin_id=theirs,
                                 expires_at=NOW + timedelta(hours=1), **ban)])
    out.append(store.fleet_bans_to_copy(NOW, netns="ns"))
    for netns, backend in (("ns", None), ("ns", "nftables"), ("other", None)):
        out.append(store.active_bans(netns, NOW, backend))
    out.append(store.expired_bans("ns", later + timedelta(seconds=1), "nftables"))
    out += [store.times_banned("ns", "198.51.100.0/24"), store.incident_bans(inc)]
    out.append(store.fleet_changes(0, 10))  # theirs, numbered
    out.append(store.fleet_cursor())
    store.mark_removed([copy], later, everywhere=True)  # lifts theirs too
    out.append(store.fleet_changes(out[-1], 10))  # theirs again, lifted, a number higher
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
    out.append(store.prune_events(NOW + timedelta(seconds=2), batch=1))
    out.append(store.prune_incidents(later + timedelta(days=1), later + timedelta(days=2)))
    # rows inserted in one statement (a batch of copies): each id is its own row's
    ids = store.add_bans([Ban(prefix=p, backend="nftables", netns="batch", incident_id=None,
                              created_at=NOW, expires_at=later)
                          for p in ("10.3.0.0/16", "10.1.0.0/16", "10.2.0.0/16")])
    out.append([(b.id == i, b.prefix) for i, b in zip(ids, store.active_bans("batch", NOW),
                                                       strict=True)])
    return out




def _url(kind: str, tmp_path: Path, pg: Any) -> str:
    return f"sqlite:///{tmp_path}/h.db" if kind == "sqlite" else str(pg.new_database())


def test_both_databases_answer_every_call_of_the_service_alike(tmp_path: Path,
                                                               pg: Any) -> None:
    """One script of the service's calls on SQLite and on PostgreSQL: the same records back,
    and the ones that matter as they should be."""
    answers = []
    for kind in ("sqlite", "postgresql"):
        url = _url(kind, tmp_path, pg)
        store, other = History.open(url, host="web1"), History.open(url, host="web2")
        assert store.dialect == kind
        answers.append(_script(store, other))
        store.close()
        other.close()
    lite, server = answers
    # an id the history does not have: an SQLite file keeps it (a file deleted under the
    # service and started anew), a server's sequence hands out its own
    assert (lite[4], server[4]) == (999, 2)
    [resumed], [theirs] = lite[22], server[22]
    assert replace(theirs, incident_id=999) == resumed
    assert lite[:4] + lite[5:22] + lite[23:] == server[:4] + server[5:22] + server[23:]
    assert lite[0] == [1, 2, None]  # the repeated entry is recorded once
    assert lite[1] == [None, 3]
    assert lite[3] == lite[2]
    assert [b.prefix for b in lite[6]] == ["192.0.2.0/24"] and lite[7] == []
    assert {b.prefix for b in lite[8]} == {"198.51.100.0/24", "203.0.113.0/24", "192.0.2.0/24"}
    assert lite[10] == []  # another namespace
    assert [b.prefix for b in lite[11]] == ["198.51.100.0/24"]  # past its expiry
    assert lite[12] == 1 and lite[13] == {"198.51.100.0/24", "203.0.113.0/24", "192.0.2.0/24"}
    # the fleet's changes: both fleet bans decided, numbered in order; then web2's lifted
    assert [(n, b.prefix, b.host) for n, b in lite[14]] == [(1, "203.0.113.0/24", "web1"),
                                                           (2, "192.0.2.0/24", "web2")]
    assert lite[15] == 2
    assert [(n, b.prefix, b.removed_at) for n, b in lite[16]] == [
        (3, "192.0.2.0/24", NOW + timedelta(minutes=5))]
    assert lite[17] == []  # the fleet ban lifted everywhere: web2's too
    assert lite[18:20] == ["2", [("ns", "net.ipv4.tcp_syncookies", "2")]]
    assert lite[20:22] == [{"cursor": "b"}, None]
    assert (resumed.port, resumed.recommendations, resumed.state) == (
        80, ("ban 198.51.100.0/24",), {"tally": {"n": 3}, "reasons": ["few prefixes"]})
    assert [(r.target, r.host) for r in lite[23]] == [("opened", "web1")]
    assert [r.host for r in lite[24]] == ["web1", "web9"]
    assert lite[25:27] == [1, 1]
    assert lite[27] == [(True, "10.3.0.0/16"), (True, "10.1.0.0/16"), (True, "10.2.0.0/16")]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_the_migrated_schema_is_the_models_own(tmp_path: Path, pg: Any, kind: str) -> None:
    """Every table's columns in a history migrated from nothing are the models' (the SQL of
    synwatch/store is written by hand against them)."""
    from sqlalchemy import inspect

    from synwatch.store.migrate import engine
    from synwatch.store.models import Base

    url = _url(kind, tmp_path, pg)
    History.open(url, host="web1").close()
    made = engine(url)
    try:
        found = inspect(made)
        tables = set(found.get_table_names()) - {"alembic_version"}
        assert tables == set(Base.metadata.tables)
        for name, table in Base.metadata.tables.items():
            columns = {c["name"]: c for c in found.get_columns(name)}
            assert set(columns) == {c.name for c in table.columns}, name
            for column in table.columns:
                assert columns[column.name]["nullable"] == column.nullable, (name, column.name)
    finally:
        made.dispose()


def test_the_service_migrates_in_a_child_and_never_imports_sqlalchemy(tmp_path: Path) -> None:
    """A new history is created and migrated by ``python -m synwatch.store.migrate``; the
    service's process itself then runs without SQLAlchemy or Alembic (28 MiB of imports)."""
    db = tmp_path / "sub" / "h.db"
    code = ("import sys\nfrom synwatch.store import History\n"
            f"s = History.open({f'sqlite:///{db}'!r}, host='web1', bounded=True)\n"
            "print(s.schema_revision())\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in"
            " ('sqlalchemy', 'alembic')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.splitlines() == [head_revision(), "[]"]
    assert done.stderr == ""
    assert oct(db.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_read_only_open_never_creates_or_migrates(tmp_path: Path, pg: Any, kind: str) -> None:
    url = _url(kind, tmp_path, pg)
    assert History.open_existing(url) is None  # nothing yet (an empty database, no file)
    if kind == "sqlite":
        assert not (tmp_path / "h.db").exists()
    history = History.open(url, host="web1")
    alembic(history, "downgrade", "base")  # then up to 0004, as a synwatch of then made it
    alembic(history, "upgrade", "0004")
    history.close()
    with pytest.raises(StaleSchema, match=r"schema is 0004 .* `synwatch run` migrates it"):
        History.open(url, write=False)
    reader = History.open_existing(url, write=True)  # a command that writes migrates
    assert reader is not None and reader.schema_revision() == head_revision()
    with pytest.raises(Exception, match="read-only"):
        History.open(url, write=False).heartbeat(1, NOW, NOW, "x")
    if kind == "sqlite":
        assert sqlite3.connect(tmp_path / "h.db").execute(
            "SELECT version_num FROM alembic_version").fetchone() == (head_revision(),)


def test_retention_prunes_this_nodes_old_rows_in_batches_and_keeps_what_a_ban_holds(
        tmp_path: Path) -> None:
    """storage.retention through the service's own housekeeping, on a test clock: the
    heartbeat at once, the first pass a minute after the start, then events past
    `events` go in batches, closed incidents past `incidents` go with their timelines and
    runs (their events stay, unlinked), an incident with a ban in force stays, and another
    node's rows are never touched."""
    from synwatch.clock import FrozenClock
    from synwatch.config import parse_config
    from synwatch.daemon.housekeeping import PRUNE_FIRST, Housekeeping
    from synwatch.store.spool import Spool
    from synwatch.store.spooled import SpooledStore

    url = f"sqlite:///{tmp_path}/h.db"
    config = parse_config(f'[storage]\nurl = "{url}"\nhost = "web1"\n'
                          '[storage.retention]\nevents = "30d"\nincidents = "60d"\n', "test")
    now = datetime.now(timezone.utc)
    old, older = now - timedelta(days=40), now - timedelta(days=70)
    store, other = History.open(url, host="web1"), History.open(url, host="web2")
    for s in (store, other):
        s.insert_events([event_no(i, time=old if i < 5 else now) for i in range(8)], now)
    gone = store.save_incident(change(status="closed", opened_at=older, closed_at=older,
                                      event_ids=(1,)))
    held = store.save_incident(change(status="closed", opened_at=older, closed_at=older,
                                      serial=2))
    store.add_bans([Ban(prefix="198.51.100.0/24", backend="nftables", netns="ns",
                        incident_id=held, created_at=older, expires_at=now + timedelta(hours=1))])
    store.add_action_runs([ActionRun(incident_id=gone, action="ban", target="x", status="done",
                                     at=older)])
    clock = FrozenClock(now)
    keeping = Housekeeping(SpooledStore(store, Spool(tmp_path / "spool.jsonl", 100),
                                        migrated=True), config.storage, clock)
    for _ in range(5):
        keeping.step()
    assert [n.host for n in store.nodes()] == ["web1"]  # the heartbeat, at once
    assert store.rows("SELECT count(*) FROM events")[0][0] == 16  # nothing pruned yet
    clock.advance(PRUNE_FIRST)
    for _ in range(20):  # one small batch a loop turn
        keeping.step()
    events = {(r[0], r[1]) for r in store.rows("SELECT host, incident_id FROM events")}
    assert store.rows("SELECT count(*) FROM events WHERE host = 'web1'")[0][0] == 3
    assert store.rows("SELECT count(*) FROM events WHERE host = 'web2'")[0][0] == 8
    assert ("web1", gone) not in events
    assert [r[0] for r in store.rows("SELECT id FROM incidents")] == [held]
    assert store.action_runs(gone) == []
    assert store.rows("SELECT count(*) FROM evidence_samples WHERE incident_id = ?",
                      [gone])[0][0] == 0
