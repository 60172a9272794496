"""The columns the history reads and the records its rows become, each written once. Rows come
from sqlite3 and psycopg alike: times as SQLite's naive UTC text or PostgreSQL's aware datetimes,
JSON as text or already parsed, booleans as 0/1 or bool."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, cast, get_args

from synwatch.records import (
    ActionRun,
    Ban,
    Incident,
    IncidentChange,
    Node,
    RecordedEvent,
    StoredPoint,
    Trigger,
    Verdict,
)

EVENT_FIELDS = ("time", "source", "trusted", "kind", "family", "address", "port", "mode",
                "source_ip", "source_port", "message", "pattern", "dedup_key", "historical")
EVENT_COLUMNS = ("id, time, recorded_at, source, trusted, historical, kind, family, address, "
                 "port, mode, source_ip, source_port, host, message, pattern, dedup_key, "
                 "incident_id")
INCIDENT_COLUMNS = ("id, host, netns, address, port, family, status, verdict, trigger, "
                    "opened_at, closed_at, first_evidence_at, detected_at, peak_syn_recv, "
                    "top_prefixes, recommendations, evidence")
RUN_FIELDS = ("incident_id", "action", "target", "status", "at", "rendered", "detail",
              "retry_at", "id", "host")
RUN_COLUMNS = ", ".join(RUN_FIELDS)
POINT_COLUMNS = "id, incident_id, at, syn_recv, accept_queue, backlog, rates, top_prefixes"
NODE_COLUMNS = "host, pid, started_at, seen_at, version"
# Times a row may hold that Python cannot (PostgreSQL's 'infinity', years past 9999: psycopg
# refuses to load them, and one such row made every read of the table fail): read as these
# bounds instead, which the fleet copy refuses and the lists show. Literals both databases
# compare with their own times (SQLite: as text, where 'infinity' and other words sort above).
TIME_MAX, TIME_MIN = "9999-12-30 00:00:00", "0001-01-02 00:00:00"
VERDICTS: tuple[str, ...] = get_args(Verdict)
TRIGGERS: tuple[str, ...] = get_args(Trigger)


def in_range(column: str) -> str:
    """SQL for ``column`` (a time) as Python can hold it: clamped to [TIME_MIN, TIME_MAX]."""
    return (f"CASE WHEN {column} > '{TIME_MAX}' THEN '{TIME_MAX}' WHEN {column} < '{TIME_MIN}' "
            f"THEN '{TIME_MIN}' ELSE {column} END")


def loadable(*columns: str) -> str:
    """SQL: every one of ``columns`` holds a time Python can (for rows the service acts on:
    one 'infinity', written by anyone who can write the table, must not stop it)."""
    return " AND ".join(f"{c} > '{TIME_MIN}' AND {c} < '{TIME_MAX}'" for c in columns)


def ban_columns(alias: str = "") -> str:
    """The columns ``ban_of`` reads, of the table ``alias`` (e.g. "b."), the times clamped."""
    a = alias
    return (f"{a}prefix, {a}backend, {a}netns, {a}incident_id, {in_range(a + 'created_at')}, "
            f"{in_range(a + 'expires_at')}, {in_range(a + 'removed_at')}, {a}times_banned, "
            f"{a}id, {a}host, {a}scope, {a}origin_id")


BAN_COLUMNS = ban_columns()


def utc(value: Any) -> datetime | None:
    """A time as the driver gives it: SQLite's naive UTC text, PostgreSQL's aware datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value if value.tzinfo is timezone.utc else value.astimezone(timezone.utc)


def when(value: Any) -> datetime:
    """A time that the schema never leaves empty."""
    return utc(value) or datetime.now(timezone.utc)


def parsed(value: Any) -> Any:
    """A JSON column: text from SQLite, already parsed by psycopg."""
    return json.loads(value) if isinstance(value, str) else value


def verdict(text: str) -> Verdict:
    return cast(Verdict, text) if text in VERDICTS else "unknown"


def trigger(text: str) -> Trigger:
    return cast(Trigger, text) if text in TRIGGERS else "counters"


def event_of(r: Sequence[Any]) -> RecordedEvent:
    return RecordedEvent(
        id=r[0], time=utc(r[1]), recorded_at=when(r[2]), source=r[3], trusted=bool(r[4]),
        historical=bool(r[5]), kind=r[6], family=r[7], address=r[8], port=r[9], mode=r[10],
        source_ip=r[11], source_port=r[12], host=r[13], message=r[14], pattern=r[15],
        dedup_key=r[16], incident_id=r[17])


def incident_of(r: Sequence[Any]) -> Incident:
    return Incident(
        id=r[0], host=r[1], netns=r[2], address=r[3], port=r[4], family=r[5], status=r[6],
        verdict=r[7], trigger=r[8], opened_at=when(r[9]), closed_at=utc(r[10]),
        first_evidence_at=utc(r[11]), detected_at=utc(r[12]), peak_syn_recv=r[13],
        top_prefixes=tuple(dict(p) for p in parsed(r[14])),
        recommendations=tuple(parsed(r[15])), state=dict(parsed(r[16])))


def resumed_of(r: Sequence[Any]) -> IncidentChange:
    """A row of INCIDENT_COLUMNS left open (by a stop or a crash) as the change the correlator
    resumes."""
    opened = when(r[9])
    return IncidentChange(
        change="updated", serial=0, incident_id=r[0], host=r[1], netns=r[2], address=r[3],
        port=r[4], family=r[5], status="open", verdict=verdict(r[7]), trigger=trigger(r[8]),
        opened_at=opened, closed_at=None, first_evidence_at=utc(r[11]),
        detected_at=utc(r[12]) or opened, peak_syn_recv=r[13], top_prefixes=(),
        recommendations=tuple(parsed(r[15])), reasons=(), state=dict(parsed(r[16])))


def run_of(r: Sequence[Any]) -> ActionRun:
    return ActionRun(incident_id=r[0], action=r[1], target=r[2], status=r[3], at=when(r[4]),
                     rendered=r[5], detail=r[6], retry_at=utc(r[7]), id=r[8], host=r[9] or "")


def ban_of(r: Sequence[Any]) -> Ban:
    return Ban(prefix=r[0], backend=r[1], netns=r[2], incident_id=r[3], created_at=when(r[4]),
               expires_at=when(r[5]), removed_at=utc(r[6]), times_banned=r[7], id=r[8],
               host=r[9], scope=r[10], origin_id=r[11])


def point_of(r: Sequence[Any]) -> StoredPoint:
    return StoredPoint(id=r[0], incident_id=r[1], at=when(r[2]), syn_recv=r[3],
                       accept_queue=r[4], backlog=r[5], rates=dict(parsed(r[6])),
                       top_prefixes=tuple((str(p), int(n)) for p, n in parsed(r[7])))


def node_of(r: Sequence[Any]) -> Node:
    return Node(r[0], r[1], when(r[2]), when(r[3]), r[4])
