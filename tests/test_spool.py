"""One outage path for every history: an SQLite file that is locked, on a full disk, deleted or
never opened costs the service's loop at most one short wait, never a lost write, and the spool
stays within its bounds however long the outage. Real SQLite files; the full disk is a small
tmpfs mounted in the suite's own mount namespace (scripts/test)."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from synwatch.errors import StoreOutage
from synwatch.records import ActionRun, Ban, TimelinePoint
from synwatch.store import History, prepare
from synwatch.store.spool import THIN_EVERY, Spool
from synwatch.store.spooled import SpooledStore
from tests.support.history import NOW, change, event_no
from tests.support.wait import eventually

pytestmark = pytest.mark.needs_root  # the tmpfs
SAMPLE = TimelinePoint(NOW, 300, 0, 511, {"overflow": 9.5}, (("198.51.100.0/24", 280),))


def _never() -> None:
    raise StoreOutage("sqlite:////nonexistent/h.db", "not there")


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def _spooled(tmp: Path, limit: int = 10_000) -> tuple[SpooledStore, Path]:
    db = tmp / "h.db"
    lite = History.open(f"sqlite:///{db}", host="web1", bounded=True)
    lite.set_busy_timeout(0.2)  # as the service (synwatch/daemon/service.py STORE_WAIT)
    return SpooledStore(lite, Spool(tmp / "spool.jsonl", limit), migrated=True), db


def _back(store: SpooledStore, timeout: float = 10) -> None:
    """The away thread saw the history answer; the spool written to it."""
    eventually(lambda: not store.away, "the history back", timeout, every=0.05,
               seen=lambda: store.problem)
    while store.catch_up():
        pass
    assert not store.spooling


def _one_flood(store: SpooledStore) -> tuple[int, int, int]:
    """What the service writes for a flood: its kernel line, the incident, an update, a ban,
    an action run; the ids it was given."""
    [event] = store.insert_events([event_no(1)], NOW, ("journald", {"cursor": "a"}))
    assert event is not None
    incident = store.save_incident(change(event_ids=(event,)))
    store.save_incident(change(change="updated", incident_id=incident, verdict="concentrated"))
    [ban] = store.add_bans([Ban(prefix="198.51.100.0/24", backend="nftables", netns="ns",
                                incident_id=incident, created_at=NOW,
                                expires_at=NOW + timedelta(hours=1))])
    store.save_setting("ns", "net.ipv4.tcp_syncookies", "0", NOW)
    return event, incident, ban


def _written(db: Path, event: int) -> None:
    """Everything _one_flood wrote is in the history, linked by the history's own ids."""
    [(incident, verdict)] = _rows(db, "SELECT id, verdict FROM incidents")
    assert verdict == "concentrated" and incident > 0
    assert _rows(db, "SELECT incident_id FROM events") == [(incident,)]
    assert _rows(db, "SELECT prefix, incident_id FROM bans") == [("198.51.100.0/24", incident)]
    assert _rows(db, "SELECT value FROM saved_settings") == [("0",)]
    assert event < 0  # it was spooled, not written


def test_a_locked_history_costs_one_short_wait_and_loses_nothing(tmp_path: Path) -> None:
    store, db = _spooled(tmp_path)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        event, incident, ban = _one_flood(store)
        for n in range(50):  # a probe's updates, every one of them spooled at once
            store.save_incident(change(change="updated", incident_id=incident,
                                        sample=replace(SAMPLE, at=NOW + timedelta(seconds=n))))
        took = time.monotonic() - started
        assert incident < 0 and ban < 0
        assert took < 1.0, f"{took:.2f} s: more than the one wait of 0.2 s"
        assert store.away and "locked" in (store.problem or "")
        assert store.saved_setting("ns", "net.ipv4.tcp_syncookies") == "0"
        assert [b.prefix for b in store.active_bans("ns", NOW)] == ["198.51.100.0/24"]
    finally:
        holder.execute("COMMIT")
        holder.close()
    _back(store)
    _written(db, event)
    # thinned: one sample a THIN_EVERY window of the 50 seconds the updates covered
    samples = _rows(db, "SELECT count(*) FROM evidence_samples")[0][0]
    assert isinstance(samples, int) and 50 / THIN_EVERY <= samples <= 50 / THIN_EVERY + 3
    store.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "swt-small-disk", str(disk)],
                   check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    done = subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"],
                          capture_output=True, text=True, check=False)
    assert "No space left on device" in done.stderr, done.stderr
    return filler


def test_a_full_disk_keeps_the_spool_in_memory_until_it_has_room(small_disk: Path) -> None:
    store, db = _spooled(small_disk)
    filler = _fill(small_disk)
    event, _, _ = _one_flood(store)
    assert store.away and "full" in (store.problem or "")
    assert store.spool.problem is not None and store.spool.unwritten > 0  # not on disk
    assert not Spool(small_disk / "spool.jsonl", 10).ops  # no line, not even a torn one
    filler.unlink()
    _back(store)
    _written(db, event)
    store.close()


def test_a_deleted_history_file_is_an_outage_not_a_silent_loss(tmp_path: Path) -> None:
    store, _ = _spooled(tmp_path)
    for name in ("h.db", "h.db-wal", "h.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    [event] = store.insert_events([event_no(1)], NOW)
    assert event is not None and event < 0
    assert store.away and "gone" in (store.problem or "")
    assert len(Spool(tmp_path / "spool.jsonl", 10).ops) == 1  # on disk for the next start
    store.close()


def test_a_history_that_cannot_be_opened_is_prepared_when_it_can(tmp_path: Path) -> None:
    """The start found no history it could open (here: its directory is a file); the spool
    takes everything, and when the directory is there the history is created and written."""
    where = tmp_path / "lib"
    where.write_text("not a directory")
    url = f"sqlite:///{where}/h.db"
    store = SpooledStore(None, Spool(tmp_path / "spool.jsonl", 10_000), migrated=False,
                         url=url, host="web1",
                         opener=lambda: History.open(url, host="web1", bounded=True),
                         prepare=lambda: prepare(url, "web1"))
    event, _, _ = _one_flood(store)
    assert store.away and store.spooling
    where.unlink()
    where.mkdir()
    _back(store, timeout=15)
    _written(where / "h.db", event)
    store.close()


def test_the_spool_is_bounded_however_long_the_outage(tmp_path: Path) -> None:
    """An hour of an incident's updates (one a second) while the history is away: the spool
    keeps one per window, fewer past half its bound, only the latest past it; events past
    the bound are refused (they wait in their source); a restart reads it back as it was."""
    limit = 400
    store = SpooledStore(None, Spool(tmp_path / "spool.jsonl", limit), migrated=False,
                         url="sqlite:////nonexistent/h.db", host="web1", prepare=_never)
    incident = store.save_incident(change())
    linked = []
    for n in range(3600):
        events = [e for e in store.insert_events([event_no(10_000 + n)], NOW)
                  if n % 100 == 0] if store.spool.fits(1) else []
        linked += [e for e in events if e is not None]
        store.save_incident(change(change="updated", incident_id=incident,
                                    sample=replace(SAMPLE, at=NOW + timedelta(seconds=n)),
                                    event_ids=tuple(e for e in events if e is not None)))
    assert store.spool.records <= limit + 1
    assert len(store.spool.ops) <= limit + 1
    updates = [op for op in store.spool.ops if op["op"] == "incident"]
    # every linked event is still linked by the update that replaced its own
    kept = {i for op in updates for i in op["change"]["event_ids"]}
    assert set(linked) <= kept
    again = Spool(tmp_path / "spool.jsonl", limit)
    assert [op["op"] for op in again.ops] == [op["op"] for op in store.spool.ops]
    # the file was compacted: stale lines of replaced updates do not pile up
    lines = len((tmp_path / "spool.jsonl").read_text().splitlines())
    assert lines <= 2 * len(store.spool.ops) + 64
    store.close()


def test_a_stop_in_the_middle_of_a_catch_up_leaves_nothing_unmappable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The history comes back, part of the spool is written, and synwatch stops: what waits
    names the history's ids, so the next start writes it (before: a foreign key error at the
    head of the spool, for ever) and resumes the incident once."""
    import synwatch.store.spooling

    store, db = _spooled(tmp_path)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    event, incident, _ = _one_flood(store)
    for n in range(30):  # updates that link events: never thinned
        [e] = store.insert_events([event_no(100 + n)], NOW)
        store.save_incident(change(change="updated", incident_id=incident,
                                    sample=replace(SAMPLE, at=NOW + timedelta(seconds=n)),
                                    event_ids=(e,) if e is not None else ()))
    store.add_action_runs([ActionRun(incident_id=incident, action="notify", target="opened",
                                     status="done", at=NOW, rendered="", detail="")])
    holder.execute("COMMIT")
    holder.close()
    eventually(lambda: not store.away, "the history back", 10, every=0.05)
    monkeypatch.setattr(synwatch.store.spooling, "CATCH_UP_SECONDS", 0.0)  # one op a call
    for _ in range(5):
        store.catch_up()
    assert store.spool.ops  # stopped half-way
    store.close()
    again, _ = _spooled(tmp_path)
    assert [c.incident_id for c in again.open_incidents("web1", "ns")] == [1]  # once
    while again.catch_up():
        pass
    assert _rows(db, "SELECT id FROM incidents") == [(1,)]
    assert _rows(db, "SELECT count(*) FROM events WHERE incident_id = 1") == [(31,)]
    assert _rows(db, "SELECT incident_id FROM action_runs") == [(1,)]
    assert _rows(db, "SELECT incident_id FROM bans") == [(1,)]
    assert event < 0
    again.close()


def test_a_spooled_write_the_history_refuses_is_set_aside_and_the_rest_is_written(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, db = _spooled(tmp_path)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    # an action run for an incident the history never had: refused (foreign key)
    store.add_action_runs([ActionRun(incident_id=424242, action="notify", target="opened",
                                     status="done", at=NOW, rendered="", detail="")])
    event, _, _ = _one_flood(store)
    holder.execute("COMMIT")
    holder.close()
    _back(store)
    _written(db, event)
    assert "a runs write is refused" in caplog.text
    aside = (tmp_path / "spool.rejected.jsonl").read_text()
    assert "424242" in aside
    store.close()


def test_events_linked_during_an_outage_stay_linked_through_thinning(tmp_path: Path) -> None:
    store, db = _spooled(tmp_path)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    incident = store.save_incident(change())
    for n in range(12):  # a probe a second, and a kernel line now and then
        linked: tuple[int, ...] = ()
        if n % 4 == 1:
            [e] = store.insert_events([event_no(200 + n)], NOW)
            assert e is not None
            linked = (e,)
        store.save_incident(change(change="updated", incident_id=incident, event_ids=linked,
                                    sample=replace(SAMPLE, at=NOW + timedelta(seconds=n))))
    holder.execute("COMMIT")
    holder.close()
    _back(store)
    assert _rows(db, "SELECT count(*), count(incident_id) FROM events") == [(3, 3)]
    store.close()


def test_a_torn_last_line_does_not_swallow_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    first = Spool(path, 100)
    first.add({"op": "setting", "netns": "", "name": "a", "value": "1", "now": NOW})
    with path.open("a") as f:
        f.write('{"op": "setting", "netns": "", "na')  # a crash mid-write
    second = Spool(path, 100)
    second.add({"op": "setting", "netns": "", "name": "c", "value": "3", "now": NOW})
    assert [op["name"] for op in Spool(path, 100).ops] == ["a", "c"]


def test_a_hostile_spool_file_is_skipped_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    path.write_bytes(b'[1]\n{"op": "events"}\n\xff\xfe\n{"op": "setting"}\n'
                     b'{"op": "forget", "netns": "", "name": "x"}\n')
    assert [op["op"] for op in Spool(path, 100).ops] == ["forget"]


def test_only_an_outage_is_an_outage() -> None:
    """A bad statement is a bug that says so, not a reason to spool for ever."""
    from synwatch.errors import StoreError
    from synwatch.store.dialect import SQLite

    _error = SQLite("sqlite:///u").error
    conn = sqlite3.connect(":memory:")
    with pytest.raises(sqlite3.Error) as bad:
        conn.execute("SELEC 1")
    assert type(_error(bad.value)) is StoreError
    with pytest.raises(sqlite3.Error) as missing:
        conn.execute("SELECT * FROM nothing")
    assert type(_error(missing.value)) is StoreError
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = 5  # type: ignore[attr-defined]
    assert isinstance(_error(locked), StoreOutage)


def test_the_newest_update_wins_after_thinning_around_linked_events(tmp_path: Path) -> None:
    """Updates thinned into a slot before an update that links events would be replayed
    before it, and the older state would win: the history must end with the newest."""
    store, db = _spooled(tmp_path)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    incident = store.save_incident(change())
    for n in range(9):
        linked: tuple[int, ...] = ()
        if n == 7:
            [e] = store.insert_events([event_no(300)], NOW)
            assert e is not None
            linked = (e,)
        store.save_incident(change(change="updated", incident_id=incident, event_ids=linked,
                                    peak_syn_recv=300 + n,
                                    sample=replace(SAMPLE, at=NOW + timedelta(seconds=n))))
    holder.execute("COMMIT")
    holder.close()
    _back(store)
    assert _rows(db, "SELECT peak_syn_recv FROM incidents") == [(308,)]
    assert _rows(db, "SELECT count(incident_id) FROM events") == [(1,)]
    store.close()
