"""What the nodes of a fleet share through the store: who is alive (a heartbeat per node) and
the fleet bans each node copies into its own firewall."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select, text

from synwatch.historyreader import ban_columns, ban_of
from synwatch.records import Ban, Node
from synwatch.store.base import StoreBase
from synwatch.store.models import NodeRow


class Fleet(StoreBase):
    def heartbeat(self, pid: int, started_at: datetime, now: datetime, version: str) -> None:
        with self.session() as s:
            s.merge(NodeRow(host=self.host, pid=pid, started_at=started_at, seen_at=now,
                            version=version[:32]))

    def nodes(self) -> list[Node]:
        """Every node that ever wrote a heartbeat, the most recently seen first."""
        with self.session() as s:
            return [Node(r.host, r.pid, r.started_at, r.seen_at, r.version)
                    for r in s.scalars(select(NodeRow).order_by(NodeRow.seen_at.desc(),
                                                                 NodeRow.host))]

    def fleet_bans_to_copy(self, now: datetime, after: int = 0,
                           limit: int | None = None) -> list[Ban]:
        """Fleet bans decided on other nodes, in force, that this node has not copied yet (a
        copy it lifted or let expire early counts as copied: it is decided). With ``limit``: a
        page of at most that many, by id, after the id ``after``. Read as text from the
        database's own driver and checked by no one here: times out of Python's range read as
        the bounds of historyreader.in_range, the prefix as written (the ban action validates
        each row like a log line)."""
        page = " AND b.id > :after ORDER BY b.id LIMIT :limit" if limit is not None \
            else " ORDER BY b.created_at, b.id"
        sql = text(f"SELECT {ban_columns('b.')} FROM bans b WHERE b.scope = 'fleet' AND "
                   "b.origin_id IS NULL AND b.host != :host AND b.removed_at IS NULL AND "
                   "b.expires_at > :now AND NOT EXISTS (SELECT 1 FROM bans m WHERE "
                   f"m.origin_id = b.id AND m.host = :host){page}")
        params: dict[str, Any] = {"host": self.host, "now": _param(now, self.engine.dialect.name),
                                  "after": after, "limit": limit}
        with self.session() as s:
            return [ban_of(tuple(r)) for r in s.execute(sql, params)]


def _param(value: datetime, dialect: str) -> datetime | str:
    """A time as a textual query compares it: SQLite's naive UTC text (as UTCDateTime stores
    it), PostgreSQL's aware datetime."""
    if dialect == "sqlite":
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value
