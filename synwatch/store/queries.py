"""Reading the history for people: the CLI's lists and views, and the doctor's port history.
Every method returns records (synwatch/records.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import String, case, cast, func, select, text

from synwatch.errors import NotFound
from synwatch.historyreader import ban_columns, ban_of
from synwatch.records import (
    NOT_ACCEPTING,
    ActionRun,
    Ban,
    Incident,
    PortHistory,
    RecordedEvent,
    StoredPoint,
)
from synwatch.store.base import (
    StoreBase,
    event_record,
    incident_record,
    point_record,
    run_record,
)
from synwatch.store.models import (
    ActionRunRow,
    EventRow,
    IncidentRow,
    SavedSettingRow,
    TimelineRow,
)


class Queries(StoreBase):
    def events(self, since: datetime | None = None, limit: int | None = None,
               host: str | None = None) -> list[RecordedEvent]:
        """Events oldest first (of ``host``, else of every node); with ``limit``, the newest
        ``limit`` of them."""
        order = func.coalesce(EventRow.time, EventRow.recorded_at)
        q = select(EventRow)
        if host is not None:
            q = q.where(EventRow.host == host)
        if since is not None:
            q = q.where(order >= since)
        with self.session() as s:
            if limit is not None:
                rows = list(s.scalars(q.order_by(order.desc(), EventRow.id.desc()).limit(limit)))
                return [event_record(r) for r in rows[::-1]]
            return [event_record(r) for r in s.scalars(q.order_by(order, EventRow.id))]

    def incidents(self, since: datetime | None = None, port: int | None = None, *,
                  verdict: str | None = None, limit: int | None = None,
                  status: str | None = None, host: str | None = None) -> list[Incident]:
        """Incidents oldest first (of ``host``, else of every node)."""
        q = select(IncidentRow)
        if host is not None:
            q = q.where(IncidentRow.host == host)
        if status is not None:
            q = q.where(IncidentRow.status == status)
        if since is not None:
            q = q.where(IncidentRow.opened_at >= since)
        if port is not None:
            q = q.where(IncidentRow.port == port)
        if verdict is not None:
            q = q.where(IncidentRow.verdict == verdict)
        with self.session() as s:
            if limit is not None:
                q = q.order_by(IncidentRow.opened_at.desc(), IncidentRow.id.desc()).limit(limit)
                return [incident_record(r) for r in list(s.scalars(q))[::-1]]
            return [incident_record(r)
                    for r in s.scalars(q.order_by(IncidentRow.opened_at, IncidentRow.id))]

    def incident(self, incident_id: int) -> tuple[Incident, list[ActionRun]]:
        with self.session() as s:
            row = s.get(IncidentRow, incident_id)
            if row is None:
                raise NotFound(f"incident {incident_id}", "no such incident")
            incident = incident_record(row)
        return incident, self.action_runs(incident_id)

    def actions_by_incident(self, ids: Sequence[int]) -> dict[int, list[ActionRun]]:
        out: dict[int, list[ActionRun]] = {i: [] for i in ids}
        if not ids:
            return out
        with self.session() as s:
            for run in s.scalars(select(ActionRunRow).where(ActionRunRow.incident_id.in_(ids))
                                 .order_by(ActionRunRow.at, ActionRunRow.id)):
                out[run.incident_id or 0].append(run_record(run))
        return out

    def action_runs(self, incident_id: int) -> list[ActionRun]:
        return self.actions_by_incident([incident_id])[incident_id]

    def port_history(self, netns: str) -> dict[int, PortHistory]:
        """Per port, over the incidents with a verdict: how many, the peak SYN-RECV of real load,
        how many were capacity, and of those how many an application that stopped accepting."""
        stopped = cast(IncidentRow.recommendations, String).like(f"%{NOT_ACCEPTING}%")
        real = (IncidentRow.verdict == "capacity") & ~stopped
        q = (select(IncidentRow.port, func.count(),
                    func.max(case((real, IncidentRow.peak_syn_recv), else_=0)),
                    func.sum(case((real, 1), else_=0)),
                    func.max(IncidentRow.id),
                    func.sum(case(((IncidentRow.verdict == "capacity") & stopped, 1), else_=0)))
             .where(IncidentRow.netns == netns, IncidentRow.port.is_not(None),
                    IncidentRow.verdict != "unknown")
             .group_by(IncidentRow.port))
        with self.session() as s:
            return {port: PortHistory(port, n, peak or 0, int(cap or 0), last, int(gone or 0))
                    for port, n, peak, cap, last, gone in s.execute(q)}

    def samples(self, incident_id: int) -> list[StoredPoint]:
        """The incident's timeline, one point per probe while it lasted."""
        with self.session() as s:
            return [point_record(r) for r in s.scalars(
                select(TimelineRow).where(TimelineRow.incident_id == incident_id)
                .order_by(TimelineRow.at, TimelineRow.id))]

    def bans(self, host: str | None = None) -> list[Ban]:
        """Bans oldest first (of ``host``, else of every node)."""
        # as text, with historyreader's columns: a time out of Python's range (PostgreSQL's
        # 'infinity', written by anyone who can write the table) is shown at its bound
        # instead of failing the whole list
        where = " WHERE host = :host" if host is not None else ""
        sql = text(f"SELECT {ban_columns()} FROM bans{where} ORDER BY created_at, id")
        with self.session() as s:
            return [ban_of(tuple(r)) for r in s.execute(sql, {"host": host})]

    def ban_checks(self, host: str | None = None) -> dict[tuple[str, str, str], str]:
        """What the ban reconcile last found (synwatch/banproof.py): (host, netns, name) ->
        value of the ``ban.*`` saved settings."""
        q = select(SavedSettingRow).where(SavedSettingRow.name.like("ban.%"))
        if host is not None:
            q = q.where(SavedSettingRow.host == host)
        with self.session() as s:
            return {(r.host, r.netns, r.name): r.value for r in s.scalars(q)}
