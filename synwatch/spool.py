"""Keeping on when the database server is gone: what the service must record goes to a spool on
disk, in order, and is written to the database when it answers again.

``SpooledStore`` is the service's store when the history is a database server (an SQLite file
is on this machine: a locked one is waited for, see Service). A write the server refuses for a
lost connection is appended to ``spool.jsonl`` in the state directory, with provisional
(negative) ids for the incidents, events and bans it creates, so detection and actions go on
with them. ``catch_up`` replays the spool in order, mapping provisional ids to the database's,
and the provisional ids the live service still holds are mapped on every later write. Reads
fall back to what was read last plus what is spooled (active bans, a source's position, the
incidents a restart resumes), so a restart while disconnected loses nothing either.

While the server does not answer (``away``: a write or read failed for a lost connection, or
the start found it unreachable), nothing but a background thread (one cheap ``SELECT 1`` every
PROBE_EVERY, bounded by the connection's timeouts: synwatch/store/__init__.py) talks to it: every
read answers from what was read last at once, every write is spooled at once, so a partitioned
server costs the main loop at most one bounded wait, not one per call. When the thread sees the
server answer, the service replays the spool (``catch_up``).

The spool is bounded (storage.spool_max records): past it, events are refused (the service then
keeps its batch and its source does not move on, so journald and files keep them for later);
incidents, action outcomes, bans and settings are always kept: they are few, and only here.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from synwatch.errors import StoreError
from synwatch.records import ActionRun, Ban, BanTarget, IncidentChange, NewEvent, TimelinePoint
from synwatch.store import Store

log = logging.getLogger("synwatch")
VIEW_EVERY = 5.0  # seconds between writes of the bans view while the database answers
CATCH_UP_OPS = 200  # spooled writes replayed per call, so a long backlog never holds detection
PROBE_EVERY = 2.0  # seconds between the away thread's tries of the server


class AwayError(StoreError):
    """The server did not answer lately: not tried again until the away thread sees it."""


def unreachable(exc: StoreError) -> bool:
    """Is this a lost connection (spool and retry) rather than a refused write (an error)?"""
    if isinstance(exc, AwayError):
        return True
    cause = exc.__cause__
    return isinstance(cause, (OperationalError, InterfaceError)) or (
        isinstance(cause, DBAPIError) and cause.connection_invalidated)


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$t": value.isoformat()}
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


def _unjson(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$t"}:
            return datetime.fromisoformat(value["$t"])
        return {k: _unjson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unjson(v) for v in value]
    return value


def _change(data: dict[str, Any]) -> IncidentChange:
    sample = data.pop("sample")
    tuples = {k: tuple(tuple(x) if isinstance(x, list) else x for x in data[k])
              for k in ("top_prefixes", "recommendations", "reasons", "event_ids")}
    point = None if sample is None else TimelinePoint(
        **{**sample, "top_prefixes": tuple(tuple(p) for p in sample["top_prefixes"])})
    targets = {k: tuple(BanTarget(**{**x, "parts": tuple(x["parts"])})
                        for x in data.get(k, ())) for k in ("bans", "limits")}
    return IncidentChange(**{**data, **tuples, **targets, "sample": point})


def _weight(op: dict[str, Any]) -> int:
    """Records an op counts for against storage.spool_max: its events, else one."""
    return len(op.get("events", ())) or 1


class Spool:
    """An append-only file of writes, one JSON object a line, replayed in order."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path, self.limit = path, limit
        self.ops: list[dict[str, Any]] = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    self.ops.append(_unjson(json.loads(line)))
                except ValueError:
                    log.warning("spool %s: a torn last line skipped (a crash mid-write)", path)
        self.records = sum(map(_weight, self.ops))

    def add(self, op: dict[str, Any]) -> None:
        """Append ``op`` durably (fsync: a crash right after loses nothing it was told)."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
            try:
                os.write(fd, (json.dumps(_json(op)) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # the caller keeps what it has in memory and tries again
            raise StoreError(str(self.path), f"cannot write the spool: {exc.strerror}") from exc
        self.ops.append(op)
        self.records += _weight(op)

    def done(self, count: int) -> None:
        """The first ``count`` ops are in the database: keep the rest (atomically)."""
        self.ops = self.ops[count:]
        self.records = sum(map(_weight, self.ops))
        if not self.ops:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(_json(op)) + "\n" for op in self.ops),
                       encoding="utf-8")
        tmp.replace(self.path)

    def provisional_floor(self) -> int:
        """Below every provisional id the spool already uses (a restart goes on from here)."""
        ids = [int(i) for op in self.ops for i in op.get("made", ())]
        return min([0, *ids])


class SpooledStore(Store):
    """The store, with writes spooled while the database server is unreachable."""

    def __init__(self, store: Store, spool: Spool, *, migrated: bool) -> None:
        """``store`` opened (``migrated``: and its schema brought up to date; else that is
        the first thing done when the server answers)."""
        super().__init__(store.url, store.engine, store.host)
        self.busy_timeout = store.busy_timeout
        self.spool, self.migrated = spool, migrated
        self.ids: dict[int, int | None] = {}  # provisional -> the database's (None: duplicate)
        self._next = spool.provisional_floor() - 1
        # what was read last, the fallback while the server is gone: active bans per (netns,
        # backend), and positions spooled since
        self._active: dict[tuple[str, str | None], list[Ban]] = {}
        self._positions: dict[str, dict[str, Any] | None] = {}
        self._view = spool.path.with_name("bans-seen.json")  # _active, for a restart
        self._view_due, self._view_dirty = 0.0, False
        # saved settings as read or written last: the fallback while the server is away
        self._settings: dict[tuple[str, str], str | None] = {}
        self.away = not migrated  # not tried on the main thread until it answers again
        self._replaying = False
        self._stopping = threading.Event()
        self._prober: threading.Thread | None = None
        if self.away:
            self._start_prober()
        try:
            for item in json.loads(self._view.read_text(encoding="utf-8")):
                self._active[item["netns"], item["backend"]] = [
                    Ban(**_unjson(b)) for b in item["bans"]]
        except (OSError, ValueError, TypeError, KeyError):
            pass  # none yet (or torn): read again from the database

    def _keep_view(self, *, now: bool = False) -> None:
        """The active bans as last read, on disk: after a restart while the database is gone
        the ban reconcile still knows what this node banned. Written at most every VIEW_EVERY
        seconds while the database answers (a fleet's thousands of bans, at every read, cost
        seconds of the loop), at once while it is away, and at close."""
        self._view_dirty = True
        if not now and time.monotonic() < self._view_due:
            return
        self._view_due = time.monotonic() + VIEW_EVERY
        self._view_dirty = False
        try:
            tmp = self._view.with_suffix(".tmp")
            tmp.write_text(json.dumps([
                {"netns": k[0], "backend": k[1],
                 "bans": [_json({f.name: getattr(b, f.name) for f in fields(b)}) for b in v]}
                for k, v in self._active.items()]), encoding="utf-8")
            tmp.replace(self._view)
        except OSError as exc:
            log.debug("bans view %s: %s", self._view, exc)

    # -- a server that does not answer --------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Every read and write of the store's parts: refused at once while the server is
        away; a lost connection makes it away."""
        if self.away and not self._replaying:
            raise AwayError(self.display_url, "not answering (writes are spooled)")
        try:
            with super().session() as session:
                yield session
        except StoreError as exc:
            if unreachable(exc):
                self._went_away(exc)
            raise

    def _went_away(self, exc: StoreError) -> None:
        """Said once an outage, whichever call found it (a write, a read, the heartbeat)."""
        if not self.away:
            log.error("store: %s; writes go to the spool %s until it answers; detection "
                      "and actions go on", exc, self.spool.path)
        self.away = True
        self._start_prober()

    def _start_prober(self) -> None:
        if self._prober is not None and self._prober.is_alive():
            return
        self._prober = threading.Thread(target=self._probe_server, name="store-away",
                                        daemon=True)
        self._prober.start()

    def _probe_server(self) -> None:
        """Off the main thread: try the server until it answers, then say so (``away``
        false: the service replays the spool)."""
        while not self._stopping.wait(PROBE_EVERY):
            try:
                with self.engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
            except SQLAlchemyError as exc:
                log.debug("store: still not answering: %s", exc)
                continue
            self.away = False
            return

    def close(self) -> None:
        if self._view_dirty:
            self._keep_view(now=True)
        self._stopping.set()
        if self._prober is not None:
            self._prober.join(timeout=1)
        super().close()

    # -- provisional ids ----------------------------------------------------------------------

    def _provisional(self, n: int) -> list[int]:
        made = list(range(self._next, self._next - n, -1))
        self._next -= n
        return made

    def _real(self, i: int | None) -> int | None:
        return self.ids.get(i, i) if i is not None and i < 0 else i

    @property
    def spooling(self) -> bool:
        return bool(self.spool.ops) or not self.migrated or self.away

    def _try(self, op: dict[str, Any], write: Any) -> Any:
        """Write now if nothing is spooled and the server answers, else spool ``op``."""
        if not self.spooling:
            try:
                return write()
            except StoreError as exc:
                if not unreachable(exc):
                    raise
                self._went_away(exc)  # said there, once
        self.spool.add(op)
        return None

    # -- writes -------------------------------------------------------------------------------

    def insert_events(self, events: Sequence[NewEvent], now: datetime,
                      position: tuple[str, dict[str, Any]] | None = None) -> list[int | None]:
        if self.spooling and self.spool.records + len(events) > self.spool.limit:
            raise StoreError(self.display_url, f"the spool is full ({self.spool.limit} "
                             "records, storage.spool_max): events wait in their source")
        made = self._provisional(len(events))
        op = {"op": "events", "events": [asdict(e) for e in events], "now": now,
              "position": list(position) if position else None, "made": made}
        done = self._try(op, lambda: Store.insert_events(self, events, now, position))
        if position is not None:  # the newest, written or spooled (a restart reads it)
            self._positions[position[0]] = position[1]
        return list(done) if done is not None else list(made)

    def save_incident(self, c: IncidentChange) -> int:
        c = replace(c, incident_id=self._real(c.incident_id),
                    event_ids=tuple(i for i in map(self._real, c.event_ids) if i is not None))
        made = [c.incident_id] if c.incident_id is not None else self._provisional(1)
        done = self._try({"op": "incident", "change": asdict(c), "made": made},
                         lambda: Store.save_incident(self, c))
        return int(done) if done is not None else int(made[0])

    def add_action_runs(self, runs: Sequence[ActionRun]) -> None:
        runs = [replace(r, incident_id=self._real(r.incident_id)) for r in runs]
        self._try({"op": "runs", "runs": [asdict(r) for r in runs]},
                  lambda: Store.add_action_runs(self, runs))

    def add_bans(self, bans: Sequence[Ban]) -> list[int]:
        bans = [replace(b, incident_id=self._real(b.incident_id)) for b in bans]
        made = self._provisional(len(bans))
        done = self._try({"op": "bans", "bans": [asdict(b) for b in bans], "made": made},
                         lambda: Store.add_bans(self, bans))
        if done is not None:
            return list(done)
        for key, active in self._active.items():  # the fallback view of active bans
            active += [replace(b, id=i, host=self.host) for b, i in zip(bans, made,
                                                                         strict=True)
                       if b.netns == key[0] and key[1] in (None, b.backend)
                       and b.removed_at is None]
        self._keep_view(now=self.spooling)
        return made

    def mark_removed(self, ban_ids: Sequence[int | None], now: datetime, *,
                     everywhere: bool = False) -> None:
        ids = [self._real(i) for i in ban_ids]
        self._try({"op": "removed", "ids": ids, "now": now, "everywhere": everywhere},
                  lambda: Store.mark_removed(self, ids, now, everywhere=everywhere))
        gone = set(ids)
        for key, active in self._active.items():
            self._active[key] = [b for b in active if b.id not in gone]
        self._keep_view(now=self.spooling)

    def save_setting(self, netns: str, name: str, value: str, now: datetime) -> None:
        self._settings[netns, name] = value
        self._try({"op": "setting", "netns": netns, "name": name, "value": value, "now": now},
                  lambda: Store.save_setting(self, netns, name, value, now))

    def forget_setting(self, netns: str, name: str) -> None:
        self._settings[netns, name] = None
        self._try({"op": "forget", "netns": netns, "name": name},
                  lambda: Store.forget_setting(self, netns, name))

    # -- reads, with what was read last and what is spooled as the fallback --------------------

    def active_bans(self, netns: str, now: datetime, backend: str | None = None) -> list[Ban]:
        key = (netns, backend)
        if not self.spooling:
            try:
                found = Store.active_bans(self, netns, now, backend)
            except StoreError as exc:
                if not unreachable(exc):
                    raise
            else:
                if found != self._active.get(key):
                    self._active[key] = list(found)
                    self._keep_view()
                return found
        if key not in self._active:
            seen = [b for (ns, _), bans in self._active.items() if ns == netns for b in bans]
            if backend is not None or not seen:
                # never a guess: the ban reconcile would remove what it does not see
                raise StoreError(self.display_url, "unreachable, and its bans were never read")
            # every backend's, as read last (a ban's caps and overlaps, not a reconcile)
            return list({b.id: b for b in seen if b.expires_at > now}.values())
        return [b for b in self._active[key] if b.expires_at > now]

    def _fallback(self, exc: StoreError) -> None:
        if not unreachable(exc):
            raise exc

    def incident_bans(self, incident_id: int) -> set[str]:
        spooled = {b["prefix"] for op in self.spool.ops if op["op"] == "bans"
                   for b in op["bans"] if b["incident_id"] == incident_id}
        if incident_id < 0:
            return spooled
        try:
            return Store.incident_bans(self, incident_id) | spooled
        except StoreError as exc:
            self._fallback(exc)
            return spooled

    def times_banned(self, netns: str, prefix: str) -> int:
        spooled = sum(1 for op in self.spool.ops if op["op"] == "bans" for b in op["bans"]
                      if (b["netns"], b["prefix"]) == (netns, prefix))
        try:
            return Store.times_banned(self, netns, prefix) + spooled
        except StoreError as exc:
            self._fallback(exc)
            return spooled

    def saved_setting(self, netns: str, name: str) -> str | None:
        for op in reversed(self.spool.ops):
            if op["op"] in ("setting", "forget") and (op["netns"], op["name"]) == (netns, name):
                return str(op["value"]) if op["op"] == "setting" else None
        try:
            found = Store.saved_setting(self, netns, name)
        except StoreError as exc:
            self._fallback(exc)
            # as read or written last; never read: none (SYN cookies read the sysctl itself)
            return self._settings.get((netns, name))
        self._settings[netns, name] = found
        return found

    def expired_bans(self, netns: str, now: datetime, backend: str) -> list[Ban]:
        try:
            return Store.expired_bans(self, netns, now, backend)
        except StoreError as exc:
            self._fallback(exc)
            return []  # marked removed when the database answers: the kernel timed them out

    def get_position(self, source: str) -> dict[str, Any] | None:
        if source in self._positions:
            return self._positions[source]
        for op in reversed(self.spool.ops):
            if op.get("position") and op["position"][0] == source:
                return dict(op["position"][1])
        try:
            return Store.get_position(self, source)
        except StoreError as exc:
            if not unreachable(exc):
                raise
            # no position: the source reads what it still has, and what is already recorded
            # is skipped when the spool is replayed (events are unique per host and entry)
            log.warning("store: %s; source %s starts without its position", exc, source)
            return None

    def open_incidents(self, host: str, netns: str) -> list[IncidentChange]:
        """Incidents left open, from the database and from the spool (a restart while the
        database was gone), the spool's latest change of each."""
        try:
            found = [] if not self.migrated else Store.open_incidents(self, host, netns)
        except StoreError as exc:
            if not unreachable(exc):
                raise
            found = []
        latest: dict[int, IncidentChange] = {}
        for op in self.spool.ops:
            if op["op"] == "incident":
                c = _change(dict(op["change"]))
                latest[c.incident_id or op["made"][0]] = replace(
                    c, incident_id=c.incident_id or op["made"][0])
        spooled = [replace(c, change="updated", serial=0, sample=None, event_ids=())
                   for c in latest.values()
                   if c.status == "open" and (c.host, c.netns) == (host, netns)]
        known = {c.incident_id for c in spooled}
        return [c for c in found if c.incident_id not in known] + spooled

    # -- catching up ----------------------------------------------------------------------------

    def catch_up(self) -> int:
        """Replay up to CATCH_UP_OPS spooled writes in order; how many are left. Raises
        StoreError while the database is still unreachable."""
        self._replaying = True
        try:
            return self._catch_up()
        except StoreError as exc:
            if unreachable(exc):
                self.away = True  # still away: said when it went
                self._start_prober()
            raise
        finally:
            self._replaying = False

    def _catch_up(self) -> int:
        self.away = False
        if not self.migrated:
            self.migrate()
            self.migrated = True
            log.info("store: %s answers; schema %s", self.display_url, self.schema_revision())
        done = 0
        try:
            for op in self.spool.ops[:CATCH_UP_OPS]:
                self._replay(op)
                done += 1
        finally:
            if done:
                self.spool.done(done)
        if not self.spool.ops:
            log.info("store: the spool is written to %s; recording directly again",
                     self.display_url)
        return len(self.spool.ops)

    def _replay(self, op: dict[str, Any]) -> None:
        kind, made = op["op"], op.get("made", [])
        if kind == "events":
            events = [NewEvent(**e) for e in op["events"]]
            position = tuple(op["position"]) if op["position"] else None
            got = Store.insert_events(self, events, op["now"], position)
            self.ids.update(zip(made, got, strict=True))
        elif kind == "incident":
            c = _change(dict(op["change"]))
            c = replace(c, incident_id=self._real(c.incident_id),
                        event_ids=tuple(i for i in map(self._real, c.event_ids)
                                        if i is not None and i > 0))
            if c.incident_id is not None and c.incident_id < 0:
                c = replace(c, incident_id=None)  # its first change: the database numbers it
            real = Store.save_incident(self, c)
            self.ids[made[0]] = real
        elif kind == "runs":
            Store.add_action_runs(self, [ActionRun(**{**r, "incident_id": self._real(
                r["incident_id"])}) for r in op["runs"]])
        elif kind == "bans":
            ban_ids = Store.add_bans(self, [Ban(**{**b, "incident_id": self._real(
                b["incident_id"])}) for b in op["bans"]])
            self.ids.update(zip(made, ban_ids, strict=True))
        elif kind == "removed":
            Store.mark_removed(self, [self._real(i) for i in op["ids"]], op["now"],
                               everywhere=op["everywhere"])
        elif kind == "setting":
            Store.save_setting(self, op["netns"], op["name"], op["value"], op["now"])
        elif kind == "forget":
            Store.forget_setting(self, op["netns"], op["name"])
