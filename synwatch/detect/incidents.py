"""The open incidents of one namespace, as the correlator keeps them (synwatch/detect/correlate.py):
one per listener, opened, resumed after a restart, judged and described as changes for the
history and the actions."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from synwatch.clock import Clock
from synwatch.config import Thresholds
from synwatch.detect.advice import in_place
from synwatch.detect.delta import RATES, ListenerId, ProbeDelta, listener_id
from synwatch.detect.rules import half_open_floor
from synwatch.detect.tally import Tally
from synwatch.detect.verdict import judge
from synwatch.probes.evidence import Evidence
from synwatch.probes.sampled import SynSample
from synwatch.probes.snapshot import ListenerState, Snapshot
from synwatch.records import (
    IncidentChange,
    Place,
    StoredEvent,
    TimelinePoint,
    Trigger,
)

log = logging.getLogger(__name__)
ListenerKey = tuple[int, str, int] | None  # (family, address, port); None: not attributable
PENDING_UNTRUSTED = 256  # untrusted lines kept for corroboration; older ones just stay events
PENDING_TRUSTED = 1024  # trusted lines waiting for the next probe (one line per socket)
# probes a held line waits for this namespace's state to show its overflow: the one the service
# takes at once (its interval holds the line), and one more for a line timed just after it
CORROBORATING_PROBES = 2
MAX_PHASES = 32
RECENT_PROBES = 120  # probes kept for an incident that opens after its build-up
BUILDUP = 60  # probes before an opening kept as its build-up (a minute at the default interval)
RESIDUE_SLACK = 5  # seconds a closed flood's request sockets may outlast their retries
FRESH_FOR = timedelta(seconds=3)  # a queue filled, sampled or dropping this recently is a flood's


@dataclass
class OpenIncident:
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
    # other namespaces with a listener that a kernel line of this incident's also fits
    also_fits: tuple[str, ...] = ()
    buildup: tuple[TimelinePoint, ...] = ()  # the probes before it, written with its opening


def ports_sampled_by(probe: ProbeDelta) -> set[int]:
    """The ports the packet sample kept SYNs for in the probe's interval."""
    return ({p.port for p in probe.sampled.ports if p.samples}
            if probe.sampled is not None else set())


def fresh_marks(probe: ProbeDelta) -> tuple[frozenset[int], frozenset[ListenerId]]:
    """What the probe says of where a flood is: the ports sampled, the listeners that
    dropped or whose SYN-RECV grew."""
    return frozenset(ports_sampled_by(probe)), frozenset(probe.dropped) | probe.grew


def full_syn_queue(st: ListenerState) -> bool:
    backlog = st.listener.backlog
    return st.syn_recv >= backlog if backlog > 0 else st.syn_recv > 0


def full_accept_queue(st: ListenerState) -> bool:
    return st.listener.backlog > 0 and st.listener.accept_queue >= st.listener.backlog


def timeline_point(at: datetime, st: ListenerState | None, rates: dict[str, float],
                   sampled: SynSample | None = None) -> TimelinePoint:
    """The listener at one probe, with the counters' rates and, where the packet sampler saw
    its port, its estimate of every SYN a second (``syns_sampled``: the queue-full rate is
    only those that overflowed)."""
    point_rates = dict(rates)
    if st is not None and st.listener.port in (estimated := per_second(sampled)):
        point_rates["syns_sampled"] = estimated[st.listener.port]
    return TimelinePoint(at=at, syn_recv=st.syn_recv if st else None,
                         accept_queue=st.listener.accept_queue if st else None,
                         backlog=st.listener.backlog if st else None, rates=point_rates,
                         top_prefixes=st.top_prefixes if st else ())


@dataclass(frozen=True, slots=True)
class Glimpse:
    """What a probe said of the listeners that held anything, kept small: an incident's
    build-up is made of the last BUILDUP of them (whole probes hold their snapshots)."""

    at: datetime
    rates: dict[str, float]
    sampled: dict[int, float]  # the sampler's SYNs a second per port
    listeners: dict[tuple[int, str, int], tuple[int, int, int]]  # syn_recv, accept, backlog


def per_second(sampled: SynSample | None) -> dict[int, float]:
    """The sampler's estimate of every SYN a second, per port it saw."""
    if sampled is None or sampled.seconds <= 0:
        return {}
    return {p.port: round(p.syns / sampled.seconds, 1) for p in sampled.ports}


def glimpse(at: datetime, probe: ProbeDelta) -> Glimpse:
    return Glimpse(at, dict(probe.rates),
                   {port: v for port, v in per_second(probe.sampled).items() if v},
                   {listener_id(st): (st.syn_recv, st.listener.accept_queue,
                                      st.listener.backlog)
                    for st in probe.snap.listeners if st.syn_recv or st.listener.accept_queue})


def buildup_of(before: Iterable[Glimpse], key: ListenerKey,
               opened: datetime) -> tuple[TimelinePoint, ...]:
    """The listener at the probes before an incident opened (its build-up), for the history's
    timeline and the incident's picture; a probe that saw nothing in its queues says 0."""
    if key is None:
        return ()
    points = []
    for g in before:
        if g.at >= opened:
            continue
        syn_recv, accept, backlog = g.listeners.get(key, (0, 0, -1))
        rates = dict(g.rates)
        if key[2] in g.sampled:
            rates["syns_sampled"] = g.sampled[key[2]]
        points.append(TimelinePoint(at=g.at, syn_recv=syn_recv, accept_queue=accept,
                                    backlog=backlog if backlog >= 0 else None, rates=rates,
                                    top_prefixes=()))
    return tuple(points[-BUILDUP:])


class Incidents:
    """Incidents by listener, and what makes a change of one."""

    def __init__(self, host: str, netns: str, thresholds: Thresholds, quiet_period: float,
                 clock: Clock, *, place: Place | None = None) -> None:
        self.host, self.netns, self.th, self.clock = host, netns, thresholds, clock
        self.place = place or Place()
        self.ident = ""  # the namespace's identity (device:inode), kept with its incidents
        self.quiet = timedelta(seconds=quiet_period)
        self.open: dict[int, OpenIncident] = {}
        self._serial = 0
        self._last: Evidence | None = None
        self._resumed_from: Evidence | None = None  # the last probe before a restart
        self._last_probe: ProbeDelta | None = None
        self._recent: deque[tuple[datetime, ProbeDelta]] = deque(maxlen=RECENT_PROBES)
        # the last probes whatever happened: an incident's build-up (_recent is emptied
        # while nothing builds up)
        self._before: deque[Glimpse] = deque(maxlen=BUILDUP)
        # what the last probes said of which listeners a flood fills (the ports sampled, the
        # listeners that dropped or whose SYN-RECV grew), kept when _recent is emptied: the
        # counters can count a burst's SYNs a probe after the sampler saw them
        self._fresh: deque[tuple[datetime, frozenset[int], frozenset[ListenerId]]] = deque(
            maxlen=RECENT_PROBES)
        # listeners whose SYN-RECV is high: since when, and PassiveOpens then
        self._high_since: dict[tuple[int, str, int], tuple[datetime, int]] = {}
        # listeners whose incident closed with their SYN queue still high, and until when: a
        # flood's request sockets live on after it (tcp_synack_retries=5: 63 s) and are no
        # half-open build-up of their own unless new SYNs come (correlate._half_open)
        self._residue: dict[tuple[int, str, int], datetime] = {}
        self._moving_since: datetime | None = None
        self._untrusted: deque[tuple[datetime, int | None, int]] = deque(
            maxlen=PENDING_UNTRUSTED)  # (time, port, event id)
        # trusted lines waiting for a probe of this namespace, with the probes they have seen
        self.held: deque[tuple[StoredEvent, int]] = deque(maxlen=PENDING_TRUSTED)
        self._also: dict[int, tuple[str, ...]] = {}  # held line -> other namespaces it fits

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
        inc = OpenIncident(
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

    def rebase(self, baseline: Evidence) -> None:
        """A namespace probed again after a quiet spell: its last probe, maybe hours old, is no
        interval's evidence (PassiveOpens would count the whole spell's handshakes). The next
        probe measures from ``baseline``: its counters read just before the flood (service
        side: synwatch/daemon/watchset.py) and no listener."""
        self._last = baseline
        self._last_probe = self._moving_since = None
        self._recent.clear()
        self._fresh.clear()
        self._residue.clear()
        self._high_since.clear()

    def rebase_none(self) -> None:
        """As rebase, with nothing to measure from: the next probe is the first."""
        self._last = self._last_probe = self._moving_since = None
        self._recent.clear()
        self._fresh.clear()
        self._residue.clear()
        self._high_since.clear()

    @property
    def last_snapshot(self) -> Snapshot | None:
        """What the last probe read (or the baseline the next one measures from)."""
        return None if self._last is None else self._last.snapshot

    @property
    def moving(self) -> bool:
        """Did the overflow counters move over the last probe's interval?"""
        return self._last_probe is not None and self._last_probe.moving

    def ports_to_watch(self) -> frozenset[int]:
        """Listener ports whose completed connections the next probe reads (inet_diag), to
        tell sources that complete handshakes from a flood's: those of open incidents, and
        those whose SYN queue was full at the last probe (an incident may open on it)."""
        ports = {i.tally.port for i in self.open.values() if i.tally.port is not None}
        if self._last is not None:
            ports.update(st.listener.port for st in self._last.snapshot.listeners
                         if st.syn_recv and full_syn_queue(st))
        return frozenset(ports)

    def _by_key(self, key: ListenerKey) -> OpenIncident | None:
        return next((i for i in self.open.values() if i.key == key), None)

    def _new(self, key: ListenerKey, trigger: Trigger, *, at: datetime,
             first: datetime | None, listener: ListenerState | None,
             snap: Snapshot | None) -> OpenIncident:
        self._serial += 1
        tally = Tally()
        if key is not None:
            tally.family, tally.address, tally.port = key
        if listener is not None:
            tally.backlog = listener.listener.backlog
        if snap is not None:
            tally.sysctls = dict(snap.sysctls)
        inc = OpenIncident(self._serial, key, trigger, at, first, self.clock.now(), at, tally)
        inc.window, inc.window_start = tally.fresh(), at
        inc.buildup = buildup_of(self._before, key, at)
        self.open[inc.serial] = inc
        return inc

    def _change(self, inc: OpenIncident, change: Literal["opened", "updated", "closed"],
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
            recommendations=in_place(j.recommendations, self.place),
            reasons=j.reasons + ((f"the kernel's line fits a listener in {len(inc.also_fits) + 1} "
                                  f"namespaces ({', '.join(inc.also_fits)} too): it is linked "
                                  "to the first whose own state showed the overflow",)
                                 if inc.also_fits else ()),
            state={"tally": t.to_json(), "last_activity": inc.last_activity.isoformat(),
                   "phases": [{"at": at.isoformat(), "verdict": v} for at, v in inc.phases],
                   "probe": self._saved_probe(),
                   **({"netns_ident": self.ident} if self.ident else {})},
            sample=sample, earlier=inc.buildup if change == "opened" else (),
            event_ids=events,
            bans=j.targets.ban if j.targets else (), limits=j.targets.limit if j.targets else ())

    def _attribute(self, probe: ProbeDelta) -> set[ListenerKey]:
        """Which listeners the counters' movement belongs to: those with a full queue."""
        snap, deltas, accounted = probe.snap, probe.deltas, probe.accounted
        active: set[ListenerKey] = set()
        sampled_ports = ports_sampled_by(probe)
        if deltas["syns_overflowed"]:
            full = [listener_id(st) for st in snap.listeners if full_syn_queue(st)]
            # the probes of the last few seconds too: a flood that filled its queue in one
            # probe may overflow on into the next, and that interval's sample may hold none of
            # its SYNs (1 in N); the residue beside it stays still
            now = probe.at
            recent = [(ports, keys) for at, ports, keys in self._fresh
                      if now is not None and now - at <= FRESH_FOR]
            recent.append(fresh_marks(probe))
            fresh = [k for k in full if any(k[2] in ports or k in keys for ports, keys in recent)]
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
            active.update(listener_id(st) for st in snap.listeners if full_accept_queue(st))
            # the listener that dropped says so itself (tcp_listendrop() counts per socket)
            active.update(probe.dropped)
        return active

    @staticmethod
    def _add(inc: OpenIncident, st: ListenerState | None, probe: ProbeDelta, *,
             active: bool) -> None:
        """Fold one probe into the incident's phase and its recent window."""
        inc.tally.absorb(st, probe, active=active)
        if inc.window is not None:
            inc.window.absorb(st, probe, active=active)

    def expire(self, now: datetime) -> list[IncidentChange]:
        """Close quiet incidents when there is no evidence to do it with (probes failing)."""
        out = []
        for inc in list(self.open.values()):
            if now - inc.last_activity >= self.quiet:
                out.append(self._close(inc, now))
        return out

    def _close(self, inc: OpenIncident, at: datetime) -> IncidentChange:
        del self.open[inc.serial]
        last = self._last.snapshot if self._last is not None else None
        st = next((x for x in last.listeners if listener_id(x) == inc.key), None) if last else None
        if st is not None and st.syn_recv >= half_open_floor(st.listener.backlog,
                                                             self.th.half_open_min):
            # a request socket lives through its SYN-ACK's retries: 2^(r+1) - 1 s (RFC 6298
            # doubling from 1 s; tcp_synack_retries, 5 by default), and a few seconds more
            retries = (last.sysctls.get("net.ipv4.tcp_synack_retries") if last else None) or 5
            self._residue[listener_id(st)] = (
                at + timedelta(seconds=2 ** (min(retries, 10) + 1) - 1 + RESIDUE_SLACK))
        return self._change(inc, "closed", closed_at=at)

    def close_all(self, now: datetime) -> list[IncidentChange]:
        """Close every open incident now: the namespace is gone (its container stopped), so no
        evidence will come and nothing is left to protect there."""
        out = [self._change(inc, "closed", closed_at=now) for inc in self.open.values()]
        self.open.clear()
        self.held.clear()
        return out
