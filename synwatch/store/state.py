"""What the service keeps in the history to carry on after a restart: where each source was,
the incidents left open, the notifications to resend, the kernel settings to restore and the
bans to keep. Every method returns records."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, func, select, update

from synwatch.historyreader import TIME_MAX, TIME_MIN
from synwatch.records import ActionRun, Ban, IncidentChange
from synwatch.store.base import StoreBase, ban_record, run_record, trigger, verdict
from synwatch.store.models import (
    ActionRunRow,
    BanRow,
    IncidentRow,
    SavedSettingRow,
    SourcePositionRow,
)


class ServiceState(StoreBase):
    def get_position(self, source: str) -> dict[str, Any] | None:
        with self.session() as s:
            row = s.get(SourcePositionRow, (self.host, source))
            return dict(row.position) if row else None

    def open_incidents(self, host: str, netns: str) -> list[IncidentChange]:
        """Incidents left open (by a stop or a crash), as changes the correlator resumes."""
        with self.session() as s:
            rows = s.scalars(select(IncidentRow).where(
                IncidentRow.status == "open", IncidentRow.host == host,
                IncidentRow.netns == netns))
            return [IncidentChange(
                change="updated", serial=0, incident_id=r.id, host=r.host, netns=r.netns,
                address=r.address, port=r.port, family=r.family, status="open",
                verdict=verdict(r.verdict), trigger=trigger(r.trigger),
                opened_at=r.opened_at, closed_at=None, first_evidence_at=r.first_evidence_at,
                detected_at=r.detected_at or r.opened_at, peak_syn_recv=r.peak_syn_recv,
                top_prefixes=(), recommendations=tuple(r.recommendations), reasons=(),
                state=dict(r.evidence)) for r in rows]

    def latest_runs(self, action: str, host: str, netns: str,
                    since: datetime) -> list[ActionRun]:
        """The latest run of ``action`` for each (incident, target) of this host and namespace
        (a fleet shares the store) recorded since ``since``."""
        latest: dict[tuple[int | None, str], ActionRun] = {}
        with self.session() as s:
            for run in s.scalars(
                    select(ActionRunRow)
                    .join(IncidentRow, ActionRunRow.incident_id == IncidentRow.id)
                    .where(ActionRunRow.action == action, ActionRunRow.at >= since,
                           ActionRunRow.host == host, IncidentRow.host == host,
                           IncidentRow.netns == netns)
                    .order_by(ActionRunRow.at, ActionRunRow.id)):
                latest[run.incident_id, run.target] = run_record(run)
        return list(latest.values())

    # -- kernel settings to restore ---------------------------------------------------------

    def saved_setting(self, netns: str, name: str) -> str | None:
        with self.session() as s:
            row = s.get(SavedSettingRow, (self.host, netns, name))
            return row.value if row else None

    def save_setting(self, netns: str, name: str, value: str, now: datetime) -> None:
        with self.session() as s:
            s.merge(SavedSettingRow(host=self.host, netns=netns, name=name, value=value,
                                    saved_at=now))

    def saved_settings(self) -> list[tuple[str, str, str]]:
        """(netns, name, value) of every setting this node changed and has not put back."""
        with self.session() as s:
            return [(r.netns, r.name, r.value) for r in s.scalars(
                select(SavedSettingRow).where(SavedSettingRow.host == self.host))]

    def forget_setting(self, netns: str, name: str) -> None:
        with self.session() as s:
            row = s.get(SavedSettingRow, (self.host, netns, name))
            if row is not None:
                s.delete(row)

    def namespaces(self) -> set[str]:
        """Every namespace this node has banned in or holds a setting of (the package's
        removal lifts what synwatch holds in each, watch.netns having changed or not)."""
        with self.session() as s:
            banned = s.scalars(select(BanRow.netns).where(BanRow.host == self.host).distinct())
            found = set(banned)
            found.update(s.scalars(select(SavedSettingRow.netns)
                                   .where(SavedSettingRow.host == self.host).distinct()))
            return found

    # -- bans -------------------------------------------------------------------------------

    def active_bans(self, netns: str, now: datetime, backend: str | None = None) -> list[Ban]:
        """This node's bans in force in ``netns`` (a fleet shares the table)."""
        q = select(BanRow).where(BanRow.host == self.host, BanRow.netns == netns,
                                 BanRow.removed_at.is_(None), BanRow.expires_at > now,
                                 *_loadable())
        if backend is not None:
            q = q.where(BanRow.backend == backend)
        with self.session() as s:
            return [ban_record(r) for r in s.scalars(q.order_by(BanRow.created_at, BanRow.id))]

    def expired_bans(self, netns: str, now: datetime, backend: str) -> list[Ban]:
        """Bans past their expiry that nobody removed (for backends without kernel timeouts)."""
        with self.session() as s:
            return [ban_record(r) for r in s.scalars(select(BanRow).where(
                BanRow.host == self.host, BanRow.netns == netns, BanRow.backend == backend,
                BanRow.removed_at.is_(None), BanRow.expires_at <= now, *_loadable()))]

    def times_banned(self, netns: str, prefix: str) -> int:
        """How often ``prefix`` was banned before (for longer bans of repeat offenders)."""
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(BanRow).where(
                BanRow.host == self.host, BanRow.netns == netns, BanRow.prefix == prefix))
                or 0)

    def incident_bans(self, incident_id: int) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(BanRow.prefix).where(
                BanRow.host == self.host, BanRow.incident_id == incident_id)))

    def mark_removed(self, ban_ids: Sequence[int | None], now: datetime, *,
                     everywhere: bool = False) -> None:
        """Bans gone from the firewall. With ``everywhere`` (`unban`), a fleet ban (an origin or
        a copy) is lifted with every copy of it on every node, and the other nodes are woken to
        take it out of their firewalls; an expiry lifts only the row itself."""
        ids = [i for i in ban_ids if i is not None]
        if not ids:
            return
        with self.session() as s:
            fleet = list(s.execute(select(BanRow.id, BanRow.origin_id).where(
                BanRow.id.in_(ids), BanRow.scope == "fleet"))) if everywhere else []
            if fleet:
                origins = {origin or ban for ban, origin in fleet}
                ids += list(s.scalars(select(BanRow.id).where(
                    (BanRow.id.in_(origins)) | (BanRow.origin_id.in_(origins)),
                    BanRow.removed_at.is_(None))))
            s.execute(update(BanRow).where(BanRow.id.in_(set(ids)),
                                           BanRow.removed_at.is_(None))
                      .values(removed_at=now))
            if fleet:
                self.announce_bans(s)


def _loadable() -> tuple[ColumnElement[bool], ...]:
    """Only rows whose times Python can hold: one 'infinity' (written by anyone who can write
    the table) made every read of the node's bans fail, and the service with it."""
    low, high = (datetime.fromisoformat(t).replace(tzinfo=timezone.utc)
                 for t in (TIME_MIN, TIME_MAX))
    return (BanRow.created_at > low, BanRow.created_at < high, BanRow.expires_at > low,
            BanRow.expires_at < high)
