"""Recording: kernel events with the source position that covers them, incidents with their
timeline and linked events, action outcomes, bans, the heartbeat, and pruning (storage.retention:
each node prunes only its own rows, in small transactions, so a prune never holds the history
long enough to keep a write of the detection path waiting). Each call is one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from synwatch.records import ActionRun, Ban, IncidentChange, NewEvent
from synwatch.store.base import Cursor, HistoryBase
from synwatch.store.rows import EVENT_FIELDS

PRUNE_BATCH = 2000  # events per transaction
FLEET_LOCK = 0x73796E66  # "synf": the transaction lock that numbers the fleet's changes
CHUNK = 500  # ids per IN (...): SQLite's default limit on variables is 999 before 3.32
ALONE = 1000  # rows one INSERT statement takes (PostgreSQL binds at most 65,535 parameters)


def marks(n: int) -> str:
    return ", ".join("?" * n)


def chunks(ids: Sequence[Any], size: int = CHUNK) -> list[list[Any]]:
    return [list(ids[i:i + size]) for i in range(0, len(ids), size)]


class Writes(HistoryBase):
    def insert_events(self, events: Sequence[NewEvent], now: datetime,
                      position: tuple[str, dict[str, Any]] | None = None) -> list[int | None]:
        """Record ``events`` and the source position that covers them, in one transaction.
        An entry whose ``dedup_key`` this node has recorded before is skipped, so a replayed
        entry is never recorded twice. Returns each event's new id, None for those skipped."""
        keys = [e.dedup_key for e in events if e.dedup_key]
        ids: list[int | None] = []
        insert = (f"INSERT INTO events (recorded_at, host, {', '.join(EVENT_FIELDS)}) "
                  f"VALUES (?, ?, {marks(len(EVENT_FIELDS))})")
        with self.writing() as cur:
            known = set()
            for part in chunks(keys):
                cond, params = self.db.any_of("dedup_key", part)
                known |= {r[0] for r in cur.execute(f"SELECT dedup_key FROM events WHERE "
                                                    f"host = ? AND {cond}",
                                                    [self.host, *params]).fetchall()}
            new: list[NewEvent] = []
            for e in events:
                if e.dedup_key and e.dedup_key in known:
                    ids.append(None)
                    continue
                if e.dedup_key:
                    known.add(e.dedup_key)
                ids.append(len(new))  # its place among the new ones, for now
                new.append(e)
            # host: the recording node, whatever the log line names
            made = cur.insert_many(insert, [[now, self.host,
                                             *(getattr(e, f) for f in EVENT_FIELDS)]
                                            for e in new])
            ids = [None if i is None else made[i] for i in ids]
            if position is not None:
                cur.execute("INSERT INTO source_positions (host, source, position, updated_at) "
                            "VALUES (?, ?, ?, ?) ON CONFLICT (host, source) DO UPDATE SET "
                            "position = excluded.position, updated_at = excluded.updated_at",
                            [self.host, position[0], self.db.json(position[1]), now])
        return ids

    def record_events(self, events: Sequence[NewEvent], now: datetime,
                      position: tuple[str, dict[str, Any]] | None = None) -> int:
        """Like insert_events; returns how many were new."""
        return sum(i is not None for i in self.insert_events(events, now, position))

    def save_incident(self, c: IncidentChange) -> int:
        """Insert or update the incident of a correlator change, with its timeline point and
        events, in one transaction; returns the incident's id."""
        js = self.db.json
        fields: dict[str, Any] = {
            "host": c.host, "netns": c.netns, "address": c.address, "port": c.port,
            "family": c.family, "status": c.status, "verdict": c.verdict, "trigger": c.trigger,
            "opened_at": c.opened_at, "closed_at": c.closed_at,
            "first_evidence_at": c.first_evidence_at, "detected_at": c.detected_at,
            "peak_syn_recv": c.peak_syn_recv,
            "top_prefixes": js([{"prefix": p, "count": n, "share": sh, "completed": k}
                                for p, n, sh, k in c.top_prefixes]),
            "recommendations": js(list(c.recommendations)),
            "evidence": js({**c.state, "reasons": list(c.reasons)}),  # the column's old name
        }
        with self.writing() as cur:
            incident_id = c.incident_id
            if incident_id is not None:
                cur.execute(f"UPDATE incidents SET {', '.join(f'{k} = ?' for k in fields)} "
                            "WHERE id = ?", [*fields.values(), incident_id])
            if incident_id is None or cur.rowcount == 0:
                # an SQLite file deleted under the service and started anew keeps the
                # incident's number (the spool's later writes name it); a server's sequence
                # hands out its own
                keep = incident_id is not None and self.db.name == "sqlite"
                given = {"id": incident_id, **fields} if keep else fields
                incident_id = cur.insert(f"INSERT INTO incidents ({', '.join(given)}) "
                                         f"VALUES ({marks(len(given))})", list(given.values()))
            for x in (*c.earlier, *([c.sample] if c.sample is not None else [])):
                cur.execute("INSERT INTO evidence_samples (incident_id, at, syn_recv, "
                            "accept_queue, backlog, rates, top_prefixes) VALUES "
                            "(?, ?, ?, ?, ?, ?, ?)",
                            [incident_id, x.at, x.syn_recv, x.accept_queue, x.backlog,
                             js(x.rates), js([[p, n] for p, n in x.top_prefixes])])
            for part in chunks(c.event_ids):
                cond, params = self.db.any_of("id", part)
                cur.execute(f"UPDATE events SET incident_id = ? WHERE {cond}",
                            [incident_id, *params])
            return incident_id

    def add_action_runs(self, runs: Sequence[ActionRun]) -> None:
        """Record action outcomes (all or none)."""
        if not runs:
            return
        rows = [(r.incident_id, r.action, r.target[:255], r.status, r.at, r.rendered, r.detail,
                 r.retry_at, r.host or self.host) for r in runs]
        with self.alone() if len(rows) <= ALONE else self.writing() as cur:
            for part in chunks(rows, ALONE):
                cur.insert_rows("INSERT INTO action_runs (incident_id, action, target, status, "
                                "at, rendered, detail, retry_at, host)", part, returning=False)

    def add_bans(self, bans: Sequence[Ban]) -> list[int]:
        """Record bans; returns their ids. A fleet ban decided here (no ``origin_id``) takes
        the next number of the fleet's changes, which the other nodes poll for (numbered
        after the inserts: the lock that numbers is held only for the last statements)."""
        rows = [(b.prefix, b.backend, b.netns, b.incident_id, b.created_at, b.expires_at,
                 b.removed_at, b.times_banned, b.host or self.host, b.scope, b.origin_id)
                for b in bans]
        fresh = [n for n, b in enumerate(bans)
                 if b.scope == "fleet" and b.origin_id is None and b.removed_at is None]
        # one row, nothing to number (a node's copy of a fleet ban, a local ban): sent alone
        with self.alone() if not fresh and len(rows) == 1 else self.writing() as cur:
            ids = [i for part in chunks(rows, ALONE) for i in cur.insert_rows(
                "INSERT INTO bans (prefix, backend, netns, incident_id, created_at, expires_at, "
                "removed_at, times_banned, host, scope, origin_id)", part)]
            self._number(cur, [ids[n] for n in fresh])
        return ids

    def mark_removed(self, ban_ids: Sequence[int | None], now: datetime, *,
                     everywhere: bool = False) -> None:
        """Bans gone from the firewall. With ``everywhere`` (`unban`), a fleet ban (an origin or
        a copy) is lifted with every copy of it on every node, and its origin takes the next
        number of the fleet's changes, so the other nodes take it out of their firewalls; an
        expiry lifts only the row itself."""
        ids = {i for i in ban_ids if i is not None}
        if not ids:
            return
        with self.writing() as cur:
            fleet: list[tuple[Any, ...]] = []
            for part in chunks(sorted(ids)) if everywhere else []:
                cond, params = self.db.any_of("id", part)
                fleet += cur.execute(f"SELECT id, origin_id FROM bans WHERE {cond} AND "
                                     "scope = 'fleet'", params).fetchall()
            origins = sorted({origin or ban for ban, origin in fleet})
            for part in chunks(origins):
                (one, ones), (other, others) = (self.db.any_of("id", part),
                                                self.db.any_of("origin_id", part))
                ids |= {r[0] for r in cur.execute(
                    f"SELECT id FROM bans WHERE ({one} OR {other}) AND removed_at IS NULL",
                    ones + others).fetchall()}
            for part in chunks(sorted(ids)):
                cond, params = self.db.any_of("id", part)
                cur.execute(f"UPDATE bans SET removed_at = ? WHERE {cond} AND removed_at IS "
                            "NULL", [now, *params])
            self._number(cur, origins)

    def lift_copies(self, origin_ids: Sequence[int], netns: str, now: datetime) -> None:
        """This node's copies in ``netns`` of fleet bans lifted everywhere, marked removed:
        those written after the lift (a copy made from a page read before it)."""
        with self.writing() as cur:
            for part in chunks(list(origin_ids)):
                cond, params = self.db.any_of("origin_id", part)
                cur.execute(f"UPDATE bans SET removed_at = ? WHERE host = ? AND netns = ? AND "
                            f"{cond} AND removed_at IS NULL", [now, self.host, netns, *params])

    def _number(self, cur: Cursor, ban_ids: Sequence[int]) -> None:
        """The next numbers of the fleet's changes for ``ban_ids``, in order, taken with the
        right to them until this transaction ends: numbers are handed out in commit order, so
        a node that has read up to N never finds a change below N committed later (SQLite has
        one writer at a time; PostgreSQL waits for the transaction lock)."""
        if not ban_ids:
            return
        self.db.serialize(cur.cur, FLEET_LOCK)
        [(last,)] = cur.execute("SELECT max(fleet_seq) FROM bans").fetchall()
        cur.executemany("UPDATE bans SET fleet_seq = ? WHERE id = ?",
                        [(int(last or 0) + n, i) for n, i in enumerate(ban_ids, 1)])

    def heartbeat(self, pid: int, started_at: datetime, now: datetime, version: str) -> None:
        with self.alone() as cur:
            cur.execute("INSERT INTO nodes (host, pid, started_at, seen_at, version) VALUES "
                        "(?, ?, ?, ?, ?) ON CONFLICT (host) DO UPDATE SET pid = excluded.pid, "
                        "started_at = excluded.started_at, seen_at = excluded.seen_at, "
                        "version = excluded.version",
                        [self.host, pid, started_at, now, version[:32]])

    def save_setting(self, netns: str, name: str, value: str, now: datetime) -> None:
        with self.alone() as cur:
            cur.execute("INSERT INTO saved_settings (host, netns, name, value, saved_at) VALUES "
                        "(?, ?, ?, ?, ?) ON CONFLICT (host, netns, name) DO UPDATE SET "
                        "value = excluded.value, saved_at = excluded.saved_at",
                        [self.host, netns, name, value, now])

    def forget_setting(self, netns: str, name: str) -> None:
        with self.alone() as cur:
            cur.execute("DELETE FROM saved_settings WHERE host = ? AND netns = ? AND name = ?",
                        [self.host, netns, name])

    # -- retention (storage.retention) ----------------------------------------------------------

    def prune_events(self, before: datetime, batch: int = PRUNE_BATCH) -> int:
        """Delete up to ``batch`` of this node's events that happened before ``before``;
        returns how many (call again while it returns ``batch``)."""
        with self.writing() as cur:
            return cur.execute("DELETE FROM events WHERE id IN (SELECT id FROM events WHERE "
                               "host = ? AND coalesce(time, recorded_at) < ? LIMIT ?)",
                               [self.host, before, batch]).rowcount

    def prune_incidents(self, before: datetime, now: datetime, batch: int = 200) -> int:
        """Delete up to ``batch`` of this node's incidents closed before ``before``, with their
        timelines, action runs and ended bans; their events stay, unlinked. An incident with a
        ban still in force stays until the ban ends."""
        with self.writing() as cur:
            ids = [r[0] for r in cur.execute(
                "SELECT i.id FROM incidents i WHERE i.host = ? AND i.status = 'closed' AND "
                "i.closed_at < ? AND NOT EXISTS (SELECT 1 FROM bans b WHERE "
                "b.incident_id = i.id AND b.removed_at IS NULL AND b.expires_at > ?) LIMIT ?",
                [self.host, before, now, batch]).fetchall()]
            if ids:
                for sql, column in (("UPDATE events SET incident_id = NULL", "incident_id"),
                                    ("DELETE FROM evidence_samples", "incident_id"),
                                    ("DELETE FROM action_runs", "incident_id"),
                                    ("DELETE FROM bans", "incident_id"),
                                    ("DELETE FROM incidents", "id")):
                    cond, params = self.db.any_of(column, ids)
                    cur.execute(f"{sql} WHERE {cond}", params)
            return len(ids)
