"""What the service reads back to carry on (after a restart, or to act on what it wrote): where
each source was, the incidents left open, the notifications to resend, the kernel settings to
restore, the bans to keep, and the fleet bans to copy. Every method returns records."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from synwatch.records import ActionRun, Ban, IncidentChange
from synwatch.store.base import HistoryBase
from synwatch.store.rows import (
    BAN_COLUMNS,
    INCIDENT_COLUMNS,
    RUN_COLUMNS,
    RUN_FIELDS,
    ban_columns,
    ban_of,
    loadable,
    parsed,
    resumed_of,
    run_of,
)


class State(HistoryBase):
    def get_position(self, source: str) -> dict[str, Any] | None:
        rows = self.rows("SELECT position FROM source_positions WHERE host = ? AND source = ?",
                         [self.host, source])
        return dict(parsed(rows[0][0])) if rows else None

    def open_incidents(self, host: str, netns: str | None) -> list[IncidentChange]:
        """Incidents left open (by a stop or a crash), as changes the correlator resumes; in
        every namespace when ``netns`` is None."""
        where, params = ("", [host]) if netns is None else (" AND netns = ?", [host, netns])
        return [resumed_of(r) for r in self.rows(
            f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE status = 'open' AND host = ?"
            f"{where} ORDER BY id", params)]

    def latest_runs(self, action: str, host: str, netns: str,
                    since: datetime) -> list[ActionRun]:
        """The latest run of ``action`` for each (incident, target) of this host and namespace
        (a fleet shares the history) recorded since ``since``."""
        latest: dict[tuple[int | None, str], ActionRun] = {}
        for r in self.rows(f"SELECT {', '.join('r.' + c for c in RUN_FIELDS)} FROM action_runs "
                           "r JOIN incidents i ON r.incident_id = i.id WHERE r.action = ? AND "
                           "r.at >= ? AND r.host = ? AND i.host = ? AND i.netns = ? "
                           "ORDER BY r.at, r.id", [action, since, host, host, netns]):
            run = run_of(r)
            latest[run.incident_id, run.target] = run
        return list(latest.values())

    def action_runs(self, incident_id: int) -> list[ActionRun]:
        return [run_of(r) for r in self.rows(
            f"SELECT {RUN_COLUMNS} FROM action_runs WHERE incident_id = ? ORDER BY at, id",
            [incident_id])]

    def saved_setting(self, netns: str, name: str) -> str | None:
        rows = self.rows("SELECT value FROM saved_settings WHERE host = ? AND netns = ? AND "
                         "name = ?", [self.host, netns, name])
        return str(rows[0][0]) if rows else None

    def saved_settings(self) -> list[tuple[str, str, str]]:
        """(netns, name, value) of every setting this node changed and has not put back."""
        return [(r[0], r[1], r[2]) for r in self.rows(
            "SELECT netns, name, value FROM saved_settings WHERE host = ?", [self.host])]

    def namespaces(self) -> set[str]:
        """Every namespace this node has banned in or holds a setting of (the package's
        removal lifts what synwatch holds in each, watch.netns having changed or not)."""
        return {r[0] for r in self.rows(
            "SELECT netns FROM bans WHERE host = ? UNION SELECT netns FROM saved_settings "
            "WHERE host = ?", [self.host, self.host])}

    # -- bans -----------------------------------------------------------------------------------

    def active_bans(self, netns: str | None, now: datetime,
                    backend: str | None = None) -> list[Ban]:
        """This node's bans in force in ``netns`` (every namespace: None; a fleet shares the
        table)."""
        extra, params = (" AND backend = ?", [backend]) if backend is not None else ("", [])
        where, first = (" AND netns = ?", [netns]) if netns is not None else ("", [])
        return [ban_of(r) for r in self.rows(
            f"SELECT {BAN_COLUMNS} FROM bans WHERE host = ?{where} AND removed_at IS "
            f"NULL AND expires_at > ? AND {loadable('created_at', 'expires_at')}{extra} "
            "ORDER BY created_at, id", [self.host, *first, now, *params])]

    def expired_bans(self, netns: str, now: datetime, backend: str) -> list[Ban]:
        """Bans past their expiry that nobody removed (for backends without kernel timeouts)."""
        return [ban_of(r) for r in self.rows(
            f"SELECT {BAN_COLUMNS} FROM bans WHERE host = ? AND netns = ? AND backend = ? AND "
            f"removed_at IS NULL AND expires_at <= ? AND "
            f"{loadable('created_at', 'expires_at')} ORDER BY created_at, id",
            [self.host, netns, backend, now])]

    def times_banned(self, netns: str, prefix: str) -> int:
        """How often ``prefix`` was banned before (for longer bans of repeat offenders)."""
        return int(self.rows("SELECT count(*) FROM bans WHERE host = ? AND netns = ? AND "
                             "prefix = ?", [self.host, netns, prefix])[0][0])

    def incident_bans(self, incident_id: int) -> set[str]:
        return {r[0] for r in self.rows("SELECT prefix FROM bans WHERE host = ? AND "
                                        "incident_id = ?", [self.host, incident_id])}

    def fleet_bans_to_copy(self, now: datetime, after: int = 0,
                           limit: int | None = None, netns: str = "") -> list[Ban]:
        """Fleet bans decided on other nodes, in force, that this node has not copied yet into
        ``netns`` (a copy it lifted or let expire early counts as copied: it is decided; each
        watched namespace holds copies of its own). With ``limit``: a
        page of at most that many, by id, after the id ``after``. Times out of Python's range
        read as the bounds of rows.in_range, the prefix as written (the ban action validates
        each row like a log line)."""
        page, more = (" AND b.id > ? ORDER BY b.id LIMIT ?", [after, limit]) \
            if limit is not None else (" ORDER BY b.created_at, b.id", [])
        return [ban_of(r) for r in self.rows(
            f"SELECT {ban_columns('b.')} FROM bans b WHERE b.scope = 'fleet' AND "
            "b.origin_id IS NULL AND b.host != ? AND b.removed_at IS NULL AND "
            "b.expires_at > ? AND NOT EXISTS (SELECT 1 FROM bans m WHERE m.origin_id = b.id "
            f"AND m.host = ? AND m.netns = ?){page}", [self.host, now, self.host, netns, *more])]

    def fleet_cursor(self) -> int:
        """The number of the fleet's last change: a node that copies every ban in force now
        reads the changes after it (``fleet_changes``)."""
        [(last,)] = self.rows("SELECT max(fleet_seq) FROM bans")
        return int(last or 0)

    def fleet_changes(self, after: int, limit: int) -> list[tuple[int, Ban]]:
        """The fleet's changes after number ``after``, at most ``limit``, in order: each fleet
        ban decided (on any node, this one too) or lifted everywhere since (its origin row,
        ``removed_at`` set), with its number. An index probe when nothing changed."""
        return [(int(r[-1]), ban_of(r)) for r in self.rows(
            f"SELECT {BAN_COLUMNS}, fleet_seq FROM bans WHERE fleet_seq > ? AND "
            "scope = 'fleet' AND origin_id IS NULL ORDER BY fleet_seq LIMIT ?", [after, limit])]
