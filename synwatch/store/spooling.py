"""The history behind its spool (synwatch/store/spool.py), the part that is about the history
being there or not: every call goes through ``_call``, which refuses at once while the history
is away and marks it away on an outage; a thread of its own (``ping``, bounded in time) tries
it until it answers; provisional (negative) ids for what is spooled; and ``catch_up``, which
writes the spool back in order and maps provisional ids to the history's. What is written and
read through it is in synwatch/store/spooled.py."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import fields, replace
from datetime import datetime
from typing import Any

from synwatch.errors import StoreError, StoreOutage
from synwatch.records import ActionRun, Ban, NewEvent
from synwatch.store.api import ServiceStore
from synwatch.store.spool import (
    CATCH_UP_SECONDS,
    PREPARE_EVERY,
    PROBE_EVERY,
    VIEW_EVERY,
    AwayError,
    Spool,
    change_of,
    from_json,
    to_json,
    unreachable,
)

log = logging.getLogger("synwatch")
SET_ASIDE: Any = object()  # what _try answers for a write the history refused (not spooled)


class SpoolingHistory:
    """The history (``ServiceStore``), tried while it answers, spooled around while not."""
    """The history (``ServiceStore``), with writes spooled while it is away."""

    def __init__(self, store: ServiceStore | None, spool: Spool, *, migrated: bool,
                 opener: Callable[[], ServiceStore] | None = None,
                 prepare: Callable[[], None] | None = None, url: str = "", host: str = "",
                 dialect: str = "sqlite") -> None:
        """``store`` opened (``migrated``: and its schema brought up to date; else that is
        the first thing done when it answers), or None when it could not be opened at all:
        then ``prepare`` (any thread) is tried until it succeeds and ``opener`` (the main
        thread) opens it."""
        self.store, self.spool, self.migrated = store, spool, migrated
        self._opener, self._prepare = opener, prepare
        self.url = store.url if store is not None else url
        self.host = store.host if store is not None else host
        self.dialect = store.dialect if store is not None else dialect
        self.display_url = store.display_url if store is not None else url
        self.ids: dict[int, int | None] = {}  # spooled id -> the history's (None: duplicate)
        self._next = spool.provisional_floor() - 1
        # what was read last, the fallback while the history is away: active bans per (netns,
        # backend), positions spooled since, saved settings, an incident's action runs
        self._active: dict[tuple[str, str | None], list[Ban]] = {}
        self._positions: dict[str, dict[str, Any] | None] = {}
        self._settings: dict[tuple[str, str], str | None] = {}
        self._runs: dict[int, list[ActionRun]] = {}
        self._view = spool.path.with_name("bans-seen.json")  # _active, for a restart
        self._view_due, self._view_dirty = 0.0, False
        self._thin: dict[int, tuple[int, datetime]] = {}  # incident -> (its op, first sample)
        self.problem: str | None = None  # why the history is away, for `status`
        self.away = store is None or not migrated  # not tried on the main thread meanwhile
        self._replaying = False
        self._stopping = threading.Event()
        self._prober: threading.Thread | None = None
        self._probing = False  # a prober runs (under _lock: it clears it as it ends)
        self._lock = threading.Lock()
        self._busy_timeout: float | None = None  # for a store opened later
        self._incidents: set[int] = set()  # spooled ids of incidents (their mapping is kept)
        if self.away:
            self._start_prober()
        try:
            for item in json.loads(self._view.read_text(encoding="utf-8")):
                self._active[item["netns"], item["backend"]] = [
                    Ban(**from_json(b)) for b in item["bans"]]
        except (OSError, ValueError, TypeError, KeyError):
            pass  # none yet (or torn): read again from the history

    def _keep_view(self, *, now: bool = False) -> None:
        """The active bans as last read, on disk: after a restart while the history is away
        the ban reconcile still knows what this node banned. Written at most every VIEW_EVERY
        seconds while the history answers (a fleet's thousands of bans, at every read, cost
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
                 "bans": [to_json({f.name: getattr(b, f.name) for f in fields(b)}) for b in v]}
                for k, v in self._active.items()]), encoding="utf-8")
            tmp.replace(self._view)
        except OSError as exc:
            log.debug("bans view %s: %s", self._view, exc)

    # -- a history that is away -----------------------------------------------------------------

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One call into the history: refused at once while it is away; an outage makes it
        away."""
        if (self.away and not self._replaying) or self.store is None:
            raise AwayError(self.display_url, f"away ({self.problem or 'not answering'}): "
                            "writes are spooled")
        try:
            return getattr(self.store, method)(*args, **kwargs)
        except StoreOutage as exc:
            self._went_away(exc)
            raise

    def _went_away(self, exc: StoreError) -> None:
        """Said once an outage, whichever call found it (a write, a read, the heartbeat)."""
        if not self.away:
            log.error("store: %s; writes go to the spool %s until it can be written; "
                      "detection and actions go on", exc, self.spool.path)
        self.problem = exc.why
        self.away = True
        self._start_prober()

    def _start_prober(self) -> None:
        with self._lock:
            if self._probing:
                return
            self._probing = True
        self._prober = threading.Thread(target=self._probe_history, name="store-away",
                                        daemon=True)
        self._prober.start()

    def _probe_history(self) -> None:
        """Off the main thread: test the history until it answers (or, never opened,
        prepare it: a migration in a child process, so tried less and less often), then say
        so (``away`` false: the service replays the spool)."""
        wait = PROBE_EVERY
        while not self._stopping.wait(wait):
            try:
                if self.store is not None:
                    self.store.ping()
                elif self._prepare is not None:
                    self._prepare()
            except StoreError as exc:
                log.debug("store: still away: %s", exc)
                self.problem = exc.why
                if self.store is None:
                    wait = min(wait * 2, PREPARE_EVERY)
                continue
            with self._lock:  # an outage found from here on starts a new prober
                self.away = False
                self._probing = False
            return
        with self._lock:
            self._probing = False

    def check(self) -> None:
        """A look at the history between writes, every second: a deleted SQLite file takes
        writes nobody will read, and a full disk fails only once SQLite needs a page."""
        if not self.away and self.store is not None:
            try:
                self.store.check_file()
            except StoreOutage as exc:
                self._went_away(exc)

    def close(self) -> None:
        if self._view_dirty:
            self._keep_view(now=True)
        self.spool.flush(now=True)
        if self.spool.unwritten or self.spool.problem is not None:
            log.error("spool %s: %d records that could not be written to it are lost at this "
                      "stop (%s)", self.spool.path, self.spool.records, self.spool.problem)
        self._stopping.set()
        if self._prober is not None:
            self._prober.join(timeout=1)
        if self.store is not None:
            self.store.close()

    def set_busy_timeout(self, seconds: float) -> None:
        self._busy_timeout = seconds  # also for a store opened later (_catch_up)
        if self.store is not None:
            self.store.set_busy_timeout(seconds)

    def schema_revision(self) -> str | None:
        return self.store.schema_revision() if self.store is not None else None

    def ping(self) -> None:
        self._call("ping")

    def check_file(self) -> None:
        self._call("check_file")

    def migrate(self) -> None:
        self._call("migrate")

    # -- provisional ids ------------------------------------------------------------------------

    def _provisional(self, n: int) -> list[int]:
        made = list(range(self._next, self._next - n, -1))
        self._next -= n
        return made

    def _real(self, i: int | None) -> int | None:
        """The history's id for a spooled (negative) one; the history's own ids as they are."""
        return self.ids.get(i, i) if i is not None and i < 0 else i

    @property
    def spooling(self) -> bool:
        return bool(self.spool.ops) or not self.migrated or self.away

    def _try(self, op: Callable[[], dict[str, Any]], method: str, *args: Any,
             **kwargs: Any) -> Any:
        """Write now if nothing is spooled and the history answers, else spool ``op()``
        (made only then: the records turned into dicts cost more than the write itself). A
        write the history refuses for what it is (a bug, not an outage) is set aside with one
        ERROR, as in a replay (SET_ASIDE): nothing upstream keeps a list of writes to try
        again. None: spooled."""
        if not self.spooling:
            try:
                return self._call(method, *args, **kwargs)
            except StoreOutage:
                pass  # said in _call, once
            except StoreError as exc:
                self._reject(op(), exc)
                return SET_ASIDE
        self.spool.add(op())
        return None

    # -- catching up ----------------------------------------------------------------------------

    def catch_up(self) -> int:
        """Replay spooled writes in order for up to CATCH_UP_SECONDS; how many are left.
        Raises StoreError while the history is still away."""
        self._replaying = True
        try:
            return self._catch_up()
        except StoreError as exc:
            if unreachable(exc):
                self.away = True  # still away: said when it went
                self.problem = exc.why
                self._start_prober()
            raise
        finally:
            self._replaying = False

    def _catch_up(self) -> int:
        self.away = False
        if self.store is None:
            assert self._opener is not None
            self.store = self._opener()
            self.display_url = self.store.display_url
            if self._busy_timeout is not None:
                self.store.set_busy_timeout(self._busy_timeout)
        if not self.migrated:
            self.store.migrate()
            self.migrated = True
            log.info("store: %s answers; schema %s", self.display_url,
                     self.store.schema_revision())
        done = 0
        until = time.monotonic() + CATCH_UP_SECONDS
        try:
            for op in self.spool.ops:
                try:
                    self._replay(op)
                except StoreOutage:
                    raise
                except (StoreError, KeyError, TypeError, ValueError) as exc:
                    self._reject(op, exc)  # one write the history refuses stops no other
                done += 1
                if time.monotonic() > until:
                    break
        finally:
            if done:
                # what waits keeps the history's ids of what was written: a stop before the
                # rest is written must not leave it pointing at ids nobody can map
                for op in self.spool.ops[done:]:
                    self._remap(op)
                self.spool.done(done)
                self._thin.clear()  # indices moved; a new window starts
        if not self.spool.ops:
            log.info("store: the spool is written to %s; recording directly again",
                     self.display_url)
            self.problem = None
            # kernel lines' and bans' ids are not asked for again; incidents' may be (an
            # open incident goes on with its spooled id)
            self.ids = {k: v for k, v in self.ids.items() if k in self._incidents}
        return len(self.spool.ops)

    def _remap(self, op: dict[str, Any]) -> None:
        kind = op["op"]
        if kind == "incident":
            change = op["change"]
            change["incident_id"] = self._real(change["incident_id"])
            change["event_ids"] = [self._real(i) for i in change["event_ids"]
                                   if self._real(i) is not None]
        elif kind in ("runs", "bans"):
            for item in op[kind]:
                item["incident_id"] = self._real(item["incident_id"])
        elif kind == "removed":
            op["ids"] = [self._real(i) for i in op["ids"]]

    def _reject(self, op: dict[str, Any], exc: Exception) -> None:
        """A write the history refuses for what it is (not an outage): set aside in
        spool.rejected.jsonl with one ERROR, so that it never holds up the rest."""
        aside = self.spool.path.with_name("spool.rejected.jsonl")
        log.error("store: a %s write is refused by %s (%s: %s); set aside in %s", op["op"],
                  self.display_url, type(exc).__name__, exc, aside)
        try:
            with aside.open("a", encoding="utf-8") as f:
                f.write(self.spool.line(op) + "\n")
        except OSError as err:
            log.error("store: %s cannot be written either (%s)", aside, err.strerror)  # noqa: TRY400

    def _replay(self, op: dict[str, Any]) -> None:
        store = self.store
        assert store is not None
        kind, made = op["op"], op.get("made", [])
        if kind == "events":
            full = from_json(json.loads(op["line"]))
            events = [NewEvent(**e) for e in full["events"]]
            position = tuple(full["position"]) if full["position"] else None
            got = store.insert_events(events, full["now"], position)
            self.ids.update(zip(made, got, strict=True))
        elif kind == "incident":
            c = change_of(dict(op["change"]))
            c = replace(c, incident_id=self._real(c.incident_id),
                        event_ids=tuple(i for i in map(self._real, c.event_ids)
                                        if i is not None and i > 0))
            if c.incident_id is not None and c.incident_id < 0:
                c = replace(c, incident_id=None)  # its first change: the history numbers it
            real = store.save_incident(c)
            if made[0] < 0 and made[0] != real:
                self.ids[made[0]] = real
        elif kind == "runs":
            store.add_action_runs([ActionRun(**{**r, "incident_id": self._real(
                r["incident_id"])}) for r in op["runs"]])
        elif kind == "bans":
            ban_ids = store.add_bans([Ban(**{**b, "incident_id": self._real(
                b["incident_id"])}) for b in op["bans"]])
            self.ids.update(zip(made, ban_ids, strict=True))
        elif kind == "removed":
            store.mark_removed([self._real(i) for i in op["ids"]], op["now"],
                               everywhere=op["everywhere"])
        elif kind == "setting":
            store.save_setting(op["netns"], op["name"], op["value"], op["now"])
        elif kind == "forget":
            store.forget_setting(op["netns"], op["name"])


