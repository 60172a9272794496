"""What the nodes of a fleet share through the store: who is alive (a heartbeat per node) and
the fleet bans each node copies into its own firewall."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import aliased

from synwatch.records import Ban, Node
from synwatch.store.base import StoreBase, ban_record
from synwatch.store.models import BanRow, NodeRow


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

    def fleet_bans_to_copy(self, now: datetime) -> list[Ban]:
        """Fleet bans decided on other nodes, in force, that this node has not copied yet (a
        copy it refused, let expire early or lifted counts as copied: it is decided)."""
        mine = aliased(BanRow)
        copied = select(mine.id).where(mine.origin_id == BanRow.id, mine.host == self.host)
        with self.session() as s:
            return [ban_record(r) for r in s.scalars(
                select(BanRow).where(BanRow.scope == "fleet", BanRow.origin_id.is_(None),
                                     BanRow.host != self.host, BanRow.removed_at.is_(None),
                                     BanRow.expires_at > now, ~copied.exists())
                .order_by(BanRow.created_at, BanRow.id))]
