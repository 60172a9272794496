"""Reading the history for people: the CLI's lists and views, `status`, `top`, the doctor's port
history. Every method returns records (synwatch/records.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from synwatch.errors import NotFound
from synwatch.records import (
    NOT_ACCEPTING,
    ActionRun,
    Ban,
    Incident,
    Node,
    PortHistory,
    RecordedEvent,
    StoredPoint,
)
from synwatch.store.base import HistoryBase
from synwatch.store.rows import (
    BAN_COLUMNS,
    EVENT_COLUMNS,
    INCIDENT_COLUMNS,
    NODE_COLUMNS,
    POINT_COLUMNS,
    RUN_COLUMNS,
    ban_of,
    event_of,
    incident_of,
    node_of,
    point_of,
    run_of,
)
from synwatch.store.writes import chunks


def where(conditions: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
    """`` WHERE`` and the conditions whose value is given (None: not filtered on)."""
    used = [(sql, value) for sql, value in conditions if value is not None]
    if not used:
        return "", []
    return " WHERE " + " AND ".join(sql for sql, _ in used), [v for _, v in used]


class Reads(HistoryBase):
    def events(self, since: datetime | None = None, limit: int | None = None,
               host: str | None = None, netns: str | None = None) -> list[RecordedEvent]:
        """Events oldest first (of ``host``, else of every node; of the incidents in the
        namespaces whose names match the glob ``netns``, else all); with ``limit``, the
        newest ``limit`` of them."""
        glob_sql, glob = self.db.glob("netns", netns or "")
        cond, params = where([("host = ?", host), ("coalesce(time, recorded_at) >= ?", since),
                              (f"incident_id IN (SELECT id FROM incidents WHERE {glob_sql})",
                               glob if netns is not None else None)])
        # as the index ix_events_when reads them (migration 0004)
        order = "coalesce(time, recorded_at) {0}, id {0}"
        sql = f"SELECT {EVENT_COLUMNS} FROM events{cond} ORDER BY "
        if limit is not None:
            rows = self.rows(sql + order.format("DESC") + " LIMIT ?", [*params, limit])[::-1]
        else:
            rows = self.rows(sql + order.format("ASC"), params)
        return [event_of(r) for r in rows]

    def incidents(self, since: datetime | None = None, port: int | None = None, *,
                  verdict: str | None = None, limit: int | None = None,
                  status: str | None = None, host: str | None = None,
                  netns: str | None = None) -> list[Incident]:
        """Incidents oldest first (of ``host``, else of every node; in the namespaces whose
        names match the glob ``netns``, else in all)."""
        netns_sql, netns_glob = self.db.glob("netns", netns or "")
        cond, params = where([("host = ?", host), ("status = ?", status),
                              ("opened_at >= ?", since), ("port = ?", port),
                              ("verdict = ?", verdict),
                              (netns_sql, netns_glob if netns is not None else None)])
        sql = f"SELECT {INCIDENT_COLUMNS} FROM incidents{cond} ORDER BY "
        if limit is not None:
            rows = self.rows(sql + "opened_at DESC, id DESC LIMIT ?", [*params, limit])[::-1]
        else:
            rows = self.rows(sql + "opened_at, id", params)
        return [incident_of(r) for r in rows]

    def namespaces_of(self, incident_ids: Sequence[int]) -> dict[int, str]:
        """The namespace of each incident (events carry none: the kernel's log is shared)."""
        out: dict[int, str] = {}
        for part in chunks(sorted(set(incident_ids))):
            cond, params = self.db.any_of("id", part)
            out.update((r[0], r[1]) for r in self.rows(
                f"SELECT id, netns FROM incidents WHERE {cond}", params))
        return out

    def incident(self, incident_id: int) -> tuple[Incident, list[ActionRun]]:
        rows = self.rows(f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE id = ?",
                         [incident_id])
        if not rows:
            raise NotFound(f"incident {incident_id}", "no such incident")
        return incident_of(rows[0]), self.actions_by_incident([incident_id])[incident_id]

    def actions_by_incident(self, ids: Sequence[int]) -> dict[int, list[ActionRun]]:
        out: dict[int, list[ActionRun]] = {i: [] for i in ids}
        for part in chunks(ids):
            cond, params = self.db.any_of("incident_id", part)
            for r in self.rows(f"SELECT {RUN_COLUMNS} FROM action_runs WHERE {cond} "
                               "ORDER BY at, id", params):
                out[r[0]].append(run_of(r))
        return out

    def samples(self, incident_id: int) -> list[StoredPoint]:
        """The incident's timeline, one point per probe while it lasted."""
        return [point_of(r) for r in self.rows(
            f"SELECT {POINT_COLUMNS} FROM evidence_samples WHERE incident_id = ? "
            "ORDER BY at, id", [incident_id])]

    def port_history(self, netns: str) -> dict[int, PortHistory]:
        """Per port, over the incidents with a verdict: how many, the peak SYN-RECV of real load,
        how many were capacity, and of those how many an application that stopped accepting."""
        stopped = "CAST(recommendations AS TEXT) LIKE ?"
        real = f"verdict = 'capacity' AND NOT ({stopped})"
        like = f"%{NOT_ACCEPTING}%"
        return {r[0]: PortHistory(r[0], r[1], r[2] or 0, int(r[3] or 0), r[4], int(r[5] or 0))
                for r in self.rows(
                    f"SELECT port, count(*), max(CASE WHEN {real} THEN peak_syn_recv ELSE 0 "
                    f"END), sum(CASE WHEN {real} THEN 1 ELSE 0 END), max(id), sum(CASE WHEN "
                    f"verdict = 'capacity' AND {stopped} THEN 1 ELSE 0 END) FROM incidents "
                    "WHERE netns = ? AND port IS NOT NULL AND verdict != 'unknown' "
                    "GROUP BY port", [like, like, like, netns])}

    def bans(self, host: str | None = None) -> list[Ban]:
        """Bans oldest first (of ``host``, else of every node); a time out of Python's range
        (PostgreSQL's 'infinity', written by anyone who can write the table) is shown at its
        bound instead of failing the whole list."""
        cond, params = where([("host = ?", host)])
        return [ban_of(r) for r in self.rows(f"SELECT {BAN_COLUMNS} FROM bans{cond} "
                                             "ORDER BY created_at, id", params)]

    def ban_checks(self, host: str | None = None) -> dict[tuple[str, str, str], str]:
        """What the ban reconcile last found (synwatch/actions/banproof.py): (host, netns, name) ->
        value of the ``ban.*`` saved settings."""
        cond, params = where([("name LIKE ?", "ban.%"), ("host = ?", host)])
        return {(r[0], r[1], r[2]): r[3] for r in self.rows(
            f"SELECT host, netns, name, value FROM saved_settings{cond}", params)}

    def nodes(self) -> list[Node]:
        """Every node that ever wrote a heartbeat, the most recently seen first."""
        return [node_of(r) for r in self.rows(
            f"SELECT {NODE_COLUMNS} FROM nodes ORDER BY seen_at DESC, host")]
