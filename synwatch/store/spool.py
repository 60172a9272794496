"""Keeping on when the history cannot be written: what the service must record goes to a spool
on disk, in order, and is written to the history when it can be again. The one outage path of
every history (a database server, an SQLite file).

``SpooledStore`` is the service's store, whatever the history. A write refused for an outage
(``StoreOutage``: a server that does not answer; an SQLite file that is locked, on a full or
read-only disk, deleted or corrupt) is appended to ``spool.jsonl`` in the state directory, with
provisional (negative) ids for the incidents, events and bans it creates, so detection and
actions go on with them: the response never waits for the history. ``catch_up`` replays the
spool in order, mapping provisional ids to the history's, and the provisional ids the live
service still holds are mapped on every later write. Reads fall back to what was read last plus
what is spooled (active bans, saved settings, a source's position, an incident's action runs,
the incidents a restart resumes), so a restart during an outage loses nothing either.

While the history is away (a write or read failed for an outage, or the start could not open
it), nothing but a background thread (``ping``: one cheap test every PROBE_EVERY, bounded in
time) touches it: every read answers at once from what was read last, every write is spooled at
once, so an outage costs the main loop at most one bounded wait, not one per call. When the
thread sees the history answer, the service replays the spool (``catch_up``).

The spool is bounded in records (storage.spool_max) and in bytes (SPOOL_BYTES), on disk and in
memory: past either, events are refused (the service keeps its batch and the source does not
move on, so journald and files keep them for later); an incident's updates are thinned to one
per THIN_EVERY seconds (one per THIN_FULL past half the bound, only the latest past the bound);
openings, closings, action outcomes, bans and settings are always kept. When the spool's own
file cannot be written (the same full or read-only disk), what it holds stays in memory, within
the same bounds, and is written when the disk takes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from synwatch.config import sqlite_file
from synwatch.errors import StoreError, StoreOutage
from synwatch.records import ActionRun, Ban, BanTarget, IncidentChange, NewEvent, TimelinePoint
from synwatch.store.api import ServiceStore

log = logging.getLogger("synwatch")
VIEW_EVERY = 5.0  # seconds between writes of the bans view while the database answers
PROBE_EVERY = 2.0  # seconds between the away thread's tries of the history
PREPARE_EVERY = 30.0  # ... at most, backing off, while it cannot even be opened
RETRY_WRITE = 5.0  # seconds before a spool file that refused a write is tried again
CATCH_UP_SECONDS = 0.25  # replay per loop turn, so a long backlog never holds detection
SPOOL_BYTES = 32 << 20  # the spool's bound in bytes of JSON (a unit's MemoryMax is 256M)
THIN_EVERY = 5.0  # seconds: an open incident's spooled updates, one per this at most
THIN_FULL = 60.0  # ... and one per this past half the spool's bound
EVENT_BYTES = 600  # a kernel line's spooled JSON, about: what a batch asks of the byte bound
RUNS_KEPT = 256  # incidents whose action runs are kept in memory (the open ones, and a few)


class AwayError(StoreOutage):
    """The history failed lately: not tried again until the away thread sees it answer."""


class SpoolFull(StoreError):
    """Kernel lines that neither the history nor the spool can take now: the service keeps
    the batch and its source does not move on (journald and files keep them for later)."""


def unreachable(exc: StoreError) -> bool:
    """Is this an outage (spool and retry) rather than a refused write (an error)?"""
    return isinstance(exc, StoreOutage)


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
    return int(op.get("n", 0)) or 1


_FIELDS = {"events": ("now", "made"), "incident": ("change", "made"), "runs": ("runs",),
           "bans": ("bans", "made"), "removed": ("ids", "now", "everywhere"),
           "setting": ("netns", "name", "value", "now"), "forget": ("netns", "name")}


def _valid(raw: bytes) -> dict[str, Any] | None:
    """A spool line as its op, or None: torn, not UTF-8, not JSON, or not an op of ours with
    the fields its replay reads (a hostile file must not crash the start or the loop)."""
    try:
        op = _unjson(json.loads(raw.decode()))
    except (ValueError, RecursionError):
        return None
    if not isinstance(op, dict) or op.get("op") not in _FIELDS:
        return None
    if op["op"] == "events":
        if not isinstance(op.get("events"), list):
            return None
        op["n"] = len(op["events"])
    need = _FIELDS[op["op"]]
    return op if all(k in op for k in need) else None


def _write_all(fd: int, data: bytes) -> None:
    """os.write may take part of the data (a full disk): the rest, or an OSError."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Spool:
    """An append-only file of writes, one JSON object a line, replayed in order. In memory an
    op is its dict, except an events op, which keeps its line (a thousand events are one
    string, not a thousand dicts) and is parsed when replayed."""

    def __init__(self, path: Path, limit: int, max_bytes: int = SPOOL_BYTES) -> None:
        self.path, self.limit, self.max_bytes = path, limit, max_bytes
        self.ops: list[dict[str, Any]] = []
        self.records = self.bytes = 0
        self.unwritten = 0  # ops at the end of ``ops`` not yet in the file (it refused them)
        self.problem: str | None = None  # why the file refuses writes, said once
        self._lines_in_file = 0  # coalesced ops leave stale lines: the file is compacted
        self._must_compact = False  # a replaced op that the file refused: rewrite it whole
        self._seq = 0  # each op's number: a replaced op keeps it, so a restart keeps the last
        self._retry_at = 0.0  # after the file refused a write: not tried again before
        if path.exists():
            try:
                lines = path.read_bytes().splitlines()
            except OSError as exc:
                log.error("spool %s: cannot be read (%s); it is left as it is",  # noqa: TRY400
                          path,
                          exc.strerror)
                lines = []
            at: dict[int, int] = {}  # an op's seq -> its place (a later line replaces it)
            skipped = 0
            for raw in lines:
                op = _valid(raw)
                if op is None:  # torn by a crash mid-write, or not ours
                    skipped += 1
                    continue
                line = raw.decode()
                seq = op.get("seq")
                if seq in at:
                    self._put(at[seq], self._kept(op, line))
                    continue
                if seq is not None:
                    at[seq] = len(self.ops)
                self._append_op(self._kept(op, line))
            self._seq = max(at, default=-1) + 1
            self._lines_in_file = len(lines)
            if skipped:
                # rewritten at the first write: the next append must not be glued to a torn
                # line (and lost with it at the next start)
                log.warning("spool %s: %d lines that are not a write of synwatch's skipped (a "
                            "crash mid-write, or written by someone else)", path, skipped)
                self._must_compact = True

    @staticmethod
    def _kept(op: dict[str, Any], line: str) -> dict[str, Any]:
        """An op as memory keeps it: an events op as its line, parsed again when replayed."""
        if op["op"] == "events":
            op = {"op": "events", "n": len(op["events"]), "line": line, "seq": op.get("seq"),
                  "position": op.get("position"), "made": op.get("made", [])}
        op["bytes"] = len(line) + 1
        return op

    def _append_op(self, op: dict[str, Any]) -> None:
        self.ops.append(op)
        self.records += _weight(op)
        self.bytes += op["bytes"]

    def _put(self, index: int, op: dict[str, Any]) -> None:
        old, self.ops[index] = self.ops[index], op
        self.records += _weight(op) - _weight(old)
        self.bytes += op["bytes"] - old["bytes"]

    def fits(self, records: int, size: int = 0) -> bool:
        return self.records + records <= self.limit and self.bytes + size <= self.max_bytes

    def line(self, op: dict[str, Any]) -> str:
        return op["line"] if op["op"] == "events" else json.dumps(
            _json({k: v for k, v in op.items() if k != "bytes"}))

    def add(self, op: dict[str, Any]) -> None:
        """Append ``op``, durably when the file takes it (fsync: a crash right after loses
        nothing it was told); in memory only while it does not."""
        op["seq"], self._seq = self._seq, self._seq + 1
        self._append_op(self._kept(op, json.dumps(_json(op))))
        self.unwritten += 1
        self.flush()

    def replace(self, index: int, op: dict[str, Any]) -> None:
        """A newer state of what ``ops[index]`` holds, in its place (an incident's update
        thinned). The file gets it appended; ``compact`` drops the stale line."""
        op["seq"] = self.ops[index]["seq"]
        line = json.dumps(_json(op))
        self._put(index, self._kept(op, line))
        if self.unwritten and index >= len(self.ops) - self.unwritten:
            return  # not in the file yet: written as it is now
        if self._stale() or not self._append([line]):
            self._must_compact = True  # the file holds an older state of this op
            self.compact()

    def _stale(self) -> bool:
        """Does the file hold more stale lines (of replaced ops) than live ones?"""
        return self._lines_in_file > 2 * len(self.ops) + 64

    def flush(self, *, now: bool = False) -> None:
        """Write what the file refused before (and the newest), in order; after a refusal,
        not again for RETRY_WRITE seconds (a full disk must not cost a rewrite per write)."""
        if not self.unwritten and not self._must_compact:
            return
        if not now and time.monotonic() < self._retry_at:
            return
        if self._stale() or self._must_compact:
            self.compact()
            return
        if self._append([self.line(op) for op in self.ops[len(self.ops) - self.unwritten:]]):
            self.unwritten = 0

    def _append(self, lines: list[str]) -> bool:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
            try:
                size = os.fstat(fd).st_size
                try:
                    _write_all(fd, "".join(line + "\n" for line in lines).encode())
                    os.fsync(fd)
                except OSError:
                    # a full disk takes part of a line: cut it, or the next append would make
                    # one unreadable line of the two
                    os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
        except OSError as exc:
            self._refused(exc)
            return False
        self._lines_in_file += len(lines)
        self._written()
        return True

    def _refused(self, exc: OSError) -> None:
        self._retry_at = time.monotonic() + RETRY_WRITE
        if self.problem is None:  # once an outage of the spool's disk, not once a write
            log.error("spool %s: cannot be written (%s); what synwatch must record is kept "
                      "in memory (up to %d records, %d MiB) and written when it can be",
                      self.path, exc.strerror, self.limit, self.max_bytes >> 20)
        self.problem = exc.strerror or str(exc)

    def _written(self) -> None:
        if self.problem is not None:
            log.info("spool %s: written again", self.path)
            self.problem = None

    def compact(self) -> None:
        """The file rewritten from memory (atomically): coalesced ops' stale lines dropped,
        and what the file refused written."""
        if not self.ops:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as exc:
                self._must_compact = True
                self._refused(exc)
                return
            self.unwritten, self._must_compact, self._lines_in_file = 0, False, 0
            return
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, "".join(self.line(op) + "\n" for op in self.ops).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._must_compact = True  # the file may hold ops already written elsewhere
            self._refused(exc)
            return
        self._lines_in_file, self.unwritten, self._must_compact = len(self.ops), 0, False
        self._written()

    def done(self, count: int) -> None:
        """The first ``count`` ops are in the history: keep the rest."""
        self.ops = self.ops[count:]
        self.records = sum(map(_weight, self.ops))
        self.bytes = sum(op["bytes"] for op in self.ops)
        self.unwritten = min(self.unwritten, len(self.ops))
        self._must_compact = True  # the file still holds what was replayed
        self.flush(now=True)

    def provisional_floor(self) -> int:
        """Below every provisional id the spool already uses (a restart goes on from here)."""
        ids = [int(i) for op in self.ops for i in op.get("made", ())]
        return min([0, *ids])


class SpooledStore:
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
                    Ban(**_unjson(b)) for b in item["bans"]]
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
                 "bans": [_json({f.name: getattr(b, f.name) for f in fields(b)}) for b in v]}
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
        ERROR, as in a replay: nothing upstream keeps a list of writes to try again."""
        if not self.spooling:
            try:
                return self._call(method, *args, **kwargs)
            except StoreOutage:
                pass  # said in _call, once
            except StoreError as exc:
                self._reject(op(), exc)
                return None
        self.spool.add(op())
        return None

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
        return list(done) if done is not None else list(made)

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
        done = self._try(op, "save_incident", c)
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
        given = list(done) if done is not None else made
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
        """A read, or _FALLBACK while the history is away."""
        if self.migrated and not self.away:
            try:
                return self._call(method, *args, **kwargs)
            except StoreOutage:
                pass
        return _FALLBACK

    def active_bans(self, netns: str, now: datetime, backend: str | None = None) -> list[Ban]:
        key = (netns, backend)
        if not self.spooling:
            found = self._read("active_bans", netns, now, backend)
            if found is not _FALLBACK:
                if found != self._active.get(key):
                    self._active[key] = list(found)
                    self._keep_view()
                return list(found)
        if key not in self._active:
            if backend is not None:
                # never a guess: the ban reconcile would remove what it does not see
                raise AwayError(self.display_url, "away, and its bans were never read")
            # every backend's as read last, and what was banned since (a ban's caps and
            # overlaps, not a reconcile: with nothing read, the caps count from here)
            seen = [b for (ns, _), bans in self._active.items() if ns == netns for b in bans]
            gone = {i for op in self.spool.ops if op["op"] == "removed" for i in op["ids"]}
            seen += [replace(Ban(**b), id=i, host=self.host) for op in self.spool.ops
                     if op["op"] == "bans" for b, i in zip(op["bans"], op["made"], strict=True)
                     if b["netns"] == netns and b["removed_at"] is None and i not in gone]
            return list({b.id: b for b in seen if b.expires_at > now}.values())
        return [b for b in self._active[key] if b.expires_at > now]

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
            if found is _FALLBACK:
                return spooled
            self._runs[wanted] = [*found, *spooled]
            while len(self._runs) > RUNS_KEPT:
                self._runs.pop(next(iter(self._runs)))
        return list(self._runs[wanted])

    def latest_runs(self, action: str, host: str, netns: str,
                    since: datetime) -> list[ActionRun]:
        found = self._read("latest_runs", action, host, netns, since)
        spooled = self._spooled_runs(lambda r: bool(r["action"] == action and r["at"] >= since))
        return [*([] if found is _FALLBACK else found), *spooled]

    def incident_bans(self, incident_id: int) -> set[str]:
        spooled = {b["prefix"] for op in self.spool.ops if op["op"] == "bans"
                   for b in op["bans"] if b["incident_id"] == incident_id}
        if incident_id < 0:
            return spooled
        found = self._read("incident_bans", incident_id)
        return spooled if found is _FALLBACK else set(found) | spooled

    def times_banned(self, netns: str, prefix: str) -> int:
        spooled = sum(1 for op in self.spool.ops if op["op"] == "bans" for b in op["bans"]
                      if (b["netns"], b["prefix"]) == (netns, prefix))
        found = self._read("times_banned", netns, prefix)
        return spooled + (0 if found is _FALLBACK else int(found))

    def saved_setting(self, netns: str, name: str) -> str | None:
        for op in reversed(self.spool.ops):
            if op["op"] in ("setting", "forget") and (op["netns"], op["name"]) == (netns, name):
                return str(op["value"]) if op["op"] == "setting" else None
        found = self._read("saved_setting", netns, name)
        if found is _FALLBACK:
            # as read or written last; never read: none (SYN cookies read the sysctl itself)
            return self._settings.get((netns, name))
        self._settings[netns, name] = found
        return None if found is None else str(found)

    def saved_settings(self) -> list[tuple[str, str, str]]:
        found = self._read("saved_settings")
        if found is not _FALLBACK:
            for netns, name, value in found:
                self._settings[netns, name] = value
        return [(ns, name, value) for (ns, name), value in self._settings.items()
                if value is not None]

    def expired_bans(self, netns: str, now: datetime, backend: str) -> list[Ban]:
        found = self._read("expired_bans", netns, now, backend)
        # away: marked removed when the history answers (the kernel timed them out)
        return [] if found is _FALLBACK else list(found)

    def fleet_bans_to_copy(self, now: datetime, after: int = 0,
                           limit: int | None = None) -> list[Ban]:
        return list(self._call("fleet_bans_to_copy", now, after=after, limit=limit))

    def get_position(self, source: str) -> dict[str, Any] | None:
        if source in self._positions:
            return self._positions[source]
        for op in reversed(self.spool.ops):
            if op.get("position") and op["position"][0] == source:
                return dict(op["position"][1])
        found = self._read("get_position", source)
        if found is _FALLBACK:
            # no position: the source reads what it still has, and what is already recorded
            # is skipped when the spool is replayed (events are unique per host and entry)
            log.warning("store: away; source %s starts without its position", source)
            return None
        return None if found is None else dict(found)

    def open_incidents(self, host: str, netns: str) -> list[IncidentChange]:
        """Incidents left open, from the history and from the spool (a restart during an
        outage), the spool's latest change of each."""
        found = self._read("open_incidents", host, netns)
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
        return [c for c in ([] if found is _FALLBACK else found)
                if c.incident_id not in known] + spooled

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
            full = _unjson(json.loads(op["line"]))
            events = [NewEvent(**e) for e in full["events"]]
            position = tuple(full["position"]) if full["position"] else None
            got = store.insert_events(events, full["now"], position)
            self.ids.update(zip(made, got, strict=True))
        elif kind == "incident":
            c = _change(dict(op["change"]))
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


_FALLBACK: Any = object()  # a read the history could not answer: the caller's fallback


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
