"""Recordings of what the correlator saw, and replays of them.

`synwatch run --record FILE` writes every probe and every new kernel event as a JSON line, with
the time the service handled it. `synwatch replay FILE` feeds them to a correlator on a clock
that follows the recording, so the same evidence gives the same incidents: golden tests of the
verdict rules, and "what would these thresholds have said" for an admin.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import math
import queue
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from synwatch.clock import FrozenClock
from synwatch.config import Thresholds
from synwatch.config.validators import LONGEST_SECONDS
from synwatch.detect.correlate import Correlator
from synwatch.detect.delta import MAX_PREFIXES
from synwatch.errors import UsageError
from synwatch.probes.conntrack import Conntrack
from synwatch.probes.evidence import Evidence
from synwatch.probes.sampled import PortSample, SynSample
from synwatch.probes.snapshot import ListenerState, Snapshot
from synwatch.probes.sockdiag import Listener
from synwatch.records import IncidentChange, KernelEvent, LogRecord, StoredEvent

log = logging.getLogger(__name__)
RECORDED_ACCOUNTING = MAX_PREFIXES  # accounting-set elements a recording line keeps
QUEUED_LINES = 256  # recording lines waiting for the disk, at most


def _snapshot_json(s: Snapshot) -> dict[str, Any]:
    return {"netns": s.netns, "counters": s.counters, "sysctls": s.sysctls, "listeners": [
        {"family": st.listener.family, "address": st.listener.address, "port": st.listener.port,
         "backlog": st.listener.backlog, "accept_queue": st.listener.accept_queue,
         "drops": st.listener.drops,
         "syn_recv": st.syn_recv, "prefixes": [list(p) for p in st.prefixes],
         "prefix_count": st.prefix_count, "singletons": st.singletons,
         "doubletons": st.doubletons, "peers": [list(p) for p in st.peers]}
        for st in s.listeners],
        "conntrack": None if s.conntrack is None else dataclasses.asdict(s.conntrack)}


def _snapshot(d: dict[str, Any]) -> Snapshot:
    return Snapshot(d["netns"], tuple(
        ListenerState(Listener(li["family"], li["address"], li["port"], li["backlog"],
                               li["accept_queue"], li.get("drops", 0)), li["syn_recv"],
                      tuple((p, n) for p, n in li["prefixes"]), li["prefix_count"],
                      li.get("singletons", 0), li.get("doubletons", 0),
                      tuple((str(p), int(n)) for p, n in li.get("peers", ())))
        for li in d["listeners"]), d["counters"], d["sysctls"],
        Conntrack(**d["conntrack"]) if d.get("conntrack") else None)


def _sample_json(s: SynSample | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {"one_in": s.one_in, "seconds": s.seconds, "lost": s.lost, "ports": [
        {"port": p.port, "samples": p.samples, "syns": p.syns, "distinct": p.distinct,
         "singletons": p.singletons, "doubletons": p.doubletons,
         "prefixes": [list(x) for x in p.prefixes],
         "addresses": [list(x) for x in p.addresses],
         "completed": [list(x) for x in p.completed]} for p in s.ports]}


def _sample(d: dict[str, Any] | None) -> SynSample | None:
    if d is None:
        return None
    return SynSample(d["one_in"], d["seconds"], tuple(
        PortSample(p["port"], p["samples"], p["syns"],
                   tuple((str(x), int(n), int(k)) for x, n, k in p["prefixes"]),
                   p["distinct"], p["singletons"], p["doubletons"],
                   tuple((str(a), int(n)) for a, n in p.get("addresses", ())),
                   tuple((str(a), int(n)) for a, n in p.get("completed", ())))
        for p in d["ports"]),
        d.get("lost", 0))


def evidence_line(now: datetime, ev: Evidence) -> dict[str, Any]:
    """One probe as a recording line, bounded: the sample as handed on (its KEPT entries), and
    of the accounting set the RECORDED_ACCOUNTING largest counts (a flood from everywhere fills
    the set with 65,536 prefixes; every probe's line held them all, megabytes a second). What
    the correlator keeps of them is bounded the same way (delta.MAX_PREFIXES)."""
    acct = None
    if ev.accounting is not None:
        items: Iterable[tuple[tuple[int, str], int]] = ev.accounting.items()
        if len(ev.accounting) > RECORDED_ACCOUNTING:
            items = heapq.nlargest(RECORDED_ACCOUNTING, items, key=lambda x: x[1])
        acct = [[p, pre, n] for (p, pre), n in items]
    return {"type": "evidence", "now": now.isoformat(), "at": ev.at.isoformat(),
            "snapshot": _snapshot_json(ev.snapshot), "accounting": acct,
            "sampled": _sample_json(ev.sampled)}


def event_line(now: datetime, stored: StoredEvent) -> dict[str, Any]:
    e = stored.event
    return {"type": "event", "now": now.isoformat(), "id": stored.id,
            "historical": stored.historical, "kind": e.kind, "family": e.family,
            "address": e.address, "port": e.port, "mode": e.mode, "source_ip": e.source_ip,
            "source_port": e.source_port, "filter": e.filter, "pattern": e.pattern,
            "time": e.time.isoformat() if e.time else None, "trusted": e.trusted,
            "source": e.record.source, "message": e.record.message}


def _evidence(d: dict[str, Any]) -> Evidence:
    acct = None if d.get("accounting") is None else {
        (int(p), str(pre)): int(n) for p, pre, n in d["accounting"]}
    return Evidence(datetime.fromisoformat(d["at"]), _snapshot(d["snapshot"]), acct,
                    _sample(d.get("sampled")))


def _event(d: dict[str, Any]) -> StoredEvent:
    record = LogRecord(line=d["message"], sink="replay", message=d["message"],
                       time=datetime.fromisoformat(d["time"]) if d["time"] else None,
                       host=None, trusted=d["trusted"], source=d["source"])
    event = KernelEvent(d["kind"], d["family"], d["address"], d["port"], d["mode"],
                        d["source_ip"], d["source_port"], d["filter"], d["pattern"], record)
    return StoredEvent(d["id"], event, d["historical"])


def settings_line(thresholds: Thresholds, quiet_period: float) -> dict[str, Any]:
    """The settings a recording was made with: its first line, so a replay reproduces the
    incidents without being told them."""
    return {"type": "settings", "quiet_period": quiet_period,
            "thresholds": dataclasses.asdict(thresholds)}


class Recording:
    """Appends what the correlator sees to a JSON-lines file, after the settings it runs
    with (each start writes them again: a reload or a restart may change them).

    Lines are encoded and written on a thread of its own behind a queue of QUEUED_LINES, so a
    slow disk never holds up a probe; past that many the newest are dropped and counted (one
    WARNING), never kept in memory."""

    def __init__(self, path: str, thresholds: Thresholds | None = None,
                 quiet_period: float | None = None) -> None:
        try:
            self._out: TextIO = Path(path).open("a", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise UsageError(f"--record {path}", exc.strerror or str(exc)) from exc
        self.path = path
        self.dropped = 0
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUED_LINES)
        self._writer = threading.Thread(target=self._write_lines, name="recording",
                                        daemon=True)
        self._writer.start()
        if thresholds is not None and quiet_period is not None:
            self.write(settings_line(thresholds, quiet_period))

    def write(self, line: dict[str, Any]) -> None:
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            if not self.dropped:
                log.warning("--record %s: the disk does not keep up; lines are dropped",
                            self.path)
            self.dropped += 1

    def _write_lines(self) -> None:
        while (line := self._lines.get()) is not None:
            try:
                self._out.write(json.dumps(line, separators=(",", ":")) + "\n")
                self._out.flush()
            except (OSError, ValueError) as exc:
                log.warning("--record %s: %s", self.path, exc)

    def close(self) -> None:
        """Write what is queued, then close."""
        self._lines.put(None)
        self._writer.join()
        if self.dropped:
            log.warning("--record %s: %d lines dropped", self.path, self.dropped)
        self._out.close()


@dataclasses.dataclass(frozen=True)
class ProbeFailed:
    """A probe that could not read the namespace (``gone``: it does not exist): the service
    then let held lines go (or dropped them) and closed what was quiet, and so does a replay."""

    gone: bool


def probe_failed_line(now: datetime, gone: bool) -> dict[str, Any]:
    return {"type": "probe_failed", "now": now.isoformat(), "gone": gone}


def read(path: str) -> Iterator[tuple[datetime, Evidence | StoredEvent | ProbeFailed]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(path, exc.strerror or str(exc)) from exc
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if d["type"] == "settings":
                continue
            item: Evidence | StoredEvent | ProbeFailed = (
                _evidence(d) if d["type"] == "evidence"
                else ProbeFailed(bool(d["gone"])) if d["type"] == "probe_failed"
                else _event(d))
            yield datetime.fromisoformat(d["now"]), item
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{path}:{n}", f"not a synwatch recording line: {exc}") from exc


def _settings(first: Any) -> tuple[Thresholds, float] | None:
    if not isinstance(first, dict) or first.get("type") != "settings":
        return None  # an older recording (read() judges its lines)
    known = {f.name for f in dataclasses.fields(Thresholds)}
    values = {k: v for k, v in dict(first["thresholds"]).items() if k in known}
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               for v in values.values()):
        raise ValueError("a threshold is not a number")
    quiet = float(first["quiet_period"])
    if not 0 < quiet <= LONGEST_SECONDS:  # nan and inf too; as incident.quiet_period takes it
        raise ValueError(f"quiet_period {quiet} is not a duration")
    return Thresholds(**values), quiet


def recorded_settings(path: str) -> tuple[Thresholds, float] | None:
    """The settings on a recording's first line, if it has them."""
    try:
        with Path(path).open(encoding="utf-8") as f:
            return _settings(json.loads(f.readline() or "{}"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}:1", f"not a synwatch recording's settings: {exc}") from exc


def replay(path: str, thresholds: Thresholds, quiet_period: float,
           host: str = "replay") -> list[IncidentChange]:
    """Every incident the recording leads to, in its last state (open ones stay open)."""
    clock: FrozenClock | None = None
    correlator: Correlator | None = None
    last: dict[int, IncidentChange] = {}
    for now, item in read(path):
        if clock is None:
            clock = FrozenClock(now)
            netns = item.snapshot.netns if isinstance(item, Evidence) else ""
            correlator = Correlator(host, netns, thresholds, quiet_period, clock)
        clock.advance((now - clock.now()).total_seconds())
        assert correlator is not None
        if isinstance(item, ProbeFailed):
            changes, _ = correlator.on_probe_failed(now, gone=item.gone)
        elif isinstance(item, Evidence):
            changes = correlator.on_evidence(item)
        else:
            changes = correlator.on_event(item)
        for c in changes:
            last[c.serial] = c
    return [last[k] for k in sorted(last)]
