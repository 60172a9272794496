"""What every part of the store shares: the engine, sessions that turn SQLAlchemy's errors into
StoreError, and the rows-to-records conversions (rows never leave the store)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, cast

from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from synwatch.config.urls import masked
from synwatch.errors import StoreError, StoreOutage
from synwatch.fleetlisten import BAN_CHANNEL
from synwatch.records import (
    ActionRun,
    Ban,
    Incident,
    RecordedEvent,
    StoredPoint,
    Trigger,
    Verdict,
)
from synwatch.store.models import ActionRunRow, BanRow, EventRow, IncidentRow, TimelineRow

BUSY_TIMEOUT = 5.0  # seconds a write waits for another writer's lock (the CLI, migrations)


def is_outage(exc: BaseException) -> bool:
    """A database that is not there or cannot be written for now (a lost connection, a locked
    or full SQLite file), as opposed to a table that is not there or a refused row."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    return "no such table" not in str(exc) and "does not exist" not in str(exc) \
        and "UndefinedTable" not in type(exc.orig).__name__


def why(exc: BaseException) -> str:
    """The first line of a driver's message, without SQLAlchemy's background link."""
    text_ = str(getattr(exc, "orig", None) or exc).strip()
    return text_.splitlines()[0] if text_ else type(exc).__name__


def store_error(url: str, exc: BaseException, prefix: str = "") -> StoreError:
    """SQLAlchemy's error as ours: a StoreOutage when the history is away for now."""
    return (StoreOutage if is_outage(exc) else StoreError)(url, prefix + why(exc))



class StoreBase:
    def __init__(self, url: str, engine: Engine, host: str) -> None:
        self.url = url
        self.engine = engine
        self.host = host  # this node (storage.host): what it writes carries it
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self.busy_timeout = BUSY_TIMEOUT

    @property
    def display_url(self) -> str:
        return masked(self.url)  # the userinfo's password and libpq's ?password= both

    def announce_bans(self, session: Session) -> None:
        """Wake the other nodes' fleet ban reconcile (delivered at commit, once per
        transaction: https://www.postgresql.org/docs/current/sql-notify.html)."""
        if self.engine.dialect.name == "postgresql":
            session.execute(text("SELECT pg_notify(:channel, :host)"),
                            {"channel": BAN_CHANNEL, "host": self.host})

    @contextmanager
    def session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except SQLAlchemyError as exc:
            # the driver's own first line, without SQLAlchemy's "(psycopg.OperationalError)"
            raise store_error(self.display_url, exc) from exc


def trigger(text: str) -> Trigger:
    return "log" if text == "log" else "half_open" if text == "half_open" else "counters"


VERDICTS = ("capacity", "concentrated", "spoofed", "unknown")


def verdict(text: str) -> Verdict:
    return cast(Verdict, text) if text in VERDICTS else "unknown"


def event_record(r: EventRow) -> RecordedEvent:
    return RecordedEvent(
        id=r.id, time=r.time, recorded_at=r.recorded_at, source=r.source, trusted=r.trusted,
        historical=r.historical, kind=r.kind, family=r.family, address=r.address, port=r.port,
        mode=r.mode, source_ip=r.source_ip, source_port=r.source_port, host=r.host,
        message=r.message, pattern=r.pattern, dedup_key=r.dedup_key, incident_id=r.incident_id)


def incident_record(r: IncidentRow) -> Incident:
    return Incident(
        id=r.id, host=r.host, netns=r.netns, address=r.address, port=r.port, family=r.family,
        status=r.status, verdict=r.verdict, trigger=r.trigger, opened_at=r.opened_at,
        closed_at=r.closed_at, first_evidence_at=r.first_evidence_at,
        detected_at=r.detected_at, peak_syn_recv=r.peak_syn_recv,
        top_prefixes=tuple(dict(p) for p in r.top_prefixes),
        recommendations=tuple(r.recommendations), state=dict(r.evidence))


def run_record(r: ActionRunRow) -> ActionRun:
    return ActionRun(incident_id=r.incident_id, action=r.action, target=r.target,
                     status=r.status, at=r.at, rendered=r.rendered, detail=r.detail,
                     retry_at=r.retry_at, id=r.id, host=r.host or "")


def run_row(run: ActionRun, host: str) -> ActionRunRow:
    return ActionRunRow(incident_id=run.incident_id, action=run.action, target=run.target[:255],
                        status=run.status, at=run.at, rendered=run.rendered,
                        detail=run.detail, retry_at=run.retry_at, host=run.host or host)


def ban_record(r: BanRow) -> Ban:
    return Ban(prefix=r.prefix, backend=r.backend, netns=r.netns, incident_id=r.incident_id,
               created_at=r.created_at, expires_at=r.expires_at, removed_at=r.removed_at,
               times_banned=r.times_banned, id=r.id, host=r.host, scope=r.scope,
               origin_id=r.origin_id)


def ban_row(ban: Ban, host: str) -> BanRow:
    return BanRow(prefix=ban.prefix, backend=ban.backend, netns=ban.netns,
                  incident_id=ban.incident_id, created_at=ban.created_at,
                  expires_at=ban.expires_at, removed_at=ban.removed_at,
                  times_banned=ban.times_banned, host=ban.host or host, scope=ban.scope,
                  origin_id=ban.origin_id)


def point_record(r: TimelineRow) -> StoredPoint:
    return StoredPoint(id=r.id, incident_id=r.incident_id, at=r.at, syn_recv=r.syn_recv,
                       accept_queue=r.accept_queue, backlog=r.backlog, rates=dict(r.rates),
                       top_prefixes=tuple((str(p), int(n)) for p, n in r.top_prefixes))


Status = Literal["open", "closed"]
