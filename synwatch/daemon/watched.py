"""One watched network namespace: its correlator, its SYN sampler (and, watching one namespace,
its accounting set), its responder once it has had an incident, and how it is read: in full
(synwatch.probes.snapshot) or, while quiet, its counters alone."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from synwatch.actions.responder import Responder
from synwatch.clock import Clock
from synwatch.config import Config
from synwatch.detect.correlate import Correlator
from synwatch.errors import CommandError, ProbeError
from synwatch.probes import accounting_off, procnet, sampler_off, sockdiag
from synwatch.probes.accounting import CHAIN, TABLE, SynAccounting
from synwatch.probes.evidence import Evidence
from synwatch.probes.snapshot import Snapshot, take
from synwatch.probes.synsample import SynSampler, open_sampler
from synwatch.records import KernelEvent, Place
from synwatch.system import netns
from synwatch.system.netnsfind import FoundNamespace
from synwatch.system.runner import available

log = logging.getLogger("synwatch")
T = TypeVar("T")
MAX_SAMPLERS = 16  # packet sockets open at once in flooded namespaces (our own's aside)
LISTENERS_FRESH = 1.0  # seconds a namespace's listener table answers a burst of kernel lines
# seconds a probe's look at listeners, sysctls and conntrack stands while no segment comes in
# (synwatch.probes.snapshot): how long a closed listener may stay in /metrics on an idle host
STILL_FOR = 10.0


def place_of(found: FoundNamespace) -> Place:
    """What the namespace is, for advice that fits it."""
    owner = found.owner
    if owner is None:
        return Place("own" if found.kind == "own" else
                     "netns" if found.kind == "netns" else "process")
    pod = f"{owner.pod_namespace}/{owner.pod}" if owner.pod else ""
    return Place("container", owner.runtime, pod)


@dataclass
class Watched:
    found: FoundNamespace
    correlator: Correlator
    always: bool  # probed every probe_interval (the one namespace, or our own among many)
    sampler: SynSampler | None = None
    accounting: SynAccounting | None = None
    responder: Responder | None = None
    stirring: tuple[int, ...] | None = None  # its STIRRING counters at the last sweep
    stirring_at: datetime | None = None
    segments: tuple[int, ...] | None = None  # its SEGMENTS counters at the last sweep
    active_until: float = 0.0  # probed in full until then (monotonic)
    due: float = 0.0  # its next full probe
    failure: str | None = None  # the last probe's failure, said once
    listeners: tuple[float, frozenset[tuple[int, str, int]]] | None = None
    gone: bool = False
    reread_due: float = 0.0  # (monotonic) its listeners are read again then, moving or not

    @property
    def name(self) -> str:
        return self.found.name

    was_active: bool = False  # at the last turn (a quiet spell starts when it stops being)

    def probing(self, now: float) -> bool:
        """Probed in full for its own sake: ours, moving lately, or an incident open."""
        return self.always or now < self.active_until or bool(self.correlator.open)

    def active(self, now: float) -> bool:
        """Probed in full now: probing, or holding a kernel line for its next probe."""
        return self.probing(now) or bool(self.correlator.held)

    def evidence(self, config: Config, clock: Clock, *, visiting: bool) -> Evidence:
        """A full probe (ProbeError when the namespace cannot be read); ``visiting``: entered
        on this thread (one of many namespaces), else on its own worker."""
        c = config
        # a kernel line waiting for this probe is about a listener that may be newer than the
        # last read (its namespace may be another, so no segment need have come in here); an
        # open incident's record follows the accept queue and the cookies it set every probe
        reread = (clock.monotonic() >= self.reread_due or bool(self.correlator.held)
                  or bool(self.correlator.open))
        if reread:
            self.reread_due = clock.monotonic() + STILL_FOR
        snap = take(self.name, v4_len=c.thresholds.ipv4_prefix, v6_len=c.thresholds.ipv6_prefix,
                    peers_for=self.correlator.ports_to_watch(),
                    enter=netns.visit if visiting else netns.in_netns,
                    previous=self.correlator.last_snapshot, reread=reread)
        counted = None
        if self.accounting is not None:
            try:
                counted = self.accounting.read()
            except ProbeError as exc:
                log.warning("%s", exc)
        sampled = self.sampler.read() if self.sampler is not None else None
        return Evidence(clock.now(), snap, counted, sampled)

    def open_sampler(self, config: Config, *, say: bool,
                     crowded: bool) -> tuple[SynSampler | None, str]:
        """Its SYN sampler, or None; what to say of it. ``crowded``: MAX_SAMPLERS others have
        one already."""
        c = config
        why = sampler_off(c) or (f"{MAX_SAMPLERS} flooded namespaces have one already"
                                 if crowded else None)
        if why is not None:
            return None, f"SYN sampler off ({why})"
        try:
            sampler = open_sampler(self.name, c.thresholds.ipv4_prefix,
                                   c.thresholds.ipv6_prefix)
        except ProbeError as exc:
            if say and c.sampler is True:  # asked for: its failure is a warning of its own
                log.warning("SYN sampler: off: %s", exc.why)
            return None, f"SYN sampler off ({exc.why})"
        return sampler, (f"SYN sampler (a packet socket in "
                         f"{self.name or 'the host namespace'}, 1 in N adapting to the rate)")

    def listens_for(self, e: KernelEvent, now: float, *, fresh: bool = False) -> bool:
        """Has it a listener a kernel line fits (its port, and its address where the line
        prints one)? Its listener table is read again when older than LISTENERS_FRESH, or
        ``fresh``."""
        if fresh or self.listeners is None or now - self.listeners[0] > LISTENERS_FRESH:
            try:
                table = netns.visit(self.name, sockdiag.listeners)
            except ProbeError:
                return False
            self.listeners = (now, frozenset((li.family, li.address, li.port) for li in table))
        return any(port == e.port and (e.address is None or address == e.address
                                       or address in ("0.0.0.0", "::"))  # noqa: S104 - names
                   for _, address, port in self.listeners[1])

    def baseline(self, proc: Path, now: datetime) -> Evidence | None:
        """What the first full probe of a quiet namespace measures from: its counters as the
        last sweep read them, all at that time (they had not moved then, or it would have been
        probed: whatever moved them since is what woke it); never swept, its counters now."""
        if (self.stirring is not None and self.segments is not None
                and self.stirring_at is not None):
            counters = dict(zip((f"TcpExt.{n}" for n in procnet.STIRRING), self.stirring,
                                strict=True))
            counters.update(zip((f"Tcp.{n}" for n in procnet.SEGMENTS), self.segments,
                                strict=True))
            return Evidence(self.stirring_at, Snapshot(self.name, (), counters, {}))
        fresh = self.counters_now(proc)  # never swept: from now on
        return None if fresh is None else Evidence(now, Snapshot(self.name, (), fresh, {}))

    def counters_now(self, proc: Path) -> dict[str, int] | None:
        """All its counters now (a baseline when it was never swept)."""
        return self._read_net(proc, lambda net: procnet.read_counters(net.parent,
                                                                      net.name).values)

    def segments_now(self, proc: Path) -> tuple[int, ...] | None:
        """Its SEGMENTS (synwatch.probes.procnet.segments_in)."""
        return self._read_net(proc, lambda net: procnet.segments_in(net / "snmp"))

    def stirring_now(self, proc: Path) -> tuple[int, ...] | None:
        """Its STIRRING counters (synwatch.probes.procnet.stirring)."""
        return self._read_net(proc, lambda net: procnet.stirring(net / "netstat"))

    def _read_net(self, proc: Path, read: Callable[[Path], T | None]) -> T | None:
        """``read`` of its /proc net directory: a process's of its own where it still has one
        (no entering: /proc/PID/net is the namespace of PID), else entered; None when neither
        can be read."""
        pid = self.found.pid
        if pid is not None:
            try:
                st = (proc / str(pid) / "ns" / "net").stat()
            except OSError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == self.found.ident:
                return read(proc / str(pid) / "net")
        try:
            return netns.visit(self.name, lambda: read(Path("/proc/thread-self/net")))
        except ProbeError:
            return None

def describe(live: list[Watched], now: float) -> dict[str, Any]:
    """Namespaces as `synwatch status` shows them: how many, and the ones probed in full now
    (a quiet one is a count, not a line a second in the status file)."""
    return {"watched": len(live), "probed": [
        {"name": w.name, "kind": w.found.kind,
         "owner": (f"{w.found.owner.runtime} {w.found.owner.container_id[:12]}"
                   if w.found.owner else None),
         "open_incidents": len(w.correlator.open)} for w in live if w.active(now)]}


def summary(seen: dict[str, Any]) -> str:
    """``describe``'s outcome in a few words: "12 namespaces (2 probed in full)"."""
    return (f"{seen['watched']} namespace{'s' if seen['watched'] != 1 else ''} "
            f"({len(seen['probed'])} probed in full)")


def accounting_for(name: str, config: Config) -> tuple[SynAccounting | None, str]:
    """The accounting set in namespace ``name``, or None; what to say of it at the start."""
    c = config
    why = accounting_off(c, euid=os.geteuid(), nft=available("nft"))
    if why is not None:
        return None, f"SYN accounting off ({why})"
    acct = SynAccounting(name, c.thresholds.ipv4_prefix, c.thresholds.ipv6_prefix)
    try:
        acct.setup()
    except CommandError as exc:
        log.warning("SYN accounting: off: %s", exc)
        return None, "SYN accounting off (it could not be set up)"
    return acct, f"SYN accounting (nftables table inet {TABLE}, chain {CHAIN})"
