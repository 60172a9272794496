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
from dataclasses import replace
from datetime import datetime, timedelta

from synwatch.detect.delta import ListenerId, ProbeDelta, listener_id, measure
from synwatch.detect.incidents import (
    MAX_PHASES,
    ListenerKey,
    OpenIncident,
    fresh_marks,
    glimpse,
    ports_sampled_by,
    timeline_point,
)
from synwatch.detect.kernellines import KernelLines
from synwatch.detect.rules import half_open_floor
from synwatch.detect.verdict import judge
from synwatch.probes.evidence import Evidence
from synwatch.probes.snapshot import ListenerState
from synwatch.records import (
    IncidentChange,
)

log = logging.getLogger(__name__)


class Correlator(KernelLines):

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
        self._fresh.append((ev.at, *fresh_marks(probe)))
        self._before.append(glimpse(ev.at, probe))
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
                changes.append(self._change(inc, "opened",
                                            sample=timeline_point(at, st, rates, probe.sampled)))
        return changes

    def _open_half_open(self, at: datetime, probe: ProbeDelta,
                        states: dict[ListenerId, ListenerState]) -> list[IncidentChange]:
        """A build-up of half-open requests held long enough opens an incident whose
        evidence is the build-up."""
        changes = []
        for key in sorted(self._half_open(at, probe), key=str):
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
                changes.append(self._change(inc, "opened",
                                            sample=timeline_point(at, st, probe.rates,
                                                                  probe.sampled)))
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
                changes.append(self._close(inc, at))
            else:
                changes.append(self._change(inc, "updated",
                                            sample=timeline_point(at, st, probe.rates,
                                                                  probe.sampled)))
        return changes

    def _next_phase(self, inc: OpenIncident, at: datetime) -> None:
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

    def _half_open(self, at: datetime, probe: ProbeDelta) -> set[tuple[int, str, int]]:
        """Listeners whose SYN-RECV has stayed high for ``half_open_for`` while most of those
        requests never completed: a slow flood parks a queue at half its backlog without a log
        line or an overflow (reqsk_timer_handler prunes old requests once half full). A
        closed flood's request sockets are none, until new SYNs come (its residue neither
        grows nor is sampled), they drain, or they have outlived their retries."""
        snap = probe.snap
        passive = snap.counters.get("Tcp.PassiveOpens", 0)
        found: set[tuple[int, str, int]] = set()
        high: dict[tuple[int, str, int], tuple[datetime, int]] = {}
        sampled = ports_sampled_by(probe)
        self._residue = {k: until for k, until in self._residue.items() if at < until}
        for st in snap.listeners:
            key = listener_id(st)
            floor = half_open_floor(st.listener.backlog, self.th.half_open_min)
            if key in self._residue and (key in probe.grew or key[2] in sampled
                                         or st.syn_recv < floor):
                del self._residue[key]
            if st.syn_recv < floor or key in self._residue:
                continue
            since, opens_then = self._high_since.get(key, (at, passive))
            high[key] = (since, opens_then)
            if (at - since).total_seconds() < self.th.half_open_for:
                continue
            completed = max(0, passive - opens_then)  # the namespace's: an upper bound
            if completed / (completed + st.syn_recv) < self.th.capacity_completion:
                found.add(key)
        self._high_since = high
        return found

