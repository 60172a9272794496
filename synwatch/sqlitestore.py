"""The service's history on an SQLite file, through Python's sqlite3 module.

SQLAlchemy's imports alone are 28 MiB of a resident service (docs/benchmarks.md, "Footprint"),
more than all the rest of synwatch; fail2ban keeps its history with sqlite3 the same way. The
schema is still SQLAlchemy's and Alembic's (synwatch/store/models.py, migrations): the service
migrates in a child process (``python -m synwatch.migrate``) so the import never lands in it,
then writes and reads the rows here, stored exactly as SQLAlchemy stores them (naive UTC times
as text, JSON as text). tests/test_sqlitestore.py runs the same calls on this and on
``synwatch.store.Store`` and compares what each leaves in the tables.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from synwatch.config import nearest_existing, sqlite_file
from synwatch.errors import StoreError, StoreOutage
from synwatch.historyreader import (
    BAN_COLUMNS,
    RUN_COLUMNS,
    ban_columns,
    ban_of,
    head_revision,
    run_of,
    utc,
)
from synwatch.records import ActionRun, Ban, IncidentChange, NewEvent

PRUNE_BATCH = 2000  # rows per transaction (as synwatch/store/retention.py)
MIN_FREE = 1 << 20  # bytes: less free space than this on the history's disk is an outage
PING_WAIT = 0.2  # seconds the away thread's test waits for another writer's lock
# Result codes of a file that cannot be written for now: busy or locked by another writer, out
# of memory, read-only, I/O error, corrupt, full, cannot open, locking protocol, not a
# database. SQLITE_ERROR (a bad statement, no such table) is a bug, not an outage.
OUTAGE_CODES = frozenset({5, 6, 7, 8, 10, 11, 13, 14, 15, 26})
EVENT_FIELDS = ("time", "source", "trusted", "kind", "family", "address", "port", "mode",
                "source_ip", "source_port", "message", "pattern", "dedup_key", "historical")


def stamp(value: datetime | None) -> str | None:
    """A time as SQLAlchemy keeps it in SQLite: naive UTC text with microseconds."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to the store")
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def migrate_in_child(url: str, host: str) -> None:
    """Create and migrate the history in a child process (Alembic and SQLAlchemy stay there)."""
    done = subprocess.run([sys.executable, "-m", "synwatch.migrate", url, host],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False)
    sys.stderr.write("".join(line + "\n" for line in done.stderr.splitlines()
                             if not line.startswith("synwatch: ")))
    if done.returncode != 0:
        why = [line for line in done.stderr.splitlines() if line.startswith("synwatch: ")]
        raise StoreError(url, why[-1].split(": ", 2)[-1] if why else
                         f"migration exited with status {done.returncode}")


class SQLiteStore:
    """``ServiceStore`` (synwatch/storeapi.py) on an SQLite file of the current schema."""

    dialect = "sqlite"

    def __init__(self, url: str, host: str, busy_timeout: float = 5.0) -> None:
        db = sqlite_file(url)
        if db is None:
            raise StoreError(url, "not an SQLite file URL")
        self.url, self.host, self.path = url, host, db
        try:
            # autocommit: each method is one transaction of its own (BEGIN IMMEDIATE below)
            self.conn = sqlite3.connect(db, isolation_level=None, timeout=busy_timeout)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            st = db.stat()
        except (sqlite3.Error, OSError) as exc:
            raise _error(url, exc) from exc
        # the file this connection writes: one deleted or replaced under the service takes
        # writes that nobody will ever read, so each write checks it is still the history
        self.identity = (st.st_dev, st.st_ino)

    @classmethod
    def open(cls, url: str, host: str) -> SQLiteStore:
        """Migrated first, in a child process, when the schema is not the newest."""
        prepare(url, host)
        return cls(url, host)

    def migrate(self) -> None:
        prepare(self.url, self.host)

    def ping(self) -> None:
        """Could a write succeed now? From any thread (the spool's away thread), on a
        connection of its own: the file is still the one the service writes, its disk has
        room, and no other writer holds the lock."""
        self.check_file()
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=PING_WAIT)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise _error(self.url, exc) from exc

    def check_file(self) -> None:
        """The history file is the one opened, and its disk has room (a write to a full disk
        fails only once SQLite needs a new page, and one to a deleted file never fails)."""
        try:
            st = self.path.stat()
            vfs = os.statvfs(self.path)
        except OSError as exc:
            raise StoreOutage(self.url, f"the history file is gone ({exc.strerror}); nothing "
                              "is recorded until synwatch restarts, which starts a new one") \
                from exc
        if (st.st_dev, st.st_ino) != self.identity:
            raise StoreOutage(self.url, "the history file was replaced; nothing is recorded "
                              "until synwatch restarts")
        if vfs.f_bavail * vfs.f_frsize < MIN_FREE:
            raise StoreOutage(self.url, "the disk is full")

    @property
    def display_url(self) -> str:
        return self.url

    def close(self) -> None:
        self.conn.close()

    def set_busy_timeout(self, seconds: float) -> None:
        self.conn.execute(f"PRAGMA busy_timeout={int(seconds * 1000)}")

    def schema_revision(self) -> str | None:
        return _revision(self.path)

    # -- plumbing ------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        self.check_file()
        cur = self.conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _error(self.url, exc) from exc
        finally:
            cur.close()

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return list(self.conn.execute(sql, [stamp(p) if isinstance(p, datetime) else p
                                                for p in params]))
        except sqlite3.Error as exc:
            raise _error(self.url, exc) from exc

    # -- recording ------------------------------------------------------------------------------

    def insert_events(self, events: Sequence[NewEvent], now: datetime,
                      position: tuple[str, dict[str, Any]] | None = None) -> list[int | None]:
        """As ``Store.insert_events``: new events and the position in one transaction; an
        entry this node has recorded before is skipped (None)."""
        keys = [e.dedup_key for e in events if e.dedup_key]
        ids: list[int | None] = []
        with self._write() as cur:
            known = {r[0] for start in range(0, len(keys), 500) for r in cur.execute(
                "SELECT dedup_key FROM events WHERE host = ? AND dedup_key IN "
                f"({', '.join('?' * len(keys[start:start + 500]))})",
                [self.host, *keys[start:start + 500]])}
            for e in events:
                if e.dedup_key and e.dedup_key in known:
                    ids.append(None)
                    continue
                if e.dedup_key:
                    known.add(e.dedup_key)
                values = [stamp(e.time), e.source, e.trusted, e.kind, e.family, e.address,
                          e.port, e.mode, e.source_ip, e.source_port, e.message, e.pattern,
                          e.dedup_key, e.historical]
                cur.execute(f"INSERT INTO events (recorded_at, host, {', '.join(EVENT_FIELDS)})"
                            f" VALUES (?, ?, {', '.join('?' * len(EVENT_FIELDS))})",
                            [stamp(now), self.host, *values])
                ids.append(cur.lastrowid)
            if position is not None:
                cur.execute("INSERT INTO source_positions (host, source, position, updated_at) "
                            "VALUES (?, ?, ?, ?) ON CONFLICT (host, source) DO UPDATE SET "
                            "position = excluded.position, updated_at = excluded.updated_at",
                            [self.host, position[0], json.dumps(position[1]), stamp(now)])
        return ids

    def save_incident(self, c: IncidentChange) -> int:
        fields: dict[str, Any] = {
            "host": c.host, "netns": c.netns, "address": c.address, "port": c.port,
            "family": c.family, "status": c.status, "verdict": c.verdict, "trigger": c.trigger,
            "opened_at": stamp(c.opened_at), "closed_at": stamp(c.closed_at),
            "first_evidence_at": stamp(c.first_evidence_at),
            "detected_at": stamp(c.detected_at), "peak_syn_recv": c.peak_syn_recv,
            "top_prefixes": json.dumps([{"prefix": p, "count": n, "share": sh, "completed": k}
                                        for p, n, sh, k in c.top_prefixes]),
            "recommendations": json.dumps(list(c.recommendations)),
            "evidence": json.dumps({**c.state, "reasons": list(c.reasons)}),
        }
        with self._write() as cur:
            incident_id = c.incident_id
            if incident_id is not None:
                cur.execute(f"UPDATE incidents SET {', '.join(f'{k} = ?' for k in fields)} "
                            "WHERE id = ?", [*fields.values(), incident_id])
            if incident_id is None or cur.rowcount == 0:
                # an id the file does not have (a history deleted under the service, then
                # started anew) keeps its number: the spool's later writes name it
                given = {"id": incident_id, **fields} if incident_id is not None else fields
                cur.execute(f"INSERT INTO incidents ({', '.join(given)}) "
                            f"VALUES ({', '.join('?' * len(given))})", list(given.values()))
                incident_id = cur.lastrowid
            assert incident_id is not None
            if c.sample is not None:
                x = c.sample
                cur.execute("INSERT INTO evidence_samples (incident_id, at, syn_recv, "
                            "accept_queue, backlog, rates, top_prefixes) VALUES "
                            "(?, ?, ?, ?, ?, ?, ?)",
                            [incident_id, stamp(x.at), x.syn_recv, x.accept_queue, x.backlog,
                             json.dumps(x.rates),
                             json.dumps([[p, n] for p, n in x.top_prefixes])])
            for start in range(0, len(c.event_ids), 500):
                chunk = list(c.event_ids[start:start + 500])
                cur.execute(f"UPDATE events SET incident_id = ? WHERE id IN "
                            f"({', '.join('?' * len(chunk))})", [incident_id, *chunk])
            return incident_id

    def add_action_runs(self, runs: Sequence[ActionRun]) -> None:
        with self._write() as cur:
            cur.executemany(
                "INSERT INTO action_runs (incident_id, action, target, status, at, rendered, "
                "detail, retry_at, host) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.incident_id, r.action, r.target[:255], r.status, stamp(r.at), r.rendered,
                  r.detail, stamp(r.retry_at), r.host or self.host) for r in runs])

    def add_bans(self, bans: Sequence[Ban]) -> list[int]:
        ids = []
        with self._write() as cur:
            for b in bans:
                cur.execute("INSERT INTO bans (prefix, backend, netns, incident_id, created_at, "
                            "expires_at, removed_at, times_banned, host, scope, origin_id) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [b.prefix, b.backend, b.netns, b.incident_id, stamp(b.created_at),
                             stamp(b.expires_at), stamp(b.removed_at), b.times_banned,
                             b.host or self.host, b.scope, b.origin_id])
                assert cur.lastrowid is not None
                ids.append(cur.lastrowid)
        return ids

    def mark_removed(self, ban_ids: Sequence[int | None], now: datetime, *,
                     everywhere: bool = False) -> None:
        """As ``Store.mark_removed``: with ``everywhere``, a fleet ban goes with its copies."""
        ids = {i for i in ban_ids if i is not None}
        if not ids:
            return
        with self._write() as cur:
            if everywhere:
                marks = ", ".join("?" * len(ids))
                fleet = cur.execute(f"SELECT id, origin_id FROM bans WHERE id IN ({marks}) "
                                    "AND scope = 'fleet'", list(ids)).fetchall()
                origins = list({origin or ban for ban, origin in fleet})
                if origins:
                    omarks = ", ".join("?" * len(origins))
                    ids |= {r[0] for r in cur.execute(
                        f"SELECT id FROM bans WHERE (id IN ({omarks}) OR origin_id IN "
                        f"({omarks})) AND removed_at IS NULL", origins + origins)}
            marks = ", ".join("?" * len(ids))
            cur.execute(f"UPDATE bans SET removed_at = ? WHERE id IN ({marks}) "
                        "AND removed_at IS NULL", [stamp(now), *ids])

    def heartbeat(self, pid: int, started_at: datetime, now: datetime, version: str) -> None:
        with self._write() as cur:
            cur.execute("INSERT INTO nodes (host, pid, started_at, seen_at, version) VALUES "
                        "(?, ?, ?, ?, ?) ON CONFLICT (host) DO UPDATE SET pid = excluded.pid, "
                        "started_at = excluded.started_at, seen_at = excluded.seen_at, "
                        "version = excluded.version",
                        [self.host, pid, stamp(started_at), stamp(now), version[:32]])

    # -- carried over a restart ----------------------------------------------------------------

    def get_position(self, source: str) -> dict[str, Any] | None:
        rows = self._read("SELECT position FROM source_positions WHERE host = ? AND source = ?",
                          [self.host, source])
        return dict(json.loads(rows[0][0])) if rows else None

    def open_incidents(self, host: str, netns: str) -> list[IncidentChange]:
        rows = self._read("SELECT id, host, netns, address, port, family, verdict, trigger, "
                          "opened_at, first_evidence_at, detected_at, peak_syn_recv, "
                          "recommendations, evidence FROM incidents WHERE status = 'open' "
                          "AND host = ? AND netns = ?", [host, netns])
        verdicts = ("capacity", "concentrated", "spoofed", "unknown")
        return [IncidentChange(
            change="updated", serial=0, incident_id=r[0], host=r[1], netns=r[2], address=r[3],
            port=r[4], family=r[5], status="open",
            verdict=r[6] if r[6] in verdicts else "unknown",
            trigger=r[7] if r[7] in ("log", "half_open") else "counters",
            opened_at=utc(r[8]) or datetime.now(timezone.utc), closed_at=None,
            first_evidence_at=utc(r[9]), detected_at=utc(r[10]) or utc(r[8])
            or datetime.now(timezone.utc), peak_syn_recv=r[11], top_prefixes=(),
            recommendations=tuple(json.loads(r[12])), reasons=(),
            state=dict(json.loads(r[13]))) for r in rows]

    def latest_runs(self, action: str, host: str, netns: str,
                    since: datetime) -> list[ActionRun]:
        columns = ", ".join(f"r.{c.strip()}" for c in RUN_COLUMNS.split(","))
        latest: dict[tuple[int | None, str], ActionRun] = {}
        for r in self._read(f"SELECT {columns} FROM action_runs r JOIN incidents i ON "
                            "r.incident_id = i.id WHERE r.action = ? AND r.at >= ? AND "
                            "r.host = ? AND i.host = ? AND i.netns = ? ORDER BY r.at, r.id",
                            [action, since, host, host, netns]):
            run = run_of(r)
            latest[run.incident_id, run.target] = run
        return list(latest.values())

    def action_runs(self, incident_id: int) -> list[ActionRun]:
        return [run_of(r) for r in self._read(
            f"SELECT {RUN_COLUMNS} FROM action_runs WHERE incident_id = ? "
            "ORDER BY at, id", [incident_id])]

    def saved_setting(self, netns: str, name: str) -> str | None:
        rows = self._read("SELECT value FROM saved_settings WHERE host = ? AND netns = ? AND "
                          "name = ?", [self.host, netns, name])
        return str(rows[0][0]) if rows else None

    def save_setting(self, netns: str, name: str, value: str, now: datetime) -> None:
        with self._write() as cur:
            cur.execute("INSERT INTO saved_settings (host, netns, name, value, saved_at) VALUES "
                        "(?, ?, ?, ?, ?) ON CONFLICT (host, netns, name) DO UPDATE SET "
                        "value = excluded.value, saved_at = excluded.saved_at",
                        [self.host, netns, name, value, stamp(now)])

    def saved_settings(self) -> list[tuple[str, str, str]]:
        return [(r[0], r[1], r[2]) for r in self._read(
            "SELECT netns, name, value FROM saved_settings WHERE host = ?", [self.host])]

    def forget_setting(self, netns: str, name: str) -> None:
        with self._write() as cur:
            cur.execute("DELETE FROM saved_settings WHERE host = ? AND netns = ? AND name = ?",
                        [self.host, netns, name])

    # -- bans -----------------------------------------------------------------------------------

    def active_bans(self, netns: str, now: datetime, backend: str | None = None) -> list[Ban]:
        extra, params = (" AND backend = ?", [backend]) if backend is not None else ("", [])
        return [ban_of(r) for r in self._read(
            f"SELECT {BAN_COLUMNS} FROM bans WHERE host = ? AND netns = ? AND "
            f"removed_at IS NULL AND expires_at > ?{extra} ORDER BY created_at, id",
            [self.host, netns, now, *params])]

    def expired_bans(self, netns: str, now: datetime, backend: str) -> list[Ban]:
        return [ban_of(r) for r in self._read(
            f"SELECT {BAN_COLUMNS} FROM bans WHERE host = ? AND netns = ? AND "
            "backend = ? AND removed_at IS NULL AND expires_at <= ?",
            [self.host, netns, backend, now])]

    def times_banned(self, netns: str, prefix: str) -> int:
        return int(self._read("SELECT count(*) FROM bans WHERE host = ? AND netns = ? AND "
                              "prefix = ?", [self.host, netns, prefix])[0][0])

    def incident_bans(self, incident_id: int) -> set[str]:
        return {r[0] for r in self._read("SELECT prefix FROM bans WHERE host = ? AND "
                                         "incident_id = ?", [self.host, incident_id])}

    def fleet_bans_to_copy(self, now: datetime, after: int = 0,
                           limit: int | None = None) -> list[Ban]:
        page = (" AND b.id > ? ORDER BY b.id LIMIT ?", [after, limit]) if limit is not None \
            else (" ORDER BY b.created_at, b.id", [])
        return [ban_of(r) for r in self._read(
            f"SELECT {ban_columns('b.')} FROM bans b WHERE b.scope = 'fleet' AND "
            "b.origin_id IS NULL AND b.host != ? AND b.removed_at IS NULL AND "
            "b.expires_at > ? AND NOT EXISTS (SELECT 1 FROM bans m WHERE m.origin_id = b.id "
            f"AND m.host = ?){page[0]}", [self.host, now, self.host, *page[1]])]

    # -- retention ------------------------------------------------------------------------------

    def prune_events(self, before: datetime, batch: int = PRUNE_BATCH) -> int:
        with self._write() as cur:
            cur.execute("DELETE FROM events WHERE id IN (SELECT id FROM events WHERE host = ? "
                        "AND coalesce(time, recorded_at) < ? LIMIT ?)",
                        [self.host, stamp(before), batch])
            return cur.rowcount

    def prune_incidents(self, before: datetime, now: datetime, batch: int = 200) -> int:
        with self._write() as cur:
            ids = [r[0] for r in cur.execute(
                "SELECT i.id FROM incidents i WHERE i.host = ? AND i.status = 'closed' AND "
                "i.closed_at < ? AND NOT EXISTS (SELECT 1 FROM bans b WHERE "
                "b.incident_id = i.id AND b.removed_at IS NULL AND b.expires_at > ?) LIMIT ?",
                [self.host, stamp(before), stamp(now), batch])]
            if ids:
                marks = ", ".join("?" * len(ids))
                for sql in ("UPDATE events SET incident_id = NULL WHERE incident_id IN ({})",
                            "DELETE FROM evidence_samples WHERE incident_id IN ({})",
                            "DELETE FROM action_runs WHERE incident_id IN ({})",
                            "DELETE FROM bans WHERE incident_id IN ({})",
                            "DELETE FROM incidents WHERE id IN ({})"):
                    cur.execute(sql.format(marks), ids)
            return len(ids)


def prepare(url: str, host: str) -> None:
    """The history file created and migrated to the newest schema (in a child process) unless
    it already is. From any thread: the spool's away thread prepares a history that could not
    be opened at the start (a read-only or full disk)."""
    db = sqlite_file(url)
    if db is not None and not db.exists():
        # cheap first (the away thread tries this while the start could not open it): a
        # directory that cannot take the file needs no migration child to say so
        where = nearest_existing(db)
        if where is None or not where.is_dir() or not os.access(where, os.W_OK):
            raise StoreOutage(url, f"{where or db.parent} cannot take the history file")
    if db is None or not db.exists() or _revision(db) != head_revision():
        migrate_in_child(url, host)


def _error(url: str, exc: sqlite3.Error | OSError) -> StoreError:
    """sqlite3's error as ours. Locked, busy, full, read-only, I/O errors and files that are
    not (or no longer) a database are outages: the service spools and acts on; a refused row
    (IntegrityError) or a bad statement is a bug and says so."""
    why = (str(exc).splitlines() or [type(exc).__name__])[0]
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(exc, OSError):
        outage = True
    elif code is not None:  # the primary result code (https://sqlite.org/rescode.html)
        outage = (code & 0xFF) in OUTAGE_CODES
    else:  # Python before 3.11: the classes are all there is
        outage = isinstance(exc, sqlite3.OperationalError) and "syntax error" not in why \
            and "no such" not in why
    return (StoreOutage if outage else StoreError)(url, why)


def _revision(db: os.PathLike[str] | str) -> str | None:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return str(rows[0][0]) if rows else None
