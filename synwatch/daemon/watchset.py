"""The network namespaces the service watches, each with its own correlator, SYN sampler and
responder: one (``watch.netns`` a name, or our own), or every one that matches ``watch.netns``'s
globs, followed as containers start and stop.

What a namespace costs is kept to what it needs. A SYN-RECV dump walks the kernel's whole
established-socket table, every namespace's together (inet_diag_dump_icsk loops over every
ehash bucket and skips the sockets of other namespaces: about 1.3 ms here, empty namespace or
not), so 200 namespaces probed each second would cost a core a quarter of its time. A quiet
namespace gets only a read of its TcpExt counters every IDLE_SWEEP seconds (from
/proc/PID/net/netstat where a process is in it: no entering; ~0.1 ms); a namespace whose
overflow, cookie or SYN-ACK retransmit counters moved, or that a kernel line names, is probed
in full every probe_interval with a SYN sampler of its own until it has been quiet for the
quiet period. Our own namespace is probed as it always was.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from synwatch.actions.responder import Responder
from synwatch.clock import Clock
from synwatch.config import Config
from synwatch.detect.correlate import Correlator
from synwatch.errors import CommandError, ProbeError
from synwatch.probes import accounting_off, procnet, sampler_off, sockdiag
from synwatch.probes.accounting import CHAIN, TABLE, SynAccounting
from synwatch.probes.evidence import Evidence
from synwatch.probes.snapshot import take
from synwatch.probes.synsample import SynSampler, open_sampler
from synwatch.records import IncidentChange, Place, StoredEvent
from synwatch.system import netns
from synwatch.system.netnsfind import FoundNamespace, find_namespaces
from synwatch.system.runner import available

log = logging.getLogger("synwatch")
IDLE_SWEEP = 10.0  # seconds between reads of every quiet namespace's counters
DISCOVER_EVERY = 5.0  # seconds between looks for namespaces that came or went
MAX_SAMPLERS = 16  # packet sockets open at once in flooded namespaces (our own's aside)
LISTENERS_FRESH = 1.0  # seconds a namespace's listener table answers a burst of kernel lines


@dataclass
class Watched:
    found: FoundNamespace
    correlator: Correlator
    always: bool  # probed every probe_interval (the one namespace, or our own among many)
    sampler: SynSampler | None = None
    accounting: SynAccounting | None = None
    responder: Responder | None = None
    stirring: tuple[int, ...] | None = None
    active_until: float = 0.0  # probed in full until then (monotonic)
    due: float = 0.0  # its next full probe
    failure: str | None = None  # the last probe's failure, said once
    listeners: tuple[float, frozenset[tuple[int, str, int]]] | None = None
    gone: bool = False

    @property
    def name(self) -> str:
        return self.found.name

    def active(self, now: float) -> bool:
        return (self.always or now < self.active_until or bool(self.correlator.open)
                or bool(self.correlator.held))


def _place(found: FoundNamespace) -> Place:
    owner = found.owner
    if owner is None:
        return Place("own" if found.kind == "own" else
                     "netns" if found.kind == "netns" else "process")
    pod = f"{owner.pod_namespace}/{owner.pod}" if owner.pod else ""
    return Place("container", owner.runtime, pod)


@dataclass
class WatchSet:
    config: Config
    clock: Clock
    make_responder: Callable[[Config], Responder]
    proc: Path = Path("/proc")
    by_ident: dict[netns.NsId, Watched] = field(default_factory=dict)
    _discover_due: float = 0.0
    _sweep_due: float = 0.0
    _probe_due: float = 0.0  # the earliest due full probe, as due() last worked it out

    # -- which namespaces ---------------------------------------------------------------------

    @property
    def many(self) -> bool:
        return self.config.many_namespaces

    def all(self) -> list[Watched]:
        return list(self.by_ident.values())

    def named(self, name: str) -> Watched | None:
        return next((w for w in self.by_ident.values() if w.name == name), None)

    def start(self) -> list[str]:
        """The first namespaces and their evidence; returns what to say of the sources of a
        flood."""
        c = self.config
        if not self.many:
            found = FoundNamespace((0, 0), c.netns, netns.NETNS_DIR / c.netns,
                                   "netns" if c.netns else "own")
            w = self._add(found, always=True)
            w.accounting, acct = self._accounting(w)
            w.sampler, sampler = self._open_sampler(w, say=True)
            said = [sampler, acct]
        else:
            self.discover()
            ours = next((w for w in self.by_ident.values() if w.always), None)
            said = [f"SYN samplers opened where counters move (at most {MAX_SAMPLERS} besides "
                    "our own namespace's)", "SYN accounting off (watching several namespaces)"]
            if ours is not None:  # probed as it always was, with its sampler from the start
                ours.sampler, said[0] = self._open_sampler(ours, say=True)
                said[0] += f"; in the others where counters move (at most {MAX_SAMPLERS})"
        return said

    def resume(self, change: IncidentChange) -> tuple[str, int]:
        """An incident left open by the last run, carried on in its namespace's correlator;
        returns its handle there. Its namespace gone meanwhile, it closes at the next look."""
        w = self.named(change.netns)
        if w is None:
            w = self._add(FoundNamespace((-1, len(self.by_ident)), change.netns,
                                         Path("/nonexistent"), "netns"), always=False)
            w.gone = True
        return w.name, w.correlator.resume(change)

    def _add(self, found: FoundNamespace, *, always: bool) -> Watched:
        c = self.config
        if found.kind in ("container", "process"):
            netns.bind(found.name, found.path, found.ident)
        w = Watched(found, Correlator(c.host, found.name, c.thresholds, c.quiet_period,
                                      self.clock, place=_place(found)), always=always)
        self.by_ident[found.ident] = w
        return w

    def discover(self) -> list[Watched]:
        """Look for namespaces that came or went; returns those that went (their incidents
        close, their responders stop)."""
        self._discover_due = self.clock.monotonic() + DISCOVER_EVERY
        known = {ident: w.found for ident, w in self.by_ident.items()}
        found = {f.ident: f for f in find_namespaces(self.proc, known=known)
                 if self.config.watches(f.name)}
        went = [w for ident, w in self.by_ident.items() if ident not in found]
        for w in went:
            w.gone = True
        for ident, f in found.items():
            if ident not in self.by_ident:
                w = self._add(f, always=f.kind == "own")
                log.info("watching namespace %s%s", f.name or "(our own)",
                         f" ({f.owner.runtime} {f.owner.container_id[:12]})" if f.owner else "")
        return went

    def forget(self, w: Watched) -> None:
        """A namespace that went: its sampler closes, its name no longer enters anything."""
        if w.sampler is not None:
            w.sampler.stop()
        self.by_ident.pop(w.found.ident, None)
        if w.found.kind in ("container", "process"):
            netns.unbind(w.name)
        log.info("namespace %s is gone", w.name)

    # -- when to probe what -------------------------------------------------------------------

    def next_due(self) -> float:
        """When the service must next call due(); cheap (the loop asks often), because due()
        works out the earliest full probe each time it runs, and anything that makes one due
        sooner (activate, probe_now) lowers it."""
        if self.many:
            return min(self._probe_due, self._discover_due, self._sweep_due)
        return self._probe_due

    def due(self) -> tuple[list[Watched], list[Watched]]:
        """The namespaces to probe in full now, and those that went since the last look."""
        now = self.clock.monotonic()
        went: list[Watched] = []
        if self.many and now >= self._discover_due:
            went = self.discover()
        if self.many and now >= self._sweep_due:
            self._sweep(now)
        active = [w for w in self.by_ident.values() if not w.gone and w.active(now)]
        ready = [w for w in active if now >= w.due]
        for w in ready:
            w.due = now + self.config.probe_interval
        # a namespace that went quiet meanwhile is not waited for (it is swept instead)
        self._probe_due = min((w.due for w in active), default=now + IDLE_SWEEP)
        return ready, went + [w for w in self.by_ident.values() if w.gone and w not in went]

    def probe_now(self, w: Watched | None = None) -> None:
        for each in [w] if w is not None else self.by_ident.values():
            each.due = 0.0
        self._probe_due = 0.0

    def _sweep(self, now: float) -> None:
        """Every quiet namespace's counters: the ones that moved are probed from now on."""
        self._sweep_due = now + IDLE_SWEEP
        for w in self.by_ident.values():
            if w.gone or w.active(now):
                continue
            seen = self._stirring(w)
            if seen is not None and w.stirring is not None and seen != w.stirring:
                self.activate(w, now)
            w.stirring = seen

    def _stirring(self, w: Watched) -> tuple[int, ...] | None:
        pid = w.found.pid
        if pid is not None:  # no entering, where the process is still the namespace's
            try:
                st = (self.proc / str(pid) / "ns" / "net").stat()
            except OSError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == w.found.ident:
                return procnet.stirring(self.proc / str(pid) / "net" / "netstat")
        try:
            return netns.visit(w.name, lambda: procnet.stirring(
                Path("/proc/thread-self/net/netstat")))
        except ProbeError:
            return None

    def activate(self, w: Watched, now: float) -> None:
        if not w.active(now):
            log.debug("namespace %s: counters moved; probing it every %.1f s", w.name,
                      self.config.probe_interval)
        w.active_until = now + self.config.quiet_period
        w.due = self._probe_due = 0.0
        if w.sampler is None and self.many and not w.gone:
            w.sampler, _ = self._open_sampler(w, say=False)

    def settle(self, w: Watched, moving: bool) -> None:
        """After a probe: a namespace still moving stays active; one quiet for the quiet period
        with nothing open goes back to counter reads, and its sampler closes."""
        now = self.clock.monotonic()
        if moving:
            w.active_until = now + self.config.quiet_period
        if self.many and not w.always and not w.active(now) and w.sampler is not None:
            w.sampler.stop()
            w.sampler = None

    # -- evidence -----------------------------------------------------------------------------

    def evidence(self, w: Watched) -> Evidence:
        """A full probe of one namespace (ProbeError when it cannot be read)."""
        c = self.config
        snap = take(w.name, v4_len=c.thresholds.ipv4_prefix, v6_len=c.thresholds.ipv6_prefix,
                    peers_for=w.correlator.ports_to_watch(),
                    enter=netns.visit if self.many else netns.in_netns)
        counted = None
        if w.accounting is not None:
            try:
                counted = w.accounting.read()
            except ProbeError as exc:
                log.warning("%s", exc)
        sampled = w.sampler.read() if w.sampler is not None else None
        return Evidence(self.clock.now(), snap, counted, sampled)

    def _accounting(self, w: Watched) -> tuple[SynAccounting | None, str]:
        c = self.config
        why = accounting_off(c, euid=os.geteuid(), nft=available("nft"))
        if why is not None:
            return None, f"SYN accounting off ({why})"
        acct = SynAccounting(w.name, c.thresholds.ipv4_prefix, c.thresholds.ipv6_prefix)
        try:
            acct.setup()
        except CommandError as exc:
            log.warning("SYN accounting: off: %s", exc)
            return None, "SYN accounting off (it could not be set up)"
        return acct, f"SYN accounting (nftables table inet {TABLE}, chain {CHAIN})"

    def _open_sampler(self, w: Watched, *, say: bool) -> tuple[SynSampler | None, str]:
        c = self.config
        why = sampler_off(c)
        if why is None and self.many and not w.always and sum(
                1 for x in self.by_ident.values() if x.sampler is not None and not x.always
        ) >= MAX_SAMPLERS:
            why = f"{MAX_SAMPLERS} flooded namespaces have one already"
        if why is not None:
            return None, f"SYN sampler off ({why})"
        try:
            sampler = open_sampler(w.name, c.thresholds.ipv4_prefix, c.thresholds.ipv6_prefix)
        except ProbeError as exc:
            if say and c.sampler is True:  # asked for: its failure is a warning of its own
                log.warning("SYN sampler: off: %s", exc.why)
            return None, f"SYN sampler off ({exc.why})"
        return sampler, (f"SYN sampler (a packet socket in "
                         f"{w.name or 'the host namespace'}, 1 in N adapting to the rate)")

    # -- kernel lines -------------------------------------------------------------------------

    def fitting(self, stored: StoredEvent) -> list[Watched]:
        """The namespaces with a listener a trusted kernel line fits (its port, and its address
        where it prints one): every one, when one namespace is watched."""
        if not self.many:
            return self.all()
        e = stored.event
        now = self.clock.monotonic()
        out = []
        for w in self.by_ident.values():
            if w.gone:
                continue
            if w.listeners is None or now - w.listeners[0] > LISTENERS_FRESH:
                try:
                    table = netns.visit(w.name, sockdiag.listeners)
                except ProbeError:
                    continue
                w.listeners = (now, frozenset((li.family, li.address, li.port) for li in table))
            if any(port == e.port and (e.address is None or address == e.address
                                       or address in ("0.0.0.0", "::"))  # noqa: S104 - names
                   for _, address, port in w.listeners[1]):
                out.append(w)
        return out

    # -- responses ----------------------------------------------------------------------------

    def responder(self, w: Watched) -> Responder:
        """The namespace's responder, made at its first incident: its actions act in it. A
        fleet's shared bans are our own namespace's alone."""
        if w.responder is None:
            c = self.config
            if self.many:
                c = replace(c, netns=w.name, netns_globs=(),
                            ban=c.ban if not w.name else replace(c.ban, scope="local"))
            w.responder = self.make_responder(c)
        return w.responder

    def responders(self) -> list[Responder]:
        return [w.responder for w in self.by_ident.values() if w.responder is not None]

    def describe(self) -> dict[str, Any]:
        """The watched namespaces as `synwatch status` shows them: how many, and the ones
        probed in full now (a quiet one is a count, not a line a second in the status file)."""
        now = self.clock.monotonic()
        live = [w for w in self.by_ident.values() if not w.gone]
        return {"watched": len(live), "probed": [
            {"name": w.name, "kind": w.found.kind,
             "owner": (f"{w.found.owner.runtime} {w.found.owner.container_id[:12]}"
                       if w.found.owner else None),
             "open_incidents": len(w.correlator.open)} for w in live if w.active(now)]}

    def summary(self) -> str:
        """What is watched, for the one-line summary: "lab1", "the host", "12 namespaces (2
        probed in full)"."""
        if not self.many:
            return self.config.netns or "the host"
        now = self.clock.monotonic()
        live = [w for w in self.by_ident.values() if not w.gone]
        probed = sum(1 for w in live if w.active(now))
        return (f"{len(live)} namespace{'s' if len(live) != 1 else ''} ({probed} probed in "
                "full)")

    def stop(self) -> None:
        for w in self.by_ident.values():
            if w.sampler is not None:
                w.sampler.stop()
            if w.accounting is not None:
                try:
                    w.accounting.teardown()
                except CommandError as exc:
                    log.warning("SYN accounting: could not remove its chain: %s", exc)
