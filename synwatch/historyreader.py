"""The CLI's lists, read with the database's own driver (sqlite3, psycopg) instead of through
SQLAlchemy, whose import alone is about 0.25 s of every `incidents list`: an admin's query on an
empty history took 0.42 s, most of it importing the ORM.

Only a history whose schema is current is read here (the revision in ``alembic_version``
against the newest migration file); anything else (no file yet, an older schema that needs its
migrations, a driver that is not there) goes through ``synwatch.store.Store``, which migrates.
The queries are the same as ``synwatch/store/queries.py`` and return the same records; a test
holds the two to the same answers on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from synwatch.config import sqlite_file
from synwatch.records import ActionRun, Ban, Incident, RecordedEvent

VERSIONS = Path(__file__).resolve().parent / "store" / "migrations" / "versions"
PSYCOPG = "postgresql+psycopg://"
EVENT_COLUMNS = ("id, time, recorded_at, source, trusted, historical, kind, family, address, "
                 "port, mode, source_ip, source_port, host, message, pattern, dedup_key, "
                 "incident_id")
INCIDENT_COLUMNS = ("id, host, netns, address, port, family, status, verdict, trigger, "
                    "opened_at, closed_at, first_evidence_at, detected_at, peak_syn_recv, "
                    "top_prefixes, recommendations, evidence")
RUN_COLUMNS = "incident_id, action, target, status, at, rendered, detail, retry_at, id, host"
# Times a row may hold that Python cannot (PostgreSQL's 'infinity', years past 9999: psycopg
# refuses to load them, and one such row made every read of the table fail): read as these
# bounds instead, which the fleet copy refuses and the lists show. Literals both databases
# compare with their own times (SQLite: as text, where 'infinity' and other words sort above).
TIME_MAX, TIME_MIN = "9999-12-30 00:00:00", "0001-01-02 00:00:00"


def in_range(column: str) -> str:
    """SQL for ``column`` (a time) as Python can hold it: clamped to [TIME_MIN, TIME_MAX]."""
    return (f"CASE WHEN {column} > '{TIME_MAX}' THEN '{TIME_MAX}' WHEN {column} < '{TIME_MIN}' "
            f"THEN '{TIME_MIN}' ELSE {column} END")


def ban_columns(alias: str = "") -> str:
    """The columns ``ban_of`` reads, of the table ``alias`` (e.g. "b."), the times clamped."""
    a = alias
    return (f"{a}prefix, {a}backend, {a}netns, {a}incident_id, {in_range(a + 'created_at')}, "
            f"{in_range(a + 'expires_at')}, {in_range(a + 'removed_at')}, {a}times_banned, "
            f"{a}id, {a}host, {a}scope, {a}origin_id")


BAN_COLUMNS = ban_columns()


class HistoryQueries(Protocol):
    """What the CLI's lists read: Store (synwatch/store/queries.py) and Reader both do."""

    host: str

    def events(self, since: datetime | None = None, limit: int | None = None,
               host: str | None = None) -> list[RecordedEvent]: ...

    def incidents(self, since: datetime | None = None, port: int | None = None, *,
                  verdict: str | None = None, limit: int | None = None,
                  status: str | None = None, host: str | None = None) -> list[Incident]: ...

    def actions_by_incident(self, ids: Sequence[int]) -> dict[int, list[ActionRun]]: ...

    def bans(self, host: str | None = None) -> list[Ban]: ...

    def ban_checks(self, host: str | None = None) -> dict[tuple[str, str, str], str]: ...


def head_revision() -> str | None:
    """The newest migration: the revision no other migration revises."""
    revisions, revised = set(), set()
    for path in VERSIONS.glob("*.py"):
        source = path.read_text(encoding="utf-8")
        found = re.search(r'^revision = "([^"]+)"', source, re.MULTILINE)
        down = re.search(r'^down_revision = "([^"]+)"', source, re.MULTILINE)
        if found:
            revisions.add(found.group(1))
        if down:
            revised.add(down.group(1))
    heads = sorted(revisions - revised)
    return heads[0] if len(heads) == 1 else None


def utc(value: Any) -> datetime | None:
    """A time as the driver gives it: SQLite's naive UTC text, PostgreSQL's aware datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def ban_of(r: Sequence[Any]) -> Ban:
    """A row of BAN_COLUMNS as a record (sqlite3 and psycopg rows alike)."""
    now = datetime.now(timezone.utc)
    return Ban(prefix=r[0], backend=r[1], netns=r[2], incident_id=r[3],
               created_at=utc(r[4]) or now, expires_at=utc(r[5]) or now,
               removed_at=utc(r[6]), times_banned=r[7], id=r[8], host=r[9], scope=r[10],
               origin_id=r[11])


def run_of(r: Sequence[Any]) -> ActionRun:
    """A row of RUN_COLUMNS as a record."""
    return ActionRun(incident_id=r[0], action=r[1], target=r[2], status=r[3],
                     at=utc(r[4]) or datetime.now(timezone.utc), rendered=r[5], detail=r[6],
                     retry_at=utc(r[7]), id=r[8], host=r[9] or "")


class Reader:
    """A read-only connection to a history of the current schema."""

    def __init__(self, conn: Any, dialect: str, host: str) -> None:
        self.conn, self.dialect, self.host = conn, dialect, host

    @classmethod
    def open(cls, url: str, host: str) -> Reader | None:
        """The reader, or None when Store must open the history (see the module's doc)."""
        try:
            conn, dialect = _connect(url)
        except (ImportError, sqlite3.Error):
            return None
        except Exception as exc:  # psycopg's errors: not imported unless PostgreSQL is used
            if type(exc).__module__.startswith("psycopg"):
                return None
            raise
        if conn is None:
            return None
        reader = cls(conn, dialect, host)
        try:
            current = reader._rows("SELECT version_num FROM alembic_version", [])
        except Exception:
            conn.close()
            return None
        if [r[0] for r in current] != [head_revision()]:
            conn.close()
            return None
        return reader

    def close(self) -> None:
        self.conn.close()

    def _param(self, value: Any) -> Any:
        if isinstance(value, datetime) and self.dialect == "sqlite":
            # as SQLAlchemy stores it in SQLite: naive UTC text, compared as text
            return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
        return value

    def _rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        if self.dialect == "postgresql":
            sql = sql.replace("?", "%s")
        cur = self.conn.cursor()
        try:
            cur.execute(sql, [self._param(p) for p in params])
            return list(cur.fetchall())
        finally:
            cur.close()

    def events(self, since: datetime | None = None, limit: int | None = None,
               host: str | None = None) -> list[RecordedEvent]:
        where, params = _where([("host = ?", host),
                                ("coalesce(time, recorded_at) >= ?", since)])
        order = "coalesce(time, recorded_at) {0}, id {0}"
        sql = f"SELECT {EVENT_COLUMNS} FROM events{where} ORDER BY "
        if limit is not None:
            rows = self._rows(sql + order.format("DESC") + " LIMIT ?", [*params, limit])[::-1]
        else:
            rows = self._rows(sql + order.format("ASC"), params)
        return [RecordedEvent(
            id=r[0], time=utc(r[1]), recorded_at=utc(r[2]) or datetime.now(timezone.utc),
            source=r[3], trusted=bool(r[4]), historical=bool(r[5]), kind=r[6], family=r[7],
            address=r[8], port=r[9], mode=r[10], source_ip=r[11], source_port=r[12],
            host=r[13], message=r[14], pattern=r[15], dedup_key=r[16], incident_id=r[17])
            for r in rows]

    def incidents(self, since: datetime | None = None, port: int | None = None, *,
                  verdict: str | None = None, limit: int | None = None,
                  status: str | None = None, host: str | None = None) -> list[Incident]:
        where, params = _where([("host = ?", host), ("status = ?", status),
                                ("opened_at >= ?", since), ("port = ?", port),
                                ("verdict = ?", verdict)])
        sql = f"SELECT {INCIDENT_COLUMNS} FROM incidents{where} ORDER BY "
        if limit is not None:
            rows = self._rows(sql + "opened_at DESC, id DESC LIMIT ?", [*params, limit])[::-1]
        else:
            rows = self._rows(sql + "opened_at, id", params)
        return [Incident(
            id=r[0], host=r[1], netns=r[2], address=r[3], port=r[4], family=r[5], status=r[6],
            verdict=r[7], trigger=r[8], opened_at=utc(r[9]) or datetime.now(timezone.utc),
            closed_at=utc(r[10]), first_evidence_at=utc(r[11]), detected_at=utc(r[12]),
            peak_syn_recv=r[13], top_prefixes=tuple(dict(p) for p in _json(r[14])),
            recommendations=tuple(_json(r[15])), state=dict(_json(r[16]))) for r in rows]

    def actions_by_incident(self, ids: Sequence[int]) -> dict[int, list[ActionRun]]:
        out: dict[int, list[ActionRun]] = {i: [] for i in ids}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            marks = ", ".join("?" * len(chunk))
            for r in self._rows(f"SELECT {RUN_COLUMNS} FROM action_runs "
                                f"WHERE incident_id IN ({marks}) ORDER BY at, id", chunk):
                out[r[0]].append(run_of(r))
        return out

    def bans(self, host: str | None = None) -> list[Ban]:
        where, params = _where([("host = ?", host)])
        return [ban_of(r) for r in self._rows(f"SELECT {BAN_COLUMNS} FROM bans{where} "
                                              "ORDER BY created_at, id", params)]

    def ban_checks(self, host: str | None = None) -> dict[tuple[str, str, str], str]:
        """What the ban reconcile last found (synwatch/banproof.py): (host, netns, name) ->
        value of the ``ban.*`` saved settings."""
        where, params = _where([("name LIKE ?", "ban.%"), ("host = ?", host)])
        return {(r[0], r[1], r[2]): r[3] for r in self._rows(
            f"SELECT host, netns, name, value FROM saved_settings{where}", params)}


def _where(conditions: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
    used = [(sql, value) for sql, value in conditions if value is not None]
    if not used:
        return "", []
    return " WHERE " + " AND ".join(sql for sql, _ in used), [v for _, v in used]


def _connect(url: str) -> tuple[Any, str]:
    db = sqlite_file(url)
    if db is not None:
        if not db.exists():
            return None, "sqlite"
        return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5), "sqlite"
    if url.startswith(PSYCOPG):
        import psycopg  # noqa: PLC0415 - only for a PostgreSQL history

        return psycopg.connect(libpq_uri(url), autocommit=True, connect_timeout=10), "postgresql"
    return None, ""


def libpq_uri(url: str) -> str:
    """An SQLAlchemy ``postgresql+psycopg://`` URL as the libpq URI it is beside the driver
    name (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING-URIS)."""
    return "postgresql://" + url.removeprefix(PSYCOPG)
