"""SQLAlchemy 2 tables of the history: events, incidents, their timelines, action runs, bans,
saved settings, and the positions sources resume from. Times are stored in UTC and read back
timezone-aware. These rows never leave synwatch/store: it returns records (records.py)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    func,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on SQLite (no zones) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class EventRow(Base):
    """A kernel message a filter matched, as a source delivered it."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime | None]  # when the kernel (or the log) says it happened
    recorded_at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(512))  # journald | kmsg | file:<path>
    trusted: Mapped[bool]
    historical: Mapped[bool] = mapped_column(default=False)  # imported from old logs
    kind: Mapped[str] = mapped_column(String(32))
    family: Mapped[int | None]
    address: Mapped[str | None] = mapped_column(String(64))
    port: Mapped[int | None]
    mode: Mapped[str | None] = mapped_column(String(16))
    source_ip: Mapped[str | None] = mapped_column(String(64))
    source_port: Mapped[int | None]
    host: Mapped[str | None] = mapped_column(String(255))  # the node that recorded it
    message: Mapped[str] = mapped_column(Text)
    pattern: Mapped[str] = mapped_column(String(128))
    # What makes an entry unique in its source (journal cursor, boot+kmsg seq, line hash):
    # recording the same entry twice is a no-op. Unique per host: two nodes on one machine
    # read the same journal (migration 0005).
    dedup_key: Mapped[str | None] = mapped_column(String(255))
    incident_id: Mapped[int | None] = mapped_column(ForeignKey("incidents.id"))
    __table_args__ = (Index("ix_events_time", "time"), Index("ix_events_port", "port"),
                      # when it happened, as the queries order: migration 0004
                      Index("ix_events_when", func.coalesce(text("time"), text("recorded_at")),
                            "id"),
                      Index("ux_events_host_dedup", "host", "dedup_key", unique=True),
                      Index("ix_events_host_when", "host",
                            func.coalesce(text("time"), text("recorded_at")), "id"))


class IncidentRow(Base):
    """One overflow episode of one listener in one network namespace of one host."""

    __tablename__ = "incidents"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    netns: Mapped[str] = mapped_column(String(255), default="")
    address: Mapped[str | None] = mapped_column(String(64))
    port: Mapped[int | None]
    family: Mapped[int | None]
    status: Mapped[str] = mapped_column(String(16))  # open | closed
    verdict: Mapped[str] = mapped_column(String(16))  # capacity | concentrated | spoofed | unknown
    trigger: Mapped[str] = mapped_column(String(16))  # log | counters | half_open
    opened_at: Mapped[datetime]
    closed_at: Mapped[datetime | None]
    first_evidence_at: Mapped[datetime | None]
    detected_at: Mapped[datetime | None]
    peak_syn_recv: Mapped[int] = mapped_column(default=0)
    top_prefixes: Mapped[list[Any]] = mapped_column(default=list)
    recommendations: Mapped[list[Any]] = mapped_column(default=list)
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    __table_args__ = (Index("ix_incidents_opened", "opened_at"),
                      Index("ix_incidents_listener", "netns", "port", "status"),
                      Index("ix_incidents_host_opened", "host", "opened_at"))


class TimelineRow(Base):
    """Kernel state seen while an incident lasted: counter rates, SYN-RECV count, prefixes."""

    __tablename__ = "evidence_samples"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    incident_id: Mapped[int] = mapped_column(ForeignKey("incidents.id"), index=True)
    at: Mapped[datetime]
    syn_recv: Mapped[int | None]
    accept_queue: Mapped[int | None]
    backlog: Mapped[int | None]
    rates: Mapped[dict[str, Any]] = mapped_column(default=dict)  # counter deltas per second
    top_prefixes: Mapped[list[Any]] = mapped_column(default=list)


class ActionRunRow(Base):
    """One action rendered or run for an incident, with its outcome."""

    __tablename__ = "action_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    incident_id: Mapped[int | None] = mapped_column(ForeignKey("incidents.id"), index=True)
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32))  # done | failed | dry-run | skipped
    at: Mapped[datetime]
    rendered: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    # a failed run that will be tried again: when (the stop time for "at the next start");
    # None for every other run. Before 0003 this was prose in ``detail`` ("; retrying ").
    retry_at: Mapped[datetime | None] = mapped_column(default=None)
    host: Mapped[str | None] = mapped_column(String(255))  # the node that ran it


# fleet bans decided by a node and not lifted: what a node copies (0006_fleet_changes)
FLEET_IN_FORCE = "scope = 'fleet' AND origin_id IS NULL AND removed_at IS NULL"
COPIES = "origin_id IS NOT NULL"


class BanRow(Base):
    """A source prefix banned in a firewall backend, with its kernel-side expiry."""

    __tablename__ = "bans"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(64))
    backend: Mapped[str] = mapped_column(String(32))
    netns: Mapped[str] = mapped_column(String(255), default="")
    incident_id: Mapped[int | None] = mapped_column(ForeignKey("incidents.id"))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    removed_at: Mapped[datetime | None]
    times_banned: Mapped[int] = mapped_column(default=1)  # for longer bans of repeat offenders
    host: Mapped[str] = mapped_column(String(255))  # the node whose firewall holds it
    scope: Mapped[str] = mapped_column(String(8), default="local",
                                       server_default="local")  # local | fleet
    origin_id: Mapped[int | None]  # a fleet ban copied from another node: the ban it copies
    # a fleet ban's origin row: its place in the fleet's changes (decided, lifted everywhere),
    # which the other nodes read from the last they saw (0006_fleet_changes)
    fleet_seq: Mapped[int | None] = mapped_column(BigInteger)
    __table_args__ = (Index("ix_bans_prefix", "prefix"), Index("ix_bans_expires", "expires_at"),
                      Index("ix_bans_host_netns", "host", "netns", "removed_at"),
                      Index("ix_bans_origin_host", "origin_id", "host",
                            postgresql_where=text(COPIES), sqlite_where=text(COPIES)),
                      Index("ix_bans_fleet_seq", "fleet_seq"),
                      Index("ix_bans_fleet_in_force", "id", postgresql_where=text(FLEET_IN_FORCE),
                            sqlite_where=text(FLEET_IN_FORCE)))


class SourcePositionRow(Base):
    """Where a source resumes: journal cursor, kmsg boot+sequence, file inode+offset+head hash."""

    __tablename__ = "source_positions"
    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    source: Mapped[str] = mapped_column(String(512), primary_key=True)
    position: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime]


class SavedSettingRow(Base):
    """A kernel setting synwatch changed and must put back (tcp_syncookies during incidents),
    kept in the store so a crash or a restart still restores it. Rows named ``ban.*`` are what
    the ban reconcile last found in the kernel instead (synwatch/actions/banproof.py), never
    restored."""

    __tablename__ = "saved_settings"
    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    netns: Mapped[str] = mapped_column(String(255), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))
    saved_at: Mapped[datetime]


class NodeRow(Base):
    """A node of the fleet (one row even on a single server): its last heartbeat."""

    __tablename__ = "nodes"
    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    pid: Mapped[int | None]
    started_at: Mapped[datetime]
    seen_at: Mapped[datetime]
    version: Mapped[str] = mapped_column(String(32), default="", server_default="")
