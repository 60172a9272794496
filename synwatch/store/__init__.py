"""The history: opening (and migrating) the database, recording, and querying.

Only this package talks to SQLAlchemy sessions. SQLite runs in WAL mode with a busy timeout so
the CLI can read while the service writes; migrations ship in the package and run at open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, case, create_engine, event, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from synwatch.doctor import PortHistory
from synwatch.errors import NotFound, StoreError
from synwatch.records import IncidentChange, Trigger
from synwatch.store.models import (
    ActionRun,
    Ban,
    Event,
    EvidenceSample,
    Incident,
    SavedSetting,
    SourcePosition,
)

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


@dataclass(frozen=True, slots=True)
class NewEvent:
    """What a source hands the store for one matched kernel line."""

    time: datetime | None
    source: str
    trusted: bool
    kind: str
    family: int | None
    address: str | None
    port: int | None
    mode: str | None
    source_ip: str | None
    source_port: int | None
    host: str | None
    message: str
    pattern: str
    dedup_key: str | None = None
    historical: bool = False


BUSY_TIMEOUT = 5.0  # seconds a write waits for another writer's lock (the CLI, migrations)


def _sqlite_pragmas(store: Store) -> Any:
    def set_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(store.busy_timeout * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()
    return set_pragmas


def _trigger(text: str) -> Trigger:
    return "log" if text == "log" else "half_open" if text == "half_open" else "counters"


class Store:
    def __init__(self, url: str, engine: Engine) -> None:
        self.url = url
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self.busy_timeout = BUSY_TIMEOUT

    def set_busy_timeout(self, seconds: float) -> None:
        """How long a write waits for another writer's lock from now on. The service waits
        briefly and retries later, so a locked store never holds detection up."""
        self.busy_timeout = seconds
        self.engine.dispose()  # pooled connections reconnect with the new pragma

    @property
    def display_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    @classmethod
    def open(cls, url: str, *, migrate: bool = True) -> Store:
        try:
            parsed = make_url(url)
        except SQLAlchemyError as exc:
            raise StoreError(url, f"not an SQLAlchemy URL: {exc}") from exc
        shown = parsed.render_as_string(hide_password=True)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            db_file = Path(parsed.database)
            try:
                # the history names attackers, listeners and bans: for its owner only (SQLite
                # gives its -wal and -shm files the database file's mode)
                db_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                if not db_file.exists():
                    with contextlib.suppress(FileExistsError):
                        os.close(os.open(db_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY
                                         | os.O_CLOEXEC, 0o600))
            except OSError as exc:
                raise StoreError(shown, f"cannot create {db_file}: {exc.strerror}") from exc
        try:
            engine = create_engine(url)
        except (SQLAlchemyError, ImportError) as exc:
            raise StoreError(shown, str(exc)) from exc
        store = cls(url, engine)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas(store))
        if migrate:
            store.migrate()
        return store

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ---------------------------------------------------------------------------------

    def _alembic_config(self) -> Any:
        from alembic.config import Config as AlembicConfig  # noqa: PLC0415 - slow import

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        return cfg

    def schema_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext  # noqa: PLC0415

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head_revision(self) -> str | None:
        from alembic.script import ScriptDirectory  # noqa: PLC0415

        return ScriptDirectory.from_config(self._alembic_config()).get_current_head()

    def migrate(self) -> None:
        """Bring the schema to the newest revision; copy an SQLite file aside first."""
        from alembic import command  # noqa: PLC0415

        try:
            current, head = self.schema_revision(), self.head_revision()
            if current == head:
                return
            db = make_url(self.url).database
            if current is not None and self.engine.dialect.name == "sqlite" and db:
                backup = f"{db}.before-{head}"
                shutil.copy2(db, backup)
                log.info("store: schema %s -> %s, copy kept at %s", current, head, backup)
            cfg = self._alembic_config()
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(self.display_url, f"cannot migrate the schema: {exc}") from exc

    # -- writing --------------------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except SQLAlchemyError as exc:
            raise StoreError(self.display_url, str(exc).splitlines()[0]) from exc

    def insert_events(self, events: Sequence[NewEvent], now: datetime,
                      position: tuple[str, dict[str, Any]] | None = None) -> list[int | None]:
        """Record ``events`` and the source position that covers them, in one transaction.

        Events whose ``dedup_key`` is already stored are skipped, so a replayed entry is never
        recorded twice. Returns the new id of each event, None for those skipped.
        """
        keys = [e.dedup_key for e in events if e.dedup_key]
        rows: list[Event | None] = []
        with self.session() as s:
            known = set(s.scalars(select(Event.dedup_key).where(Event.dedup_key.in_(keys)))
                        ) if keys else set()
            for e in events:
                if e.dedup_key and e.dedup_key in known:
                    rows.append(None)
                    continue
                if e.dedup_key:
                    known.add(e.dedup_key)
                row = Event(recorded_at=now, **{f: getattr(e, f) for f in NewEvent.__slots__})
                s.add(row)
                rows.append(row)
            if position is not None:
                s.merge(SourcePosition(source=position[0], position=position[1], updated_at=now))
            s.flush()
            return [r.id if r is not None else None for r in rows]

    def record_events(self, events: Sequence[NewEvent], now: datetime,
                      position: tuple[str, dict[str, Any]] | None = None) -> int:
        """Like insert_events; returns how many were new."""
        return sum(i is not None for i in self.insert_events(events, now, position))

    def save_incident(self, c: IncidentChange) -> int:
        """Insert or update the incident of a correlator change, with its sample and events,
        in one transaction; returns the incident's id."""
        fields = {
            "host": c.host, "netns": c.netns, "address": c.address, "port": c.port,
            "family": c.family, "status": c.status, "verdict": c.verdict, "trigger": c.trigger,
            "opened_at": c.opened_at, "closed_at": c.closed_at,
            "first_evidence_at": c.first_evidence_at, "detected_at": c.detected_at,
            "peak_syn_recv": c.peak_syn_recv,
            "top_prefixes": [{"prefix": p, "count": n, "share": sh}
                             for p, n, sh in c.top_prefixes],
            "recommendations": list(c.recommendations),
            "evidence": {**c.evidence, "reasons": list(c.reasons)},
        }
        with self.session() as s:
            row = s.get(Incident, c.incident_id) if c.incident_id is not None else None
            if row is None:
                row = Incident(**fields)
                s.add(row)
            else:
                for name, value in fields.items():
                    setattr(row, name, value)
            s.flush()
            if c.sample is not None:
                x = c.sample
                s.add(EvidenceSample(
                    incident_id=row.id, at=x.at, syn_recv=x.syn_recv,
                    accept_queue=x.accept_queue, backlog=x.backlog, rates=x.rates,
                    top_prefixes=[[p, n] for p, n in x.top_prefixes]))
            if c.event_ids:
                s.execute(update(Event).where(Event.id.in_(c.event_ids))
                          .values(incident_id=row.id))
            return row.id

    def get_position(self, source: str) -> dict[str, Any] | None:
        with self.session() as s:
            row = s.get(SourcePosition, source)
            return dict(row.position) if row else None

    def add(self, *rows: Any) -> None:
        """Insert ORM rows as they are (incidents, action runs, bans)."""
        try:
            with self.session() as s:
                s.add_all(rows)
        except StoreError as exc:
            if isinstance(exc.__cause__, IntegrityError):
                raise StoreError(self.display_url, f"duplicate row: {exc.why}") from exc
            raise

    # -- reading --------------------------------------------------------------------------------

    def events(self, since: datetime | None = None, limit: int | None = None) -> list[Event]:
        """Events oldest first; with ``limit``, the newest ``limit`` of them."""
        order = func.coalesce(Event.time, Event.recorded_at)
        q = select(Event)
        if since is not None:
            q = q.where(order >= since)
        with self.session() as s:
            if limit is not None:
                rows = list(s.scalars(q.order_by(order.desc(), Event.id.desc()).limit(limit)))
                return rows[::-1]
            return list(s.scalars(q.order_by(order, Event.id)))

    def incidents(self, since: datetime | None = None, port: int | None = None,
                  verdict: str | None = None, limit: int | None = None) -> list[Incident]:
        q = select(Incident)
        if since is not None:
            q = q.where(Incident.opened_at >= since)
        if port is not None:
            q = q.where(Incident.port == port)
        if verdict is not None:
            q = q.where(Incident.verdict == verdict)
        with self.session() as s:
            if limit is not None:
                q = q.order_by(Incident.opened_at.desc(), Incident.id.desc()).limit(limit)
                return list(s.scalars(q))[::-1]
            return list(s.scalars(q.order_by(Incident.opened_at, Incident.id)))

    def incident(self, incident_id: int) -> tuple[Incident, list[ActionRun]]:
        with self.session() as s:
            row = s.get(Incident, incident_id)
            if row is None:
                raise NotFound(f"incident {incident_id}", "no such incident")
            runs = list(s.scalars(select(ActionRun).where(ActionRun.incident_id == incident_id)
                                  .order_by(ActionRun.at, ActionRun.id)))
            return row, runs

    def actions_by_incident(self, ids: Sequence[int]) -> dict[int, list[ActionRun]]:
        out: dict[int, list[ActionRun]] = {i: [] for i in ids}
        if not ids:
            return out
        with self.session() as s:
            for run in s.scalars(select(ActionRun).where(ActionRun.incident_id.in_(ids))
                                 .order_by(ActionRun.at, ActionRun.id)):
                out[run.incident_id or 0].append(run)
        return out

    def latest_runs(self, action: str, host: str, netns: str,
                    since: datetime) -> list[ActionRun]:
        """The latest run of ``action`` for each (incident, target) of this host and namespace
        (a fleet shares the store) recorded since ``since``."""
        latest: dict[tuple[int | None, str], ActionRun] = {}
        with self.session() as s:
            for run in s.scalars(
                    select(ActionRun).join(Incident, ActionRun.incident_id == Incident.id)
                    .where(ActionRun.action == action, ActionRun.at >= since,
                           Incident.host == host, Incident.netns == netns)
                    .order_by(ActionRun.at, ActionRun.id)):
                latest[run.incident_id, run.target] = run
        return list(latest.values())

    def open_incidents(self, host: str, netns: str) -> list[IncidentChange]:
        """Incidents left open (by a stop or a crash), as changes the correlator resumes."""
        with self.session() as s:
            rows = s.scalars(select(Incident).where(
                Incident.status == "open", Incident.host == host, Incident.netns == netns))
            return [IncidentChange(
                change="updated", serial=0, incident_id=r.id, host=r.host, netns=r.netns,
                address=r.address, port=r.port, family=r.family, status="open",
                verdict=r.verdict, trigger=_trigger(r.trigger),
                opened_at=r.opened_at, closed_at=None, first_evidence_at=r.first_evidence_at,
                detected_at=r.detected_at or r.opened_at, peak_syn_recv=r.peak_syn_recv,
                top_prefixes=(), recommendations=tuple(r.recommendations), reasons=(),
                evidence=dict(r.evidence)) for r in rows]

    def port_history(self, netns: str) -> dict[int, PortHistory]:
        """Per port: how many incidents, their peak SYN-RECV, how many were capacity."""
        capacity = func.sum(case((Incident.verdict == "capacity", 1), else_=0))
        q = (select(Incident.port, func.count(), func.max(Incident.peak_syn_recv), capacity,
                    func.max(Incident.id))
             .where(Incident.netns == netns, Incident.port.is_not(None))
             .group_by(Incident.port))
        with self.session() as s:
            return {port: PortHistory(port, n, peak or 0, int(cap or 0), last)
                    for port, n, peak, cap, last in s.execute(q)}

    def samples(self, incident_id: int) -> list[EvidenceSample]:
        with self.session() as s:
            return list(s.scalars(select(EvidenceSample)
                                  .where(EvidenceSample.incident_id == incident_id)
                                  .order_by(EvidenceSample.at, EvidenceSample.id)))

    def bans(self) -> list[Ban]:
        with self.session() as s:
            return list(s.scalars(select(Ban).order_by(Ban.created_at, Ban.id)))

    # -- actions --------------------------------------------------------------------------------

    def saved_setting(self, netns: str, name: str) -> str | None:
        with self.session() as s:
            row = s.get(SavedSetting, (netns, name))
            return row.value if row else None

    def save_setting(self, netns: str, name: str, value: str, now: datetime) -> None:
        with self.session() as s:
            s.merge(SavedSetting(netns=netns, name=name, value=value, saved_at=now))

    def forget_setting(self, netns: str, name: str) -> None:
        with self.session() as s:
            row = s.get(SavedSetting, (netns, name))
            if row is not None:
                s.delete(row)

    def active_bans(self, netns: str, now: datetime, backend: str | None = None) -> list[Ban]:
        q = select(Ban).where(Ban.netns == netns, Ban.removed_at.is_(None), Ban.expires_at > now)
        if backend is not None:
            q = q.where(Ban.backend == backend)
        with self.session() as s:
            return list(s.scalars(q.order_by(Ban.created_at, Ban.id)))

    def expired_bans(self, netns: str, now: datetime, backend: str) -> list[Ban]:
        """Bans past their expiry that nobody removed (for backends without kernel timeouts)."""
        with self.session() as s:
            return list(s.scalars(select(Ban).where(
                Ban.netns == netns, Ban.backend == backend, Ban.removed_at.is_(None),
                Ban.expires_at <= now)))

    def times_banned(self, netns: str, prefix: str) -> int:
        """How often ``prefix`` was banned before (for longer bans of repeat offenders)."""
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(Ban).where(
                Ban.netns == netns, Ban.prefix == prefix)) or 0)

    def incident_bans(self, incident_id: int) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(Ban.prefix).where(Ban.incident_id == incident_id)))

    def mark_removed(self, ban_ids: Sequence[int], now: datetime) -> None:
        if ban_ids:
            with self.session() as s:
                s.execute(update(Ban).where(Ban.id.in_(ban_ids)).values(removed_at=now))

    def action_runs(self, incident_id: int) -> list[ActionRun]:
        return self.actions_by_incident([incident_id])[incident_id]
