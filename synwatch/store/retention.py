"""Keeping the history bounded (storage.retention): old events go after ``events`` (90 days by
default), closed incidents with their timelines and action runs after ``incidents`` (never by
default). Each node prunes only its own rows, in small transactions, so a prune never holds the
store long enough to keep a write of the detection path waiting."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, or_, select, update

from synwatch.sqlitestore import PRUNE_BATCH
from synwatch.store.base import StoreBase
from synwatch.store.models import ActionRunRow, BanRow, EventRow, IncidentRow, TimelineRow


class Retention(StoreBase):
    def prune_events(self, before: datetime, batch: int = PRUNE_BATCH) -> int:
        """Delete up to ``batch`` of this node's events that happened before ``before``;
        returns how many (call again while it returns ``batch``)."""
        when = func.coalesce(EventRow.time, EventRow.recorded_at)
        with self.session() as s:
            ids = list(s.scalars(select(EventRow.id).where(EventRow.host == self.host,
                                                           when < before).limit(batch)))
            if ids:
                s.execute(delete(EventRow).where(EventRow.id.in_(ids)))
            return len(ids)

    def prune_incidents(self, before: datetime, now: datetime, batch: int = 200) -> int:
        """Delete up to ``batch`` of this node's incidents closed before ``before``, with their
        timelines and action runs; their events stay, unlinked. An incident with a ban still in
        force stays until the ban ends."""
        in_force = select(BanRow.incident_id).where(
            BanRow.incident_id == IncidentRow.id, BanRow.removed_at.is_(None),
            BanRow.expires_at > now)
        with self.session() as s:
            ids = list(s.scalars(select(IncidentRow.id).where(
                IncidentRow.host == self.host, IncidentRow.status == "closed",
                IncidentRow.closed_at < before, ~in_force.exists()).limit(batch)))
            if ids:
                s.execute(update(EventRow).where(EventRow.incident_id.in_(ids))
                          .values(incident_id=None))
                s.execute(delete(TimelineRow).where(TimelineRow.incident_id.in_(ids)))
                s.execute(delete(ActionRunRow).where(ActionRunRow.incident_id.in_(ids)))
                s.execute(delete(BanRow).where(BanRow.incident_id.in_(ids),
                                               or_(BanRow.removed_at.is_not(None),
                                                   BanRow.expires_at <= now)))
                s.execute(update(BanRow).where(BanRow.incident_id.in_(ids))
                          .values(incident_id=None))
                s.execute(delete(IncidentRow).where(IncidentRow.id.in_(ids)))
            return len(ids)
