"""Keeping on when the history cannot be written: what the service must record goes to a spool
on disk, in order, and is written to the history when it can be again. The one outage path of
every history (a database server, an SQLite file).

``SpooledStore`` (synwatch/store/spooled.py, on synwatch/store/spooling.py) is the service's
store, whatever the history; this module is the spool itself, its file and its records. A
write refused for an outage
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
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from synwatch.errors import StoreError, StoreOutage
from synwatch.records import BanTarget, IncidentChange, TimelinePoint

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
FALLBACK: Any = object()  # a read the history could not answer: the caller's fallback


class AwayError(StoreOutage):
    """The history failed lately: not tried again until the away thread sees it answer."""


class SpoolFull(StoreError):
    """Kernel lines that neither the history nor the spool can take now: the service keeps
    the batch and its source does not move on (journald and files keep them for later)."""


def unreachable(exc: StoreError) -> bool:
    """Is this an outage (spool and retry) rather than a refused write (an error)?"""
    return isinstance(exc, StoreOutage)


def to_json(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$t": value.isoformat()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$t"}:
            return datetime.fromisoformat(value["$t"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def _point(sample: dict[str, Any]) -> TimelinePoint:
    return TimelinePoint(**{**sample,
                            "top_prefixes": tuple(tuple(p) for p in sample["top_prefixes"])})


def change_of(data: dict[str, Any]) -> IncidentChange:
    sample = data.pop("sample")
    earlier = tuple(_point(x) for x in data.pop("earlier", ()))  # (spools before it: none)
    tuples = {k: tuple(tuple(x) if isinstance(x, list) else x for x in data[k])
              for k in ("top_prefixes", "recommendations", "reasons", "event_ids")}
    point = None if sample is None else _point(sample)
    targets = {k: tuple(BanTarget(**{**x, "parts": tuple(x["parts"])})
                        for x in data.get(k, ())) for k in ("bans", "limits")}
    return IncidentChange(**{**data, **tuples, **targets, "sample": point, "earlier": earlier})


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
        op = from_json(json.loads(raw.decode()))
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
        """An op as its line: an events op kept in memory is one already; any other op, and
        an events op not spooled (a live write set aside), as JSON."""
        if "line" in op:
            return str(op["line"])
        return json.dumps(to_json({k: v for k, v in op.items() if k != "bytes"}))

    def add(self, op: dict[str, Any]) -> None:
        """Append ``op``, durably when the file takes it (fsync: a crash right after loses
        nothing it was told); in memory only while it does not."""
        op["seq"], self._seq = self._seq, self._seq + 1
        self._append_op(self._kept(op, json.dumps(to_json(op))))
        self.unwritten += 1
        self.flush()

    def replace(self, index: int, op: dict[str, Any]) -> None:
        """A newer state of what ``ops[index]`` holds, in its place (an incident's update
        thinned). The file gets it appended; ``compact`` drops the stale line."""
        op["seq"] = self.ops[index]["seq"]
        line = json.dumps(to_json(op))
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
