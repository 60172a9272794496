"""Recording: kernel events with the source position that covers them, incidents with their
timeline and linked events, action outcomes and bans. Each call is one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from synwatch.errors import StoreError
from synwatch.records import ActionRun, Ban, IncidentChange, NewEvent
from synwatch.store.base import StoreBase, ban_row, run_row
from synwatch.store.models import EventRow, IncidentRow, SourcePositionRow, TimelineRow


class Writes(StoreBase):
    def insert_events(self, events: Sequence[NewEvent], now: datetime,
                      position: tuple[str, dict[str, Any]] | None = None) -> list[int | None]:
        """Record ``events`` and the source position that covers them, in one transaction.

        Events whose ``dedup_key`` is already stored are skipped, so a replayed entry is never
        recorded twice. Returns the new id of each event, None for those skipped.
        """
        keys = [e.dedup_key for e in events if e.dedup_key]
        rows: list[EventRow | None] = []
        with self.session() as s:
            known = set(s.scalars(select(EventRow.dedup_key).where(
                EventRow.host == self.host, EventRow.dedup_key.in_(keys)))) if keys else set()
            for e in events:
                if e.dedup_key and e.dedup_key in known:
                    rows.append(None)
                    continue
                if e.dedup_key:
                    known.add(e.dedup_key)
                row = EventRow(recorded_at=now,
                               **{f: getattr(e, f) for f in NewEvent.__slots__})
                row.host = self.host  # the recording node, whatever the log line names
                s.add(row)
                rows.append(row)
            if position is not None:
                s.merge(SourcePositionRow(host=self.host, source=position[0],
                                          position=position[1], updated_at=now))
            s.flush()
            return [r.id if r is not None else None for r in rows]

    def record_events(self, events: Sequence[NewEvent], now: datetime,
                      position: tuple[str, dict[str, Any]] | None = None) -> int:
        """Like insert_events; returns how many were new."""
        return sum(i is not None for i in self.insert_events(events, now, position))

    def save_incident(self, c: IncidentChange) -> int:
        """Insert or update the incident of a correlator change, with its timeline point and
        events, in one transaction; returns the incident's id."""
        fields = {
            "host": c.host, "netns": c.netns, "address": c.address, "port": c.port,
            "family": c.family, "status": c.status, "verdict": c.verdict, "trigger": c.trigger,
            "opened_at": c.opened_at, "closed_at": c.closed_at,
            "first_evidence_at": c.first_evidence_at, "detected_at": c.detected_at,
            "peak_syn_recv": c.peak_syn_recv,
            "top_prefixes": [{"prefix": p, "count": n, "share": sh, "completed": k}
                             for p, n, sh, k in c.top_prefixes],
            "recommendations": list(c.recommendations),
            "evidence": {**c.state, "reasons": list(c.reasons)},  # the column keeps its name
        }
        with self.session() as s:
            row = s.get(IncidentRow, c.incident_id) if c.incident_id is not None else None
            if row is None:
                # an SQLite file deleted and started anew keeps the incident's number (as
                # synwatch/sqlitestore.py does); a server's sequence hands out its own
                keep = c.incident_id is not None and self.engine.dialect.name == "sqlite"
                row = IncidentRow(**fields, **({"id": c.incident_id} if keep else {}))
                s.add(row)
            else:
                for name, value in fields.items():
                    setattr(row, name, value)
            s.flush()
            if c.sample is not None:
                x = c.sample
                s.add(TimelineRow(
                    incident_id=row.id, at=x.at, syn_recv=x.syn_recv,
                    accept_queue=x.accept_queue, backlog=x.backlog, rates=x.rates,
                    top_prefixes=[[p, n] for p, n in x.top_prefixes]))
            if c.event_ids:
                s.execute(update(EventRow).where(EventRow.id.in_(c.event_ids))
                          .values(incident_id=row.id))
            return row.id

    def add_action_runs(self, runs: Sequence[ActionRun]) -> None:
        """Record action outcomes (all or none)."""
        self._insert([run_row(r, self.host) for r in runs])

    def add_bans(self, bans: Sequence[Ban]) -> list[int]:
        """Record bans; returns their ids. A fleet ban is announced to the other nodes when
        the transaction commits (PostgreSQL NOTIFY; they also look every few seconds)."""
        rows = [ban_row(b, self.host) for b in bans]
        self._insert(rows, announce=any(b.scope == "fleet" and b.origin_id is None
                                        and b.removed_at is None for b in bans))
        return [r.id for r in rows]

    def _insert(self, rows: Sequence[object], announce: bool = False) -> None:
        try:
            with self.session() as s:
                s.add_all(rows)
                s.flush()
                if announce:
                    self.announce_bans(s)
        except StoreError as exc:
            if isinstance(exc.__cause__, IntegrityError):
                raise StoreError(self.display_url, f"duplicate row: {exc.why}") from exc
            raise
