"""Kernel lines into incidents: a trusted SYN-flood line opens one only where this namespace's
own state bears it out (held for the next probes until it does, or dropped), an untrusted line
is linked to an incident the kernel's state opened (synwatch/detect/correlate.py has the rest)."""

from __future__ import annotations

import logging
from collections import deque
from datetime import datetime

from synwatch.detect.delta import ProbeDelta, listener_id
from synwatch.detect.incidents import (
    CORROBORATING_PROBES,
    PENDING_TRUSTED,
    PENDING_UNTRUSTED,
    Incidents,
    ListenerKey,
    OpenIncident,
    full_syn_queue,
    timeline_point,
)
from synwatch.probes.snapshot import ListenerState
from synwatch.records import (
    IncidentChange,
    KernelEvent,
    StoredEvent,
)

log = logging.getLogger(__name__)


class KernelLines(Incidents):
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

    def on_event(self, stored: StoredEvent, also: tuple[str, ...] = ()) -> list[IncidentChange]:
        """``also``: the other namespaces with a listener this line fits (the service offers a
        line to each; the first whose state bears it out takes it, and its incident says so)."""
        e = stored.event
        if also:
            self._also[stored.id] = also
            while len(self._also) > PENDING_TRUSTED:  # lines no probe bore out
                self._also.pop(next(iter(self._also)))
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
        if full_syn_queue(listener) or key in probe.dropped:
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
        also = self._also.pop(stored.id, ())
        if inc is not None:
            inc.also_fits = tuple(dict.fromkeys((*inc.also_fits, *also)))
            inc.new_events.append(stored.id)
            inc.last_activity = max(inc.last_activity, at)
            return [self._change(inc, "updated")]
        inc = self._new(key, "log", at=at, first=at, listener=listener,
                        snap=self._last.snapshot if self._last else None)
        inc.also_fits = also
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
        return [self._change(inc, "opened", sample=timeline_point(
            self._last.at, listener, corroborated_by.rates, corroborated_by.sampled))]

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

    def forget(self, event_id: int) -> None:
        """Another namespace took this line: it is not held (nor kept to corroborate) here."""
        self._also.pop(event_id, None)
        self.held = deque(((s, n) for s, n in self.held if s.id != event_id),
                          maxlen=PENDING_TRUSTED)
        self._untrusted = deque((u for u in self._untrusted if u[2] != event_id),
                                maxlen=PENDING_UNTRUSTED)

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

    def _corroborate(self, inc: OpenIncident) -> None:
        """Link untrusted lines about this listener from the quiet period before it opened."""
        keep: deque[tuple[datetime, int | None, int]] = deque(maxlen=PENDING_UNTRUSTED)
        for at, port, event_id in self._untrusted:
            if (port == inc.tally.port or inc.key is None) and inc.opened_at - at <= self.quiet:
                inc.new_events.append(event_id)
            else:
                keep.append((at, port, event_id))
        self._untrusted = keep
