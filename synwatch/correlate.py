"""Kernel events and probe evidence in, incidents out: one per (host, netns, listener).

An incident opens on a trusted SYN-flood line for a port something listens on in this namespace
(the kernel's log is shared by all namespaces, so a line for a port the last probe did not see is
held for the next probe, which the service takes at once), or on the counters: SYNs finding a
full SYN queue (TCPReqQFullDoCookies + TCPReqQFullDrop) or accept-queue overflows
(ListenOverflows) at ``open_rate`` per second, attributed to the listener whose queue is
full. The kernel logs once per socket and the ratelimit may swallow even that, so the counters
are what sees a second flood. Untrusted lines (text files anyone can write) open nothing; they
are linked to an incident the kernel's own state opened.

Time is the evidence's own (event time, probe time); the clock is only for ``detected_at``
and for lines without a time, so recorded evidence replays to the same incidents.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from synwatch.clock import Clock
from synwatch.config import Thresholds
from synwatch.probes.snapshot import ListenerState, Snapshot
from synwatch.probes.synsample import SynSample
from synwatch.records import Evidence, IncidentChange, StoredEvent, TimelinePoint, Trigger
from synwatch.rules import half_open_floor
from synwatch.verdict import Tally, judge

log = logging.getLogger(__name__)
ListenerKey = tuple[int, str, int] | None  # (family, address, port); None: not attributable
OVERFLOW = ("TcpExt.TCPReqQFullDoCookies", "TcpExt.TCPReqQFullDrop")
RATES = {"syns_overflowed": OVERFLOW, "syns_dropped": ("TcpExt.TCPReqQFullDrop",),
         "cookies_sent": ("TcpExt.SyncookiesSent",), "cookies_recv": ("TcpExt.SyncookiesRecv",),
         "passive_opens": ("Tcp.PassiveOpens",), "listen_overflows": ("TcpExt.ListenOverflows",)}
MAX_PREFIXES = 4096  # per incident and per kind of count
PENDING_UNTRUSTED = 256  # untrusted lines kept for corroboration; older ones just stay events
PENDING_TRUSTED = 1024  # trusted lines waiting for the next probe (one line per socket)
MAX_PHASES = 32
RECENT_PROBES = 120  # probes kept for an incident that opens after its build-up


@dataclass
class _Incident:
    serial: int
    key: ListenerKey
    trigger: Trigger
    opened_at: datetime
    first_evidence_at: datetime | None
    detected_at: datetime
    last_activity: datetime
    tally: Tally  # the current phase's evidence: the verdict is judged on it
    new_events: list[int] = field(default_factory=list)
    # evidence of the last verdict_window only; a confident verdict there that differs from the
    # phase's starts a new phase (a spoofed flood followed by a bannable one gets its bans)
    window: Tally | None = None
    window_start: datetime | None = None
    phases: list[tuple[datetime, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Probe:
    """One probe, as differences from the one before."""

    snap: Snapshot
    deltas: dict[str, int]
    rates: dict[str, float]
    accounted: dict[tuple[int, str], int]  # new SYNs per (port, prefix) in the accounting set
    sampled: SynSample | None  # SYNs sampled from packets over the same interval
    dropped: dict[tuple[int, str, int], int]  # listeners' own drops (sk_drops) over it
    grew: frozenset[tuple[int, str, int]]  # listeners whose SYN-RECV rose over it


def _add_counts(counts: dict[str, int], more: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Per-prefix counts, bounded under a flood from everywhere: past MAX_PREFIXES the
    smaller half is dropped."""
    for prefix, n in more:
        if n:
            counts[prefix] = counts.get(prefix, 0) + n
    if len(counts) > MAX_PREFIXES:
        counts = dict(sorted(counts.items(), key=lambda x: -x[1])[:MAX_PREFIXES // 2])
    return counts


def _add_sampled(t: Tally, sampled: SynSample | None) -> None:
    """Fold one interval of the packet sampler into the tally (this listener's port only)."""
    got = sampled.port(t.port) if sampled is not None and t.port is not None else None
    if sampled is None or got is None or not got.samples:
        return
    t.one_in = sampled.one_in
    t.sampled_n += got.samples
    t.sampled_syns += got.syns
    t.sampled = _add_counts(t.sampled, ((p, n) for p, n, _ in got.prefixes))
    t.sampled_seen = _add_counts(t.sampled_seen, ((p, k) for p, _, k in got.prefixes))
    t.sampled_distinct = max(t.sampled_distinct, got.distinct)


def _full_syn_queue(st: ListenerState) -> bool:
    backlog = st.listener.backlog
    return st.syn_recv >= backlog if backlog > 0 else st.syn_recv > 0


def _full_accept_queue(st: ListenerState) -> bool:
    return st.listener.backlog > 0 and st.listener.accept_queue >= st.listener.backlog


def _sample(at: datetime, st: ListenerState | None, rates: dict[str, float]) -> TimelinePoint:
    return TimelinePoint(at=at, syn_recv=st.syn_recv if st else None,
                  accept_queue=st.listener.accept_queue if st else None,
                  backlog=st.listener.backlog if st else None, rates=dict(rates),
                  top_prefixes=st.top_prefixes if st else ())


def _key(st: ListenerState) -> tuple[int, str, int]:
    return st.listener.family, st.listener.address, st.listener.port


class Correlator:
    def __init__(self, host: str, netns: str, thresholds: Thresholds, quiet_period: float,
                 clock: Clock) -> None:
        self.host, self.netns, self.th, self.clock = host, netns, thresholds, clock
        self.quiet = timedelta(seconds=quiet_period)
        self.open: dict[int, _Incident] = {}
        self._serial = 0
        self._last: Evidence | None = None
        self._last_probe: _Probe | None = None
        self._recent: deque[tuple[datetime, _Probe]] = deque(maxlen=RECENT_PROBES)
        # listeners whose SYN-RECV is high: since when, and PassiveOpens then
        self._high_since: dict[tuple[int, str, int], tuple[datetime, int]] = {}
        self._moving_since: datetime | None = None
        self._untrusted: deque[tuple[datetime, int | None, int]] = deque(
            maxlen=PENDING_UNTRUSTED)  # (time, port, event id)
        self.held: deque[StoredEvent] = deque(maxlen=PENDING_TRUSTED)

    # -- bookkeeping ----------------------------------------------------------------------------

    def resume(self, change: IncidentChange) -> int:
        """Carry on with an incident that was open when synwatch stopped; returns its serial."""
        self._serial += 1
        ev = change.evidence
        key: ListenerKey = ((change.family, change.address, change.port)
                            if change.port is not None and change.family is not None
                            and change.address is not None else None)
        last = datetime.fromisoformat(ev["last_activity"]) if ev.get("last_activity") else \
            change.opened_at
        inc = _Incident(
            self._serial, key, change.trigger, change.opened_at, change.first_evidence_at,
            change.detected_at, last, Tally.from_json(ev.get("tally", {})))
        inc.phases = [(datetime.fromisoformat(p["at"]), str(p["verdict"]))
                      for p in ev.get("phases", [])]
        self.open[self._serial] = inc
        return self._serial

    def _by_key(self, key: ListenerKey) -> _Incident | None:
        return next((i for i in self.open.values() if i.key == key), None)

    def _new(self, key: ListenerKey, trigger: Trigger, *, at: datetime,
             first: datetime | None, listener: ListenerState | None,
             snap: Snapshot | None) -> _Incident:
        self._serial += 1
        tally = Tally()
        if key is not None:
            tally.family, tally.address, tally.port = key
        if listener is not None:
            tally.backlog = listener.listener.backlog
        if snap is not None:
            tally.sysctls = dict(snap.sysctls)
        inc = _Incident(self._serial, key, trigger, at, first, self.clock.now(), at, tally)
        inc.window, inc.window_start = _fresh(tally), at
        self.open[inc.serial] = inc
        return inc

    def _change(self, inc: _Incident, change: Literal["opened", "updated", "closed"],
                closed_at: datetime | None = None, sample: TimelinePoint | None = None
                ) -> IncidentChange:
        j = judge(inc.tally, self.th)
        t = inc.tally
        events, inc.new_events = tuple(inc.new_events), []
        return IncidentChange(
            change=change, serial=inc.serial, incident_id=None, host=self.host,
            netns=self.netns, address=t.address, port=t.port, family=t.family,
            status="closed" if change == "closed" else "open", verdict=j.verdict,
            trigger=inc.trigger, opened_at=inc.opened_at, closed_at=closed_at,
            first_evidence_at=inc.first_evidence_at, detected_at=inc.detected_at,
            peak_syn_recv=t.peak_syn_recv, top_prefixes=j.top_prefixes,
            recommendations=j.recommendations, reasons=j.reasons,
            evidence={"tally": t.to_json(), "last_activity": inc.last_activity.isoformat(),
                      "phases": [{"at": at.isoformat(), "verdict": v} for at, v in inc.phases]},
            sample=sample, event_ids=events)

    # -- events ---------------------------------------------------------------------------------

    def _listener_for(self, family: int | None, address: str | None,
                      port: int | None) -> ListenerState | None:
        """The listener a log line names: same port, then same address, then same family."""
        if self._last is None or port is None:
            return None
        same_port = [st for st in self._last.snapshot.listeners if st.listener.port == port]
        if address is not None:
            same_port = [st for st in same_port if st.listener.address == address] or same_port
        same_port.sort(key=lambda st: st.listener.family != family)
        return same_port[0] if same_port else None

    def on_event(self, stored: StoredEvent) -> list[IncidentChange]:
        e = stored.event
        now = self.clock.now()
        at = e.time or now
        if stored.historical or e.kind != "syn_flood":
            return []
        if not e.trusted:
            inc = next((i for i in self.open.values()
                        if i.tally.port == e.port or i.key is None), None)
            if inc is None:
                self._untrusted.append((at, e.port, stored.id))
                return []
            inc.new_events.append(stored.id)
            return [self._change(inc, "updated")]
        if now - at > self.quiet:
            return []  # printed long ago (read after a restart): the kernel state is gone
        listener = self._listener_for(e.family, e.address, e.port)
        if listener is None and e.port is not None:
            # The kernel's log is shared by every namespace: the port may be another's, or a
            # listener newer than the last probe. The next probe (the service takes it at once)
            # tells which; without probes, release_held() trusts the line (drop_held() where the
            # watched namespace does not exist).
            log.debug("kernel event %d: port %s not in the last probe; held for the next",
                      stored.id, e.port)
            self.held.append(stored)
            return []
        return self._on_trusted_line(stored, listener)

    def _on_trusted_line(self, stored: StoredEvent,
                         listener: ListenerState | None) -> list[IncidentChange]:
        e = stored.event
        at = e.time or self.clock.now()
        key: ListenerKey
        if listener is not None:
            key = _key(listener)
        elif e.port is not None:
            wildcard = "::" if e.family == 6 else "0.0.0.0"  # noqa: S104 - a name, not a bind
            key = (e.family or 4, e.address or wildcard, e.port)
        else:
            key = None
        inc = self._by_key(key)
        if inc is not None:
            inc.new_events.append(stored.id)
            inc.last_activity = max(inc.last_activity, at)
            return [self._change(inc, "updated")]
        inc = self._new(key, "log", at=at, first=at, listener=listener,
                        snap=self._last.snapshot if self._last else None)
        inc.new_events.append(stored.id)
        self._corroborate(inc)
        last = self._last_probe
        if last is not None and (last.deltas["syns_overflowed"] or last.deltas["listen_overflows"]):
            # The line is printed when the overflow begins; a burst shorter than a probe
            # interval is over by the next probe, so the interval it happened in is its evidence.
            assert self._last is not None
            inc.first_evidence_at = min(at, self._moving_since or self._last.at)
            self._add(inc, listener, last, active=True)
        return [self._change(inc, "opened")]

    def _resolve_held(self) -> list[IncidentChange]:
        """Trusted lines held for a probe: a listener on their port here now opens (or joins)
        an incident; none means another namespace's line, which stays an event."""
        changes: list[IncidentChange] = []
        held, self.held = self.held, deque(maxlen=PENDING_TRUSTED)
        for stored in held:
            e = stored.event
            listener = self._listener_for(e.family, e.address, e.port)
            if listener is None:
                log.info("kernel event %d: nothing listens on port %s in %s; another "
                         "namespace's line, no incident", stored.id, e.port,
                         self.netns or "the host's namespace")
                continue
            changes.extend(self._on_trusted_line(stored, listener))
        return changes

    def drop_held(self) -> int:
        """Forget the held lines (they stay recorded events); returns how many there were."""
        count = len(self.held)
        self.held = deque(maxlen=PENDING_TRUSTED)
        return count

    def release_held(self) -> list[IncidentChange]:
        """No probe to check held lines against (probes failing): trust the kernel's word."""
        held, self.held = self.held, deque(maxlen=PENDING_TRUSTED)
        changes: list[IncidentChange] = []
        for stored in held:
            changes.extend(self._on_trusted_line(stored, None))
        return changes

    def _corroborate(self, inc: _Incident) -> None:
        """Link untrusted lines about this listener from the quiet period before it opened."""
        keep: deque[tuple[datetime, int | None, int]] = deque(maxlen=PENDING_UNTRUSTED)
        for at, port, event_id in self._untrusted:
            if (port == inc.tally.port or inc.key is None) and inc.opened_at - at <= self.quiet:
                inc.new_events.append(event_id)
            else:
                keep.append((at, port, event_id))
        self._untrusted = keep

    # -- evidence -------------------------------------------------------------------------------

    def on_evidence(self, ev: Evidence) -> list[IncidentChange]:
        prev, self._last = self._last, ev
        resolved = self._resolve_held()
        snap = ev.snapshot
        deltas = dict.fromkeys(RATES, 0)
        dt = 0.0
        if prev is not None and ev.at > prev.at:
            dt = (ev.at - prev.at).total_seconds()
            for name, counters in RATES.items():
                # a counter going back means the namespace was recreated: no delta this time
                deltas[name] = sum(max(0, snap.counters.get(c, 0)
                                       - prev.snapshot.counters.get(c, 0)) for c in counters)
        rates = {k: round(v / dt, 1) for k, v in deltas.items()} if dt else dict.fromkeys(
            deltas, 0.0)
        accounted: dict[tuple[int, str], int] = {}
        if ev.accounting is not None and prev is not None and prev.accounting is not None:
            for k, n in ev.accounting.items():
                before = prev.accounting.get(k, 0)
                accounted[k] = n - before if n >= before else n  # expired and counted anew
        moving = deltas["syns_overflowed"] > 0 or deltas["listen_overflows"] > 0
        if not moving:
            self._moving_since = None
        elif self._moving_since is None and prev is not None:
            self._moving_since = prev.at  # they moved some time in the last interval

        dropped: dict[tuple[int, str, int], int] = {}
        grew: set[tuple[int, str, int]] = set()
        if prev is not None:
            last_seen = {_key(li): li for li in prev.snapshot.listeners}
            for li in snap.listeners:
                was = last_seen.get(_key(li))
                if was is None or li.syn_recv > was.syn_recv:
                    grew.add(_key(li))
                n = li.listener.drops - (was.listener.drops if was else li.listener.drops)
                if n > 0:
                    dropped[_key(li)] = n
        probe = _Probe(snap, deltas, rates, accounted, ev.sampled, dropped, frozenset(grew))
        self._last_probe = probe
        self._recent.append((ev.at, probe))
        active = self._attribute(probe)
        changes: list[IncidentChange] = []
        opening = (rates["syns_overflowed"] >= self.th.open_rate
                   or rates["listen_overflows"] >= self.th.open_rate)
        states = {_key(st): st for st in snap.listeners}
        if opening:
            targets: list[ListenerKey] = list(active) or ([None] if not self.open else [])
            for key in targets:
                if self._by_key(key) is None:
                    st = states.get(key) if key else None
                    inc = self._new(key, "counters", at=ev.at,
                                    first=self._moving_since or ev.at, listener=st, snap=snap)
                    self._corroborate(inc)
                    self._add(inc, st, probe, active=True)
                    changes.append(self._change(inc, "opened", sample=_sample(ev.at, st, rates)))
        half_open = self._half_open(ev.at, snap)
        for key in sorted(half_open, key=str):
            if self._by_key(key) is None:
                st = states[key]
                since, _ = self._high_since[key]
                inc = self._new(key, "half_open", at=ev.at, first=since, listener=st, snap=snap)
                inc.tally.half_open = True
                self._corroborate(inc)
                for at, earlier in list(self._recent)[:-1]:
                    if at > since:  # the build-up is this incident's evidence
                        self._add(inc, None, earlier, active=True)
                self._add(inc, st, probe, active=True)
                changes.append(self._change(inc, "opened", sample=_sample(ev.at, st, rates)))
        for inc in list(self.open.values()):
            if any(c.serial == inc.serial for c in changes):
                continue
            is_active = (inc.key in active or (inc.key is None and moving)
                         or (inc.tally.half_open and inc.key in self._high_since))
            st = states.get(inc.key) if inc.key else None
            self._add(inc, st, probe, active=is_active)
            self._next_phase(inc, ev.at)
            if is_active:
                inc.last_activity = ev.at
            if ev.at - inc.last_activity >= self.quiet:
                del self.open[inc.serial]
                changes.append(self._change(inc, "closed", closed_at=ev.at))
            else:
                changes.append(self._change(inc, "updated", sample=_sample(ev.at, st, rates)))
        return resolved + changes

    @staticmethod
    def _attribute(probe: _Probe) -> set[ListenerKey]:
        """Which listeners the counters' movement belongs to: those with a full queue."""
        snap, deltas, accounted = probe.snap, probe.deltas, probe.accounted
        active: set[ListenerKey] = set()
        sampled_ports = ({p.port for p in probe.sampled.ports if p.samples}
                         if probe.sampled is not None else set())
        if deltas["syns_overflowed"]:
            full = [_key(st) for st in snap.listeners if _full_syn_queue(st)]
            fresh = [k for k in full if k[2] in sampled_ports or k in probe.dropped
                     or k in probe.grew]
            if fresh:
                # a queue still full of an earlier flood's request sockets (they retransmit for
                # up to a minute) gets no new SYNs: the sample, the listener's own drop count
                # (without cookies) or a queue that just filled says which one this flood fills
                full = fresh
            if not full and sampled_ports:  # syncookies=2 keeps queues empty
                assert probe.sampled is not None
                top_sampled = max(probe.sampled.ports, key=lambda p: p.syns).port
                full = [_key(st) for st in snap.listeners if st.listener.port == top_sampled]
            if not full and any(accounted.values()):
                by_port: dict[int, int] = {}
                for (port, _), n in accounted.items():
                    by_port[port] = by_port.get(port, 0) + n
                top_port = max(by_port, key=lambda p: by_port[p])
                full = [_key(st) for st in snap.listeners if st.listener.port == top_port]
            active.update(full)
        if deltas["listen_overflows"]:
            active.update(_key(st) for st in snap.listeners if _full_accept_queue(st))
            # the listener that dropped says so itself (tcp_listendrop() counts per socket)
            active.update(probe.dropped)
        return active

    @staticmethod
    def _add(inc: _Incident, st: ListenerState | None, probe: _Probe, *, active: bool) -> None:
        """Fold one probe into the incident's phase and its recent window."""
        _fold(inc.tally, st, probe, active=active)
        if inc.window is not None:
            _fold(inc.window, st, probe, active=active)

    def _next_phase(self, inc: _Incident, at: datetime) -> None:
        """At the end of each verdict window: a confident verdict on the window's evidence that
        differs from the phase's starts a new phase, judged on that evidence from then on."""
        if inc.window is None or inc.window_start is None:
            inc.window, inc.window_start = _fresh(inc.tally), at
            return
        if (at - inc.window_start).total_seconds() < self.th.verdict_window:
            return
        recent, current = judge(inc.window, self.th).verdict, judge(inc.tally, self.th).verdict
        if recent not in ("unknown", current) and len(inc.phases) < MAX_PHASES:
            if not inc.phases:
                inc.phases.append((inc.opened_at, current))
            inc.phases.append((inc.window_start, recent))
            log.info("incident on port %s: the flood changed: %s from %s", inc.tally.port,
                     recent, inc.window_start.isoformat())
            inc.window.keep_peaks(inc.tally)  # the incident's peaks, whatever the phase
            inc.tally = inc.window
        inc.window, inc.window_start = _fresh(inc.tally), at

    def _half_open(self, at: datetime, snap: Snapshot) -> set[tuple[int, str, int]]:
        """Listeners whose SYN-RECV has stayed high for ``half_open_for`` while most of those
        requests never completed: a slow flood parks a queue at half its backlog without a log
        line or an overflow (reqsk_timer_handler prunes old requests once half full)."""
        passive = snap.counters.get("Tcp.PassiveOpens", 0)
        found: set[tuple[int, str, int]] = set()
        high: dict[tuple[int, str, int], tuple[datetime, int]] = {}
        for st in snap.listeners:
            if st.syn_recv < half_open_floor(st.listener.backlog, self.th.half_open_min):
                continue
            key = _key(st)
            since, opens_then = self._high_since.get(key, (at, passive))
            high[key] = (since, opens_then)
            if (at - since).total_seconds() < self.th.half_open_for:
                continue
            completed = max(0, passive - opens_then)  # the namespace's: an upper bound
            if completed / (completed + st.syn_recv) < self.th.capacity_completion:
                found.add(key)
        self._high_since = high
        return found

    def expire(self, now: datetime) -> list[IncidentChange]:
        """Close quiet incidents when there is no evidence to do it with (probes failing)."""
        out = []
        for inc in list(self.open.values()):
            if now - inc.last_activity >= self.quiet:
                del self.open[inc.serial]
                out.append(self._change(inc, "closed", closed_at=now))
        return out


def _fresh(t: Tally) -> Tally:
    """An empty tally for the same listener and settings."""
    return Tally(family=t.family, address=t.address, port=t.port, backlog=t.backlog,
                 sysctls=dict(t.sysctls), half_open=t.half_open)


def _fold(t: Tally, st: ListenerState | None, probe: _Probe, *, active: bool) -> None:
    """Fold one probe into a tally (counters only while the incident is active)."""
    snap, deltas, rates = probe.snap, probe.deltas, probe.rates
    accounted = probe.accounted
    t.samples += 1
    t.sysctls = dict(snap.sysctls)
    if active:
        t.accounted = _add_counts(t.accounted, ((prefix, n) for (port, prefix), n
                                                in accounted.items() if port == t.port))
        _add_sampled(t, probe.sampled)
        t.absorb_counters(deltas)
        t.peak_overflow_rate = max(t.peak_overflow_rate, rates["syns_overflowed"])
        t.peak_listen_overflow_rate = max(t.peak_listen_overflow_rate,
                                          rates["listen_overflows"])
    if st is None:
        return
    t.backlog = st.listener.backlog
    t.peak_syn_recv = max(t.peak_syn_recv, st.syn_recv)
    t.peak_accept_queue = max(t.peak_accept_queue, st.listener.accept_queue)
    if active and st.syn_recv:
        t.syn_recv_sum += st.syn_recv
        t.prefixes = _add_counts(t.prefixes, st.prefixes)
        t.prefix_count = max(t.prefix_count, st.prefix_count, len(t.prefixes))
        if st.syn_recv > t.socket_n:
            t.socket_n, t.socket_distinct = st.syn_recv, st.prefix_count
            t.socket_singletons, t.socket_doubletons = st.singletons, st.doubletons
