"""The service's history: ``SpooledStore`` writes to the history while it answers and to the
spool while not (synwatch/store/spooling.py says which), and reads fall back to what was read
last plus what is spooled, so a restart during an outage loses nothing either."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from datetime import datetime
from typing import Any

from synwatch.config import sqlite_file
from synwatch.errors import StoreError, StoreOutage
from synwatch.records import ActionRun, Ban, IncidentChange, NewEvent
from synwatch.store.spool import (
    EVENT_BYTES,
    FALLBACK,
    RUNS_KEPT,
    THIN_EVERY,
    THIN_FULL,
    AwayError,
    Spool,
    SpoolFull,
    change_of,
    unreachable,
)
from synwatch.store.spooling import SET_ASIDE, SpoolingHistory

log = logging.getLogger("synwatch")


class SpooledStore(SpoolingHistory):
    """The history with writes spooled while it is away (synwatch/store/spool.py)."""

    # -- writes -------------------------------------------------------------------------------

    def insert_events(self, events: Sequence[NewEvent], now: datetime,
                      position: tuple[str, dict[str, Any]] | None = None) -> list[int | None]:
        if self.spooling and not self.spool.fits(len(events), EVENT_BYTES * len(events)):
            raise SpoolFull(self.display_url, f"the spool is full ({self.spool.records} of "
                            f"{self.spool.limit} records, storage.spool_max; "
                            f"{self.spool.bytes >> 20} of {self.spool.max_bytes >> 20} MiB): "
                            "kernel lines wait in their source")
        made = self._provisional(len(events))
        done = self._try(lambda: {"op": "events", "events": [asdict(e) for e in events],
                                  "now": now, "position": list(position) if position else None,
                                  "made": made}, "insert_events", events, now, position)
        if position is not None:  # the newest, written or spooled (a restart reads it)
            self._positions[position[0]] = position[1]
        return list(done) if isinstance(done, list) else list(made)

    def save_incident(self, c: IncidentChange) -> int:
        c = replace(c, incident_id=self._real(c.incident_id),
                    event_ids=tuple(i for i in map(self._real, c.event_ids) if i is not None))
        made = [c.incident_id] if c.incident_id is not None else self._provisional(1)
        if made[0] < 0:
            self._incidents.add(made[0])
        def op() -> dict[str, Any]:
            return {"op": "incident", "change": asdict(c), "made": made}

        if (self.spooling and c.change == "updated" and not c.event_ids
                and self._thinned(made[0], c, op())):
            return made[0]
        # a provisional id the history never numbered (its opening was set aside): the
        # history gives this change its own, which later changes are mapped to
        unnumbered = c.incident_id is not None and c.incident_id < 0
        done = self._try(op, "save_incident",
                         replace(c, incident_id=None) if unnumbered else c)
        if done is SET_ASIDE:
            return int(made[0])
        if unnumbered and done is not None:
            self.ids[made[0]] = int(done)
            return int(made[0])
        if done is None and c.change == "updated":
            # an update that links events is the newest state: later updates thin into it,
            # never into a slot before it (replayed after them, that would win)
            if c.sample is not None and (made[0] not in self._thin or c.event_ids):
                self._thin[made[0]] = (len(self.spool.ops) - 1, c.sample.at)
            elif c.event_ids:
                self._thin.pop(made[0], None)
        elif c.change != "updated":
            self._thin.pop(made[0], None)
        return int(done) if done is not None else int(made[0])

    def _thinned(self, incident: int, c: IncidentChange, op: dict[str, Any]) -> bool:
        """Put an update in the place of the incident's last spooled update when that is
        within the thinning window (its events linked too): a long outage keeps one sample
        per window, and the spool stays within its bound however long the incident."""
        slot = self._thin.get(incident)
        if slot is None:
            return False
        index, first = slot
        ops = self.spool.ops
        if index >= len(ops) or ops[index]["op"] != "incident" \
                or ops[index]["made"] != [incident] \
                or ops[index]["change"]["change"] != "updated":
            self._thin.pop(incident, None)
            return False
        full = not self.spool.fits(1)
        window = THIN_FULL if not self.spool.fits(self.spool.limit // 2) else THIN_EVERY
        at = c.sample.at if c.sample is not None else first
        if not full and (at - first).total_seconds() >= window:
            self._thin.pop(incident, None)  # this one starts the next window
            return False
        # in its place: the events it links (none: an update that links events is never
        # thinned, its events come after the slot) are the slot's own, made before it
        op["change"]["event_ids"] = list(ops[index]["change"]["event_ids"])
        self.spool.replace(index, op)
        return True

    def add_action_runs(self, runs: Sequence[ActionRun]) -> None:
        runs = [replace(r, incident_id=self._real(r.incident_id)) for r in runs]
        for r in runs:
            if r.incident_id is not None and r.incident_id in self._runs:
                self._runs[r.incident_id].append(r)
        self._try(lambda: {"op": "runs", "runs": [asdict(r) for r in runs]}, "add_action_runs",
                  runs)

    def add_bans(self, bans: Sequence[Ban]) -> list[int]:
        bans = [replace(b, incident_id=self._real(b.incident_id)) for b in bans]
        made = self._provisional(len(bans))
        done = self._try(lambda: {"op": "bans", "bans": [asdict(b) for b in bans],
                                  "made": made}, "add_bans", bans)
        given = list(done) if isinstance(done, list) else made
        # the fallback view of active bans, whichever way they were written: an outage
        # before the next read must not hide them from the reconcile
        for key, active in self._active.items():
            active += [replace(b, id=i, host=self.host) for b, i in zip(bans, given,
                                                                        strict=True)
                       if b.netns == key[0] and key[1] in (None, b.backend)
                       and b.removed_at is None]
        self._keep_view(now=self.spooling)
        return given

    def mark_removed(self, ban_ids: Sequence[int | None], now: datetime, *,
                     everywhere: bool = False) -> None:
        ids = [self._real(i) for i in ban_ids]
        self._try(lambda: {"op": "removed", "ids": ids, "now": now, "everywhere": everywhere},
                  "mark_removed", ids, now, everywhere=everywhere)
        gone = set(ids)
        for key, active in self._active.items():
            self._active[key] = [b for b in active if b.id not in gone]
        self._keep_view(now=self.spooling)

    def save_setting(self, netns: str, name: str, value: str, now: datetime) -> None:
        self._settings[netns, name] = value
        self._try(lambda: {"op": "setting", "netns": netns, "name": name, "value": value,
                           "now": now},
                  "save_setting", netns, name, value, now)

    def forget_setting(self, netns: str, name: str) -> None:
        self._settings[netns, name] = None
        self._try(lambda: {"op": "forget", "netns": netns, "name": name}, "forget_setting",
                  netns, name)

    def heartbeat(self, pid: int, started_at: datetime, now: datetime, version: str) -> None:
        self._call("heartbeat", pid, started_at, now, version)

    def prune_events(self, before: datetime, batch: int = 2000) -> int:
        return int(self._call("prune_events", before, batch))

    def prune_incidents(self, before: datetime, now: datetime, batch: int = 200) -> int:
        return int(self._call("prune_incidents", before, now, batch))

    # -- reads, with what was read last and what is spooled as the fallback --------------------

    def _read(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A read, or FALLBACK while the history is away."""
        if self.migrated and not self.away:
            try:
                return self._call(method, *args, **kwargs)
            except StoreOutage:
                pass
        return FALLBACK

    def active_bans(self, netns: str | None, now: datetime,
                    backend: str | None = None) -> list[Ban]:
        if not self.spooling:
            found = self._read("active_bans", netns, now, backend)
            if found is not FALLBACK:
                if netns is not None and found != self._active.get((netns, backend)):
                    self._active[(netns, backend)] = list(found)  # (every namespace's: not kept)
                    self._keep_view()
                return list(found)
        if netns is None or (netns, backend) not in self._active:
            if backend is not None:
                # never a guess: the ban reconcile would remove what it does not see
                raise AwayError(self.display_url, "away, and its bans were never read")
            # every backend's as read last, and what was banned since (a ban's caps and
            # overlaps, not a reconcile: with nothing read, the caps count from here)
            seen = [b for (ns, _), bans in self._active.items() if netns in (None, ns)
                    for b in bans]
            gone = {i for op in self.spool.ops if op["op"] == "removed" for i in op["ids"]}
            seen += [replace(Ban(**b), id=i, host=self.host) for op in self.spool.ops
                     if op["op"] == "bans" for b, i in zip(op["bans"], op["made"], strict=True)
                     if netns in (None, b["netns"]) and b["removed_at"] is None
                     and i not in gone]
            return list({b.id: b for b in seen if b.expires_at > now}.values())
        return [b for b in self._active[(netns, backend)] if b.expires_at > now]

    def _spooled_runs(self, keep: Callable[[dict[str, Any]], bool]) -> list[ActionRun]:
        return [ActionRun(**r) for op in self.spool.ops if op["op"] == "runs"
                for r in op["runs"] if keep(r)]

    def action_runs(self, incident_id: int) -> list[ActionRun]:
        """Read once per incident while the history answers, then kept up to date here: a
        notification is composed from memory during an outage."""
        wanted = self._real(incident_id) or incident_id
        if wanted not in self._runs:
            found = [] if wanted < 0 else self._read("action_runs", wanted)
            spooled = self._spooled_runs(lambda r: bool(r["incident_id"] == wanted))
            if found is FALLBACK:
                return spooled
            self._runs[wanted] = [*found, *spooled]
            while len(self._runs) > RUNS_KEPT:
                self._runs.pop(next(iter(self._runs)))
        return list(self._runs[wanted])

    def latest_runs(self, action: str, host: str, netns: str,
                    since: datetime) -> list[ActionRun]:
        found = self._read("latest_runs", action, host, netns, since)
        spooled = self._spooled_runs(lambda r: bool(r["action"] == action and r["at"] >= since))
        return [*([] if found is FALLBACK else found), *spooled]

    def incident_bans(self, incident_id: int) -> set[str]:
        spooled = {b["prefix"] for op in self.spool.ops if op["op"] == "bans"
                   for b in op["bans"] if b["incident_id"] == incident_id}
        if incident_id < 0:
            return spooled
        found = self._read("incident_bans", incident_id)
        return spooled if found is FALLBACK else set(found) | spooled

    def times_banned(self, netns: str, prefix: str) -> int:
        spooled = sum(1 for op in self.spool.ops if op["op"] == "bans" for b in op["bans"]
                      if (b["netns"], b["prefix"]) == (netns, prefix))
        found = self._read("times_banned", netns, prefix)
        return spooled + (0 if found is FALLBACK else int(found))

    def saved_setting(self, netns: str, name: str) -> str | None:
        for op in reversed(self.spool.ops):
            if op["op"] in ("setting", "forget") and (op["netns"], op["name"]) == (netns, name):
                return str(op["value"]) if op["op"] == "setting" else None
        found = self._read("saved_setting", netns, name)
        if found is FALLBACK:
            # as read or written last; never read: none (SYN cookies read the sysctl itself)
            return self._settings.get((netns, name))
        self._settings[netns, name] = found
        return None if found is None else str(found)

    def saved_settings(self) -> list[tuple[str, str, str]]:
        found = self._read("saved_settings")
        if found is not FALLBACK:
            for netns, name, value in found:
                self._settings[netns, name] = value
        return [(ns, name, value) for (ns, name), value in self._settings.items()
                if value is not None]

    def expired_bans(self, netns: str, now: datetime, backend: str) -> list[Ban]:
        found = self._read("expired_bans", netns, now, backend)
        # away: marked removed when the history answers (the kernel timed them out)
        return [] if found is FALLBACK else list(found)

    def fleet_bans_to_copy(self, now: datetime, after: int = 0,
                           limit: int | None = None, netns: str = "") -> list[Ban]:
        return list(self._call("fleet_bans_to_copy", now, after=after, limit=limit,
                               netns=netns))

    def lift_copies(self, origin_ids: Sequence[int], netns: str, now: datetime) -> None:
        self._call("lift_copies", origin_ids, netns, now)

    def fleet_cursor(self) -> int:
        return int(self._call("fleet_cursor"))

    def fleet_changes(self, after: int, limit: int) -> list[tuple[int, Ban]]:
        return list(self._call("fleet_changes", after, limit))

    def get_position(self, source: str) -> dict[str, Any] | None:
        if source in self._positions:
            return self._positions[source]
        for op in reversed(self.spool.ops):
            if op.get("position") and op["position"][0] == source:
                return dict(op["position"][1])
        found = self._read("get_position", source)
        if found is FALLBACK:
            # no position: the source reads what it still has, and what is already recorded
            # is skipped when the spool is replayed (events are unique per host and entry)
            log.warning("store: away; source %s starts without its position", source)
            return None
        return None if found is None else dict(found)

    def open_incidents(self, host: str, netns: str | None) -> list[IncidentChange]:
        """Incidents left open, from the history and from the spool (a restart during an
        outage), the spool's latest change of each."""
        found = self._read("open_incidents", host, netns)
        latest: dict[int, IncidentChange] = {}
        for op in self.spool.ops:
            if op["op"] == "incident":
                c = change_of(dict(op["change"]))
                latest[c.incident_id or op["made"][0]] = replace(
                    c, incident_id=c.incident_id or op["made"][0])
        spooled = [replace(c, change="updated", serial=0, sample=None, earlier=(), event_ids=())
                   for c in latest.values()
                   if c.status == "open" and c.host == host
                   and netns in (None, c.netns)]
        known = {c.incident_id for c in spooled}
        return [c for c in ([] if found is FALLBACK else found)
                if c.incident_id not in known] + spooled


def open_spooled(url: str, host: str, spool: Spool) -> SpooledStore:
    """The service's history, behind ``spool``: whatever happens to it (a database server that
    does not answer; an SQLite file locked, full, read-only, deleted or corrupt), detection and
    actions go on and it is written when it can be. A history that cannot be opened does not
    stop the start."""
    from synwatch.store import History, prepare  # noqa: PLC0415 - the package imports us

    try:
        # bounded: a server that does not answer fails within seconds, as one that refuses
        history = History.open(url, host=host, bounded=True)
    except StoreError as exc:
        if not unreachable(exc):
            raise
        log.error("store: %s; starting on the spool %s (%d records waiting): "  # noqa: TRY400
                  "acting, not recording until it can be written", exc, spool.path,
                  spool.records)
        if sqlite_file(url) is not None:  # not even a file: made when the disk takes it
            spooled = SpooledStore(None, spool, migrated=False, url=url, host=host,
                                   opener=lambda: History.open(url, host=host, bounded=True),
                                   prepare=lambda: prepare(url, host))
        else:  # a server: tried every few seconds, migrated when it answers
            spooled = SpooledStore(History.open(url, host=host, migrate=False, bounded=True),
                                   spool, migrated=False)
        spooled.problem = exc.why
        return spooled
    log.info("store: %s (schema %s%s)", history.display_url, history.schema_revision(),
             "" if sqlite_file(url) is not None else f", node {host}")
    if spool.ops:
        log.info("store: %d records spooled before the restart are written first",
                 spool.records)
    return SpooledStore(history, spool, migrated=True)
