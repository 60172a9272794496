"""Histories for the store's tests: records to write, old schemas to migrate, rows written as
any synwatch (or an older one) may have left them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from synwatch.records import IncidentChange, NewEvent, TimelinePoint
from synwatch.store import History
from synwatch.store.migrate import alembic_config, engine
from tests.support import DATA

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=timezone.utc)


def event_no(i: int, **kw: object) -> NewEvent:
    base: dict[str, object] = dict(
        time=T0 + timedelta(seconds=i), source="journald", trusted=True, kind="syn_flood",
        family=4, address="0.0.0.0", port=443, mode="cookies", source_ip=None,
        source_port=None, host="web01", message=f"msg {i}",
        pattern="kernel-synflood/form-f", dedup_key=f"cursor-{i}")
    base.update(kw)
    return NewEvent(**base)  # type: ignore[arg-type]


def alembic(store: History, verb: str, revision: str) -> None:
    """Alembic's ``upgrade`` or ``downgrade`` to ``revision`` on the store's database."""
    from alembic import command

    cfg = alembic_config()
    made = engine(store.url)
    with made.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, verb)(cfg, revision)
    made.dispose()


def check_down_and_up(store: History) -> None:
    """Every migration down to nothing, then up again (on SQLite here, on PostgreSQL in
    tests/test_fleet_store.py)."""
    alembic(store, "downgrade", "base")
    assert store.schema_revision() is None
    store.migrate()
    assert store.schema_revision() == "0006"


OLD_HISTORIES = sorted((DATA / "store").glob("schema_*.db"))


def check_old_history(store: History, revision: str) -> None:
    """Every row of tests/data/store/make_old_histories.py still there and readable after the
    migrations (on SQLite, and copied into PostgreSQL by tests/test_fleet_store.py)."""
    [event] = store.events()
    assert (event.time, event.port, event.incident_id) == (T0 + timedelta(seconds=1), 443, 1)
    # rows from before fleets (0005) belong to their incident's host, else to this node
    assert event.host == "web01"
    incident, runs = store.incident(1)
    assert (incident.verdict, incident.peak_syn_recv, incident.opened_at) == (
        "concentrated", 200, T0 + timedelta(seconds=1))
    assert incident.reasons == ["4 prefixes carry 90% of SYN-RECV"]
    assert incident.top_prefixes[0]["prefix"] == "203.0.113.0/24"
    assert [(r.target, r.retry_at, r.host) for r in runs] == [
        ("203.0.113.0/24", None, "web01"),
        ("opened", T0 + timedelta(minutes=1), "web01"),  # "retrying in 30 s"
        ("closed", T0 + timedelta(minutes=1), "web01"),  # "retrying at the next start"
        ("update", None, "web01")]  # given up
    [ban] = store.bans()
    assert (ban.prefix, ban.expires_at, ban.host, ban.scope) == (
        "203.0.113.0/24", T0 + timedelta(hours=1, minutes=1), "web01", "local")
    [point] = store.samples(1)
    assert (point.rates, point.top_prefixes) == ({"syns_overflowed": 950.0},
                                                 (("203.0.113.0/24", 180),))
    assert store.get_position("journald") == {"cursor": "c1"}
    saved = store.saved_setting("", "net.ipv4.tcp_syncookies")
    assert saved == (None if revision == "0001" else "0")
    # an entry is recorded once per node: web01 has it, web02 (same journal) records its own
    web01 = History.open(store.url, host="web01")
    assert web01.record_events([event_no(1, dedup_key="cursor-1")], T0) == 0
    other = History.open(store.url, host="web02")
    assert other.record_events([event_no(1, dedup_key="cursor-1")], T0) == 1
    assert other.get_position("journald") is None  # positions are per node


def added(url: str, rows: list[object]) -> None:
    """Rows written as any synwatch (or an older one) may have left them, through the models."""
    from sqlalchemy.orm import Session

    made = engine(url)
    with Session(made, expire_on_commit=False) as s, s.begin():
        s.add_all(rows)
    made.dispose()


NOW = datetime(2026, 11, 20, 10, 0, 0, 123456, tzinfo=timezone.utc)


def change(**kw: Any) -> IncidentChange:
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
