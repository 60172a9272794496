"""Kernel events and probe evidence in, incidents out: one per (host, netns, listener).

An incident opens on a trusted SYN-flood line for a listener of this namespace whose own kernel
state shows the overflow in the interval the line fell in (the kernel's log is shared by all
namespaces, and any user can make it print a genuine line for any port in a namespace of their
own: such a line is held for the next probes, which the service takes at once, and stays an
event when they show no overflow here), or on the counters: SYNs finding a
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
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from synwatch.clock import Clock
from synwatch.config import Thresholds
from synwatch.delta import RATES, ListenerId, ProbeDelta, listener_id, measure
from synwatch.probes.snapshot import ListenerState, Snapshot
from synwatch.records import (
    Evidence,
    IncidentChange,
    KernelEvent,
    StoredEvent,
    TimelinePoint,
    Trigger,
)
from synwatch.rules import half_open_floor
from synwatch.verdict import Tally, judge

log = logging.getLogger(__name__)
ListenerKey = tuple[int, str, int] | None  # (family, address, port); None: not attributable
PENDING_UNTRUSTED = 256  # untrusted lines kept for corroboration; older ones just stay events
PENDING_TRUSTED = 1024  # trusted lines waiting for the next probe (one line per socket)
# probes a held line waits for this namespace's state to show its overflow: the one the service
# takes at once (its interval holds the line), and one more for a line timed just after it
CORROBORATING_PROBES = 2
MAX_PHASES = 32
RECENT_PROBES = 120  # probes kept for an incident that opens after its build-up
FRESH_FOR = timedelta(seconds=3)  # a queue filled, sampled or dropping this recently is a flood's


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
    # resumed after a restart: the first probe's counter movement since the last probe before
    # the stop (saved with the incident) is its own, unless another listener's queue claims it
    resumed: bool = False


def _sampled_ports(probe: ProbeDelta) -> set[int]:
    """The ports the packet sample kept SYNs for in the probe's interval."""
    return ({p.port for p in probe.sampled.ports if p.samples}
            if probe.sampled is not None else set())


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


class Correlator:
    def __init__(self, host: str, netns: str, thresholds: Thresholds, quiet_period: float,
                 clock: Clock) -> None:
        self.host, self.netns, self.th, self.clock = host, netns, thresholds, clock
        self.quiet = timedelta(seconds=quiet_period)
        self.open: dict[int, _Incident] = {}
        self._serial = 0
        self._last: Evidence | None = None
        self._resumed_from: Evidence | None = None  # the last probe before a restart
        self._last_probe: ProbeDelta | None = None
        self._recent: deque[tuple[datetime, ProbeDelta]] = deque(maxlen=RECENT_PROBES)
        # listeners whose SYN-RECV is high: since when, and PassiveOpens then
        self._high_since: dict[tuple[int, str, int], tuple[datetime, int]] = {}
        self._moving_since: datetime | None = None
        self._untrusted: deque[tuple[datetime, int | None, int]] = deque(
            maxlen=PENDING_UNTRUSTED)  # (time, port, event id)
        # trusted lines waiting for a probe of this namespace, with the probes they have seen
        self.held: deque[tuple[StoredEvent, int]] = deque(maxlen=PENDING_TRUSTED)

    # -- bookkeeping ----------------------------------------------------------------------------

    def reconfigure(self, thresholds: Thresholds, quiet_period: float) -> None:
        """New settings (a reload): incidents open now are judged and closed by them."""
        self.th, self.quiet = thresholds, timedelta(seconds=quiet_period)

    def resume(self, change: IncidentChange) -> int:
        """Carry on with an incident that was open when synwatch stopped; returns its serial."""
        self._serial += 1
        ev = change.state
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
        inc.resumed = True
        self.open[self._serial] = inc
        saved = ev.get("probe")
        if isinstance(saved, dict) and saved.get("at") and isinstance(saved.get("counters"), dict):
            at = datetime.fromisoformat(saved["at"])
            if self._resumed_from is None or at > self._resumed_from.at:
                # the counters of the last probe before the stop: the first probe after the
                # restart measures what happened meanwhile against them
                self._resumed_from = Evidence(at, Snapshot(
                    self.netns, (), {str(k): int(v) for k, v in saved["counters"].items()},
                    dict(inc.tally.sysctls)))
        return self._serial

    def _saved_probe(self) -> dict[str, Any] | None:
        """The last probe's counters, saved with an incident so that after a restart the first
        probe measures the time synwatch was not running against them."""
        if self._last is None:
            return None
        counters = self._last.snapshot.counters
        wanted = {c for names in RATES.values() for c in names}
        return {"at": self._last.at.isoformat(),
                "counters": {c: counters[c] for c in sorted(wanted) if c in counters}}

    def ports_to_watch(self) -> frozenset[int]:
        """Listener ports whose completed connections the next probe reads (inet_diag), to
        tell sources that complete handshakes from a flood's: those of open incidents, and
        those whose SYN queue was full at the last probe (an incident may open on it)."""
        ports = {i.tally.port for i in self.open.values() if i.tally.port is not None}
        if self._last is not None:
            ports.update(st.listener.port for st in self._last.snapshot.listeners
                         if st.syn_recv and _full_syn_queue(st))
        return frozenset(ports)

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
        inc.window, inc.window_start = tally.fresh(), at
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
            state={"tally": t.to_json(), "last_activity": inc.last_activity.isoformat(),
                   "phases": [{"at": at.isoformat(), "verdict": v} for at, v in inc.phases],
                   "probe": self._saved_probe()},
            sample=sample, event_ids=events,
            bans=j.targets.ban if j.targets else (), limits=j.targets.limit if j.targets else ())

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
        last = self._last_probe
        if self._by_key(self._line_key(e, listener)) is not None or (
                last is not None and (listener is not None or e.port is None)
                and self._overflow_here(last, listener)):
            # its listener's incident is open, or the interval the line fell in (a line read
            # after the probe that followed it) shows the overflow here
            return self._on_trusted_line(stored, listener)
        # The kernel's log is shared by every namespace, and a user can make it print a genuine
        # line for any port in a namespace of their own: the next probes (the service takes one
        # at once) tell whether this namespace overflowed; none where the watched namespace does
        # not exist (drop_held()) or no probe works (release_held()).
        log.debug("kernel event %d: port %s: held for the next probe of %s", stored.id, e.port,
                  self.netns or "the host's namespace")
        self.held.append((stored, 0))
        return []

    @staticmethod
    def _line_key(e: KernelEvent, listener: ListenerState | None) -> ListenerKey:
        """The listener a line is about: the one found here, else what the line names."""
        if listener is not None:
            return listener_id(listener)
        if e.port is not None:
            wildcard = "::" if e.family == 6 else "0.0.0.0"  # noqa: S104 - a name, not a bind
            return (e.family or 4, e.address or wildcard, e.port)
        return None

    def _overflow_here(self, probe: ProbeDelta, listener: ListenerState | None) -> bool:
        """Does this namespace's own state show the overflow a kernel line reports, over the
        interval ``probe`` measured? The listener's SYN queue is full or it dropped SYNs
        (sk_drops); or SYNs overflowed here (TCPReqQFullDoCookies/TCPReqQFullDrop,
        ListenOverflows) and nothing puts them on another listener (a full queue, the sample,
        the accounting set). A line without a port has only the counters."""
        if listener is None:
            return probe.moving
        key = listener_id(listener)
        if _full_syn_queue(listener) or key in probe.dropped:
            return True
        if not probe.moving:
            return False
        active = self._attribute(probe)
        ports = {p.port for p in probe.sampled.ports if p.samples} if probe.sampled else set()
        ports |= {port for (port, _), n in probe.accounted.items() if n > 0}
        return not active or key in active or key[2] in ports

    def _on_trusted_line(self, stored: StoredEvent, listener: ListenerState | None,
                         corroborated_by: ProbeDelta | None = None) -> list[IncidentChange]:
        """A line this namespace's state bears out opens (or joins) its listener's incident.
        ``corroborated_by``: the probe after the line that showed its overflow here; its
        interval holds the line, so it is the incident's first evidence."""
        e = stored.event
        at = e.time or self.clock.now()
        key = self._line_key(e, listener)
        inc = self._by_key(key)
        if inc is not None:
            inc.new_events.append(stored.id)
            inc.last_activity = max(inc.last_activity, at)
            return [self._change(inc, "updated")]
        inc = self._new(key, "log", at=at, first=at, listener=listener,
                        snap=self._last.snapshot if self._last else None)
        inc.new_events.append(stored.id)
        self._corroborate(inc)
        last = corroborated_by or self._last_probe
        if last is not None and (corroborated_by is not None or last.moving):
            # The line is printed when the overflow begins; a burst shorter than a probe
            # interval is over by the next probe, so the interval it happened in is its evidence.
            assert self._last is not None
            if last.moving:
                inc.first_evidence_at = min(at, self._moving_since or self._last.at)
            self._add(inc, listener, last, active=True)
        if corroborated_by is None or self._last is None:
            return [self._change(inc, "opened")]
        if key in self._attribute(corroborated_by):
            inc.last_activity = self._last.at  # still overflowing then, as _follow_open says
        return [self._change(inc, "opened", sample=_sample(self._last.at, listener,
                                                           corroborated_by.rates))]

    def _resolve_held(self, probe: ProbeDelta) -> list[IncidentChange]:
        """Trusted lines held for a probe: where this probe shows the overflow here on a
        listener of their port, they open (or join) an incident. No listener on their port,
        or no overflow here within CORROBORATING_PROBES probes, means another namespace's
        line: it stays an event and starts nothing."""
        changes: list[IncidentChange] = []
        held, self.held = self.held, deque(maxlen=PENDING_TRUSTED)
        where = self.netns or "the host's namespace"
        for stored, probes in held:
            e = stored.event
            listener = self._listener_for(e.family, e.address, e.port)
            if listener is None and e.port is not None:
                log.info("kernel event %d: nothing listens on port %s in %s; another "
                         "namespace's line, no incident", stored.id, e.port, where)
            elif self._by_key(self._line_key(e, listener)) is not None:
                changes.extend(self._on_trusted_line(stored, listener))  # joins it
            elif self._overflow_here(probe, listener):
                changes.extend(self._on_trusted_line(stored, listener, corroborated_by=probe))
            elif probes + 1 < CORROBORATING_PROBES:
                self.held.append((stored, probes + 1))
            else:
                log.info("kernel event %d: port %s: no overflow in %s: another namespace's "
                         "line, no incident", stored.id, e.port, where)
        return changes

    def on_probe_failed(self, now: datetime, *, gone: bool) -> tuple[list[IncidentChange], int]:
        """A probe that could not read the namespace: what was quiet closes, and the held lines
        go (``gone``: the namespace does not exist, so a line can belong to no listener of it
        and they stay events; trusting them would widen what synwatch acts on to every
        namespace of the machine) or are let go (``release_held``). The service and a replay
        of its recording both come here. Returns the changes and how many lines were dropped."""
        dropped = self.drop_held() if gone else 0
        changes = [] if gone else self.release_held()
        return changes + self.expire(now), dropped

    def drop_held(self) -> int:
        """Forget the held lines (they stay recorded events); returns how many there were."""
        count = len(self.held)
        self.held = deque(maxlen=PENDING_TRUSTED)
        return count

    def release_held(self) -> list[IncidentChange]:
        """No probe to check held lines against (probes failing). A line never opens an
        incident on its word alone (it may be any namespace's): one joins its listener's open
        incident; the others wait for a probe that works (its interval covers theirs) as long
        as the quiet period, then stay events."""
        held, self.held = self.held, deque(maxlen=PENDING_TRUSTED)
        changes: list[IncidentChange] = []
        now = self.clock.now()
        for stored, probes in held:
            e = stored.event
            listener = self._listener_for(e.family, e.address, e.port)
            if self._by_key(self._line_key(e, listener)) is not None:
                changes.extend(self._on_trusted_line(stored, listener))
            elif now - (e.time or now) <= self.quiet:
                self.held.append((stored, probes))
            else:
                log.info("kernel event %d: port %s: no probe of %s could check it; no incident",
                         stored.id, e.port, self.netns or "the host's namespace")
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
        resumed = (prev is None and self._resumed_from is not None
                   and timedelta() < ev.at - self._resumed_from.at <= self.quiet)
        if resumed:
            # within the quiet period (longer, the incidents it kept would have closed)
            prev = self._resumed_from
        self._resumed_from = None
        probe = measure(prev, ev)
        if resumed:
            probe = replace(probe, since_restart=True)
        resolved = self._resolve_held(probe)  # this interval holds the lines read since the last
        if not probe.moving:
            self._moving_since = None
        elif self._moving_since is None and prev is not None:
            self._moving_since = prev.at  # they moved some time in the last interval
        self._last_probe = probe
        self._recent.append((ev.at, probe))
        active = self._attribute(probe)
        states = {listener_id(st): st for st in probe.snap.listeners}
        changes = self._open_on_counters(ev.at, probe, active, states)
        changes += self._open_half_open(ev.at, probe, states)
        changes += self._follow_open(ev.at, probe, active, states,
                                     {c.serial for c in resolved + changes
                                      if c.change == "opened"})
        if all(self._by_key(key) is not None for key in self._high_since):
            # no build-up is waiting to open a half_open incident, and a later one starts
            # after this probe: nothing kept is ever used (a probe holds its snapshot, and 120
            # of them grew the service by 1.2 MiB in the second minute of a flood)
            self._recent.clear()
        return resolved + changes

    def _open_on_counters(self, at: datetime, probe: ProbeDelta, active: set[ListenerKey],
                          states: dict[ListenerId, ListenerState]) -> list[IncidentChange]:
        """Overflows at ``open_rate``: an incident for each listener they belong to (one not
        attributable to any, if no incident is open)."""
        rates = probe.rates
        if (rates["syns_overflowed"] < self.th.open_rate
                and rates["listen_overflows"] < self.th.open_rate):
            return []
        changes = []
        for key in list(active) or ([None] if not self.open else []):
            if self._by_key(key) is None:
                st = states.get(key) if key else None
                inc = self._new(key, "counters", at=at, first=self._moving_since or at,
                                listener=st, snap=probe.snap)
                self._corroborate(inc)
                self._add(inc, st, probe, active=True)
                changes.append(self._change(inc, "opened", sample=_sample(at, st, rates)))
        return changes

    def _open_half_open(self, at: datetime, probe: ProbeDelta,
                        states: dict[ListenerId, ListenerState]) -> list[IncidentChange]:
        """A build-up of half-open requests held long enough opens an incident whose
        evidence is the build-up."""
        changes = []
        for key in sorted(self._half_open(at, probe.snap), key=str):
            if self._by_key(key) is None:
                st = states[key]
                since, _ = self._high_since[key]
                inc = self._new(key, "half_open", at=at, first=since, listener=st,
                                snap=probe.snap)
                inc.tally.half_open = True
                self._corroborate(inc)
                for when, earlier in list(self._recent)[:-1]:
                    if when > since:  # the build-up is this incident's evidence
                        self._add(inc, None, earlier, active=True)
                self._add(inc, st, probe, active=True)
                changes.append(self._change(inc, "opened", sample=_sample(at, st, probe.rates)))
        return changes

    def _follow_open(self, at: datetime, probe: ProbeDelta, active: set[ListenerKey],
                     states: dict[ListenerId, ListenerState],
                     just_opened: set[int]) -> list[IncidentChange]:
        """Every other open incident takes the probe, moves to a new phase if its flood
        changed, and closes after ``quiet_period`` without activity."""
        changes = []
        for inc in list(self.open.values()):
            if inc.serial in just_opened:
                continue
            is_active = (inc.key in active or (inc.key is None and probe.moving)
                         or (inc.tally.half_open and inc.key in self._high_since)
                         or (inc.resumed and probe.moving and not active - {inc.key}))
            inc.resumed = False
            st = states.get(inc.key) if inc.key else None
            self._add(inc, st, probe, active=is_active)
            self._next_phase(inc, at)
            if is_active:
                inc.last_activity = at
            if at - inc.last_activity >= self.quiet:
                del self.open[inc.serial]
                changes.append(self._change(inc, "closed", closed_at=at))
            else:
                changes.append(self._change(inc, "updated",
                                            sample=_sample(at, st, probe.rates)))
        return changes

    def _attribute(self, probe: ProbeDelta) -> set[ListenerKey]:
        """Which listeners the counters' movement belongs to: those with a full queue."""
        snap, deltas, accounted = probe.snap, probe.deltas, probe.accounted
        active: set[ListenerKey] = set()
        sampled_ports = _sampled_ports(probe)
        if deltas["syns_overflowed"]:
            full = [listener_id(st) for st in snap.listeners if _full_syn_queue(st)]
            # the probes of the last few seconds too: a flood that filled its queue in one
            # probe may overflow on into the next, and that interval's sample may hold none of
            # its SYNs (1 in N); the residue beside it stays still
            now = probe.at
            recent = [p for at, p in self._recent if now is not None and now - at <= FRESH_FOR]
            recent.append(probe)
            fresh = [k for k in full
                     if any(k[2] in _sampled_ports(p) or k in p.dropped or k in p.grew
                            for p in recent)]
            if fresh:
                # a queue still full of an earlier flood's request sockets (they retransmit for
                # up to a minute) gets no new SYNs: the sample, the listener's own drop count
                # (without cookies) or a queue that just filled says which one this flood fills
                full = fresh
            if not full and sampled_ports:  # syncookies=2 keeps queues empty
                assert probe.sampled is not None
                top_sampled = max(probe.sampled.ports, key=lambda p: p.syns).port
                full = [listener_id(st) for st in snap.listeners if st.listener.port == top_sampled]
            if not full and any(accounted.values()):
                by_port: dict[int, int] = {}
                for (port, _), n in accounted.items():
                    by_port[port] = by_port.get(port, 0) + n
                top_port = max(by_port, key=lambda p: by_port[p])
                full = [listener_id(st) for st in snap.listeners if st.listener.port == top_port]
            active.update(full)
        if deltas["listen_overflows"]:
            active.update(listener_id(st) for st in snap.listeners if _full_accept_queue(st))
            # the listener that dropped says so itself (tcp_listendrop() counts per socket)
            active.update(probe.dropped)
        return active

    @staticmethod
    def _add(inc: _Incident, st: ListenerState | None, probe: ProbeDelta, *, active: bool) -> None:
        """Fold one probe into the incident's phase and its recent window."""
        inc.tally.absorb(st, probe, active=active)
        if inc.window is not None:
            inc.window.absorb(st, probe, active=active)

    def _next_phase(self, inc: _Incident, at: datetime) -> None:
        """At the end of each verdict window: a confident verdict on the window's evidence that
        differs from the phase's starts a new phase, judged on that evidence from then on."""
        if inc.window is None or inc.window_start is None:
            inc.window, inc.window_start = inc.tally.fresh(), at
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
        inc.window, inc.window_start = inc.tally.fresh(), at

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
            key = listener_id(st)
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

