"""The network namespaces the service watches, each with its own correlator, SYN sampler and
responder: one (``watch.netns`` a name, or our own), or every one that matches its globs,
followed as containers start and stop. A SYN-RECV dump walks every namespace's established
sockets (inet_diag_dump_icsk skips the other namespaces': ~1.3 ms here, empty or not), so a
quiet namespace is only swept every IDLE_SWEEP s (its Tcp InSegs, its TcpExt counters when a
segment came in, from /proc/PID/net: no entering); one whose counters moved, or that a kernel
line names, is probed in full every probe_interval with a SYN sampler of its own until quiet
for the quiet period. Our own namespace is probed as it always was."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from synwatch.actions.responder import Responder
from synwatch.clock import Clock
from synwatch.config import Config
from synwatch.daemon import bridging
from synwatch.daemon import watched as ns
from synwatch.daemon.watched import Watched
from synwatch.detect.correlate import Correlator
from synwatch.errors import CommandError
from synwatch.probes.synsample import SynSampler
from synwatch.records import IncidentChange, StoredEvent
from synwatch.store.api import ServiceStore
from synwatch.system import netns
from synwatch.system.bridgepath import BridgePath
from synwatch.system.netnsfind import FoundNamespace, find_namespaces, ident_text

log = logging.getLogger("synwatch")
IDLE_SWEEP = 10.0  # seconds between reads of every quiet namespace's counters
DISCOVER_EVERY = 10.0  # seconds between looks for namespaces that came or went (and at a
# kernel line no watched namespace fits: a container started since the last look)
RETIRE_AFTER = 60.0  # seconds a gone namespace's responder has to finish (notifications)


@dataclass
class WatchSet:
    config: Config
    clock: Clock
    make_responder: Callable[[Config, BridgePath | None], Responder]
    proc: Path = Path("/proc")
    netns_dir: Path = netns.NETNS_DIR
    by_ident: dict[netns.NsId, Watched] = field(default_factory=dict)
    _discover_due: float = 0.0
    _sweep_due: float = 0.0
    _probe_due: float = 0.0  # the earliest due full probe, as due() last worked it out
    retiring: list[tuple[float, Responder]] = field(default_factory=list)  # gone ones': until
    _seen: dict[netns.NsId, FoundNamespace] = field(default_factory=dict)  # watched or not
    _arrivals: list[FoundNamespace] = field(default_factory=list)  # found, not yet admitted

    @property
    def many(self) -> bool:
        return self.config.many_namespaces

    def all(self) -> list[Watched]:
        return list(self.by_ident.values())

    def named(self, name: str) -> Watched | None:
        """The live namespace of that name."""
        return next((w for w in self.by_ident.values() if w.name == name and not w.gone), None)

    def start(self) -> list[str]:
        """The first namespaces and their evidence; returns what to say of the sources of a
        flood."""
        c = self.config
        if not self.many:
            found = FoundNamespace((0, 0), c.netns, netns.NETNS_DIR / c.netns,
                                   "netns" if c.netns else "own")
            w = self._add(found, always=True)
            w.accounting, acct = ns.accounting_for(w.name, c)
            w.sampler, sampler = self._open_sampler(w, say=True)
            said = [sampler, acct]
        else:
            self.discover()
            ours = next((w for w in self.by_ident.values() if w.always), None)
            said = [f"SYN samplers opened where counters move (at most {ns.MAX_SAMPLERS} besides "
                    "our own namespace's)", "SYN accounting off (watching several namespaces)"]
            if ours is not None:  # probed as it always was, with its sampler from the start
                ours.sampler, said[0] = self._open_sampler(ours, say=True)
                said[0] += f"; in the others where counters move (at most {ns.MAX_SAMPLERS})"
        return said

    def resume(self, change: IncidentChange) -> tuple[Watched, int]:
        """An incident left open by the last run, carried on in its namespace's correlator;
        returns the namespace and its handle there. Its namespace gone meanwhile (or its name
        now another namespace's: a container replaced while synwatch was down), it closes at
        the first turn, and no action of it runs."""
        w = self.named(change.netns)
        was = change.state.get("netns_ident")
        if w is None or (w.correlator.ident and was and was != w.correlator.ident):
            w = Watched(FoundNamespace((-1, len(self.by_ident)), change.netns,
                                       Path("/nonexistent"), "netns"),
                        self._correlator(change.netns, None), always=False, gone=True)
            self.by_ident[w.found.ident] = w
        return w, w.correlator.resume(change)

    def drop_stale(self, store: ServiceStore) -> None:
        """Watching many: what is saved for a namespace no longer there (gone while synwatch
        was down) went with it; its name may be another container's by the time it is seen."""
        if self.many:
            bridging.drop_stale(store, list(self._seen.values()), self.clock.now(),
                                dry_run=self.config.dry_run)

    def _correlator(self, name: str, found: FoundNamespace | None) -> Correlator:
        c = self.config
        correlator = Correlator(c.host, name, c.thresholds, c.quiet_period, self.clock,
                                place=ns.place_of(found) if found else None)
        if found is not None and self.many and found.kind != "own":
            correlator.ident = ident_text(found.ident)  # ours is ours, whatever its inode
        return correlator

    def _add(self, found: FoundNamespace, *, always: bool) -> Watched:
        if found.kind in ("container", "process"):
            netns.bind(found.name, found.path, found.ident)
        w = Watched(found, self._correlator(found.name, found), always=always)
        self.by_ident[found.ident] = w
        return w

    def discover(self) -> None:
        """Look for namespaces that came or went. Those that went are marked (due() hands them
        to the service, which closes their incidents and forgets them); those that came are
        admitted once no gone one is left, so a container back under its old name is never
        reached by what was meant for the old one (a restore, a ban, its name's binding)."""
        self._discover_due = self.clock.monotonic() + DISCOVER_EVERY
        every = find_namespaces(self.proc, self.netns_dir, known=self._seen)
        self._seen = {f.ident: f for f in every}  # watched or not: named once each
        found = {f.ident: f for f in every if self.config.watches(f.name)}
        renamed = []
        for ident, w in self.by_ident.items():
            f = found.get(ident)
            if f is None:
                w.gone = True
            elif f != w.found and not self._refresh(w, f):
                w.gone = True  # another container under its inode, or a pod named at last:
                renamed.append(f)  # the old one let go first, then this one admitted
        self._arrivals = [f for ident, f in found.items() if ident not in self.by_ident]
        self._arrivals += renamed
        self._admit()

    def _admit(self) -> None:
        if not self._arrivals or any(w.gone for w in self.by_ident.values()):
            return
        for f in self._arrivals:
            w = self._add(f, always=f.kind == "own")
            if self.many and not w.always:  # its reference at once: a flood right after its
                w.stirring = w.stirring_now(self.proc)  # start shows at the next sweep
                w.segments, w.stirring_at = w.segments_now(self.proc), self.clock.now()
            log.info("watching namespace %s%s", f.name or "(our own)",
                     f" ({f.owner.runtime} {f.owner.container_id[:12]})" if f.owner else "")
        self._arrivals = []

    def _refresh(self, w: Watched, f: FoundNamespace) -> bool:
        """A namespace found again, entered another way (its first process ended): True.
        False when it is not the same one for people: another container's (an nsfs inode is
        reused: the lowest free one is taken) or a pod's named at last (pinned in /run/netns
        before its first process), unless it holds something under its old name."""
        other = (f.owner and w.found.owner and f.owner.container_id != w.found.owner.container_id)
        if other or (f.name != w.name and w.responder is None and not w.correlator.open):
            return False
        w.found = replace(f, name=w.name)
        if f.kind in ("container", "process"):
            netns.bind(w.name, f.path, f.ident)
        return True

    def forget(self, w: Watched, store: ServiceStore) -> None:
        """A namespace that went (its container stopped; its incidents closed already) took
        what synwatch held there with it: its sampler closes, its name no longer enters
        anything, and the history forgets the settings it would put back and ends its bans, or
        a container that comes back under the same name would get them. Its responder ends
        after RETIRE_AFTER (a close notification may be on its way)."""
        if w.sampler is not None:
            w.sampler.stop()
        if self.many and not self.name_live(w):  # (the one namespace named may come back)
            now = self.clock.now()
            for where, name, value in store.saved_settings():
                if where == w.name and (name != bridging.PATH_SETTING or bridging.drop_path(
                        w.name, value, self._seen.values(), dry_run=self.config.dry_run)):
                    store.forget_setting(where, name)  # (a table not removed: next start)
            store.mark_removed([b.id for b in store.active_bans(w.name, now)], now)
            if w.responder is not None:
                w.responder.retired = True
                self.retiring.append((self.clock.monotonic() + RETIRE_AFTER, w.responder))
        self.by_ident.pop(w.found.ident, None)
        if w.found.kind in ("container", "process"):
            netns.unbind(w.name, w.found.ident)
        log.info("namespace %s is gone", w.name)

    def look_soon(self) -> None:
        self._discover_due = 0.0

    def name_live(self, w: Watched) -> bool:
        """Is ``w``'s name another live namespace's (a stale incident's stand-in, ours)?"""
        return any(x is not w and not x.gone and x.name == w.name
                   for x in self.by_ident.values())

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
        self._admit()  # (after the service let go of the ones that went)
        if self.many and now >= self._discover_due:
            self.discover()
        if self.many and now >= self._sweep_due:
            self._sweep(now)
        active: list[Watched] = []
        quiet: list[Watched] = []
        for w in self.by_ident.values():
            if not w.gone:
                (active if w.active(now) else quiet).append(w)
        for w in quiet:  # quiet for the quiet period: counters alone again
            if w.sampler is not None:
                w.sampler.stop()
                w.sampler = None
            if w.was_active:  # the next sweep's reading is the new quiet spell's reference
                w.stirring, w.was_active = None, False
        for w in active:
            w.was_active = True
        ready = [w for w in active if now >= w.due]
        for w in ready:
            w.due = now + self.config.probe_interval
        # a namespace that went quiet meanwhile is not waited for (it is swept instead)
        self._probe_due = min((w.due for w in active), default=now + IDLE_SWEEP)
        if self._arrivals:
            self._probe_due = now  # admitted at the next turn, once the gone ones are let go
        return ready, [w for w in self.by_ident.values() if w.gone]

    def probe_now(self, w: Watched | None = None) -> None:
        for each in [w] if w is not None else self.by_ident.values():
            each.due = 0.0
        self._probe_due = 0.0

    def _sweep(self, now: float) -> None:
        """Quiet namespaces' counters (InSegs first, a third of the cost: no segment in, nothing
        moved); those that moved are probed from now on."""
        self._sweep_due = now + IDLE_SWEEP
        for w in self.by_ident.values():
            if w.gone or w.active(now):
                continue
            segments = w.segments_now(self.proc)
            if segments is not None and segments == w.segments and w.stirring is not None:
                w.stirring_at = self.clock.now()  # no segment came in: still what it was
                continue
            seen = w.stirring_now(self.proc)
            if seen is not None and w.stirring is not None and seen != w.stirring:
                self.activate(w, now)  # from the reading before, which the flood had not moved
                continue  # (the reading after it is taken once it is quiet again)
            w.stirring, w.stirring_at, w.segments = seen, self.clock.now(), segments

    def activate(self, w: Watched, now: float) -> None:
        if not w.probing(now):
            log.debug("namespace %s: counters moved; probing it every %.1f s", w.name,
                      self.config.probe_interval)
            self._rebase(w)
        w.active_until = now + self.config.quiet_period
        w.due = self._probe_due = 0.0
        if w.sampler is None and self.many and not w.gone:
            w.sampler, _ = self._open_sampler(w, say=False)

    def _rebase(self, w: Watched) -> None:
        baseline = w.baseline(self.proc, self.clock.now())
        if baseline is None:
            w.correlator.rebase_none()
        else:
            w.correlator.rebase(baseline)
        w.stirring = None  # taken again by the sweep once it is quiet again

    def settle(self, w: Watched, moving: bool) -> None:
        """After a probe: a namespace still moving stays active (due() closes the sampler of
        one quiet for the quiet period with nothing open)."""
        if moving:
            w.active_until = self.clock.monotonic() + self.config.quiet_period

    def _open_sampler(self, w: Watched, *, say: bool) -> tuple[SynSampler | None, str]:
        crowded = self.many and not w.always and sum(
            1 for x in self.by_ident.values() if x.sampler is not None and not x.always
        ) >= ns.MAX_SAMPLERS
        return w.open_sampler(self.config, say=say, crowded=crowded)

    def fitting(self, stored: StoredEvent, *, fresh: bool = False) -> list[Watched]:
        """The namespaces with a listener a trusted kernel line fits (its port, and its address
        where it prints one): every one, when one namespace is watched. ``fresh``: their
        listener tables read again (a listener may be newer than the last read)."""
        now = self.clock.monotonic()
        return [w for w in self.by_ident.values() if not w.gone and (
            not self.many or w.listens_for(stored.event, now, fresh=fresh))]

    def on_event(self, stored: StoredEvent) -> list[tuple[Watched, list[IncidentChange]]]:
        """A kernel line to the namespaces it may be about: a trusted SYN-flood line to each
        with a listener it fits (each holds it until its own state bears it out, and the first
        that does takes it: the service has the others forget it), any other line to every
        namespace. A line printed before the quiet period is an earlier run's: no namespace
        looks for it."""
        e = stored.event
        now = self.clock.now()
        if not (e.kind == "syn_flood" and e.trusted and not stored.historical
                and now - (e.time or now) <= timedelta(seconds=self.config.quiet_period)):
            return [(w, w.correlator.on_event(stored)) for w in self.all()]
        fitting = self.fitting(stored)
        if not fitting and self.many:  # a container started since the last look?
            log.info("kernel event %d: port %s: looking for namespaces new since the last "
                     "look", stored.id, e.port)
            self.discover()
            fitting = self.fitting(stored, fresh=True)
        if not fitting:
            log.info("kernel event %d: nothing listens on port %s in a watched namespace; "
                     "no incident", stored.id, e.port)
        changes: list[tuple[Watched, list[IncidentChange]]] = []
        for w in fitting:
            also = tuple(x.name or "(our own)" for x in fitting if x is not w)
            made = w.correlator.on_event(stored, also)
            changes.append((w, made))
            if any(stored.id in c.event_ids for c in made):
                break  # taken (its listener's incident is open there): no other holds it
            if w.correlator.held:  # a line the last probe cannot bear out: look now
                self.activate(w, self.clock.monotonic())
        return changes

    def responder(self, w: Watched, resumed: list[IncidentChange] | None = None) -> Responder:
        """The namespace's responder, made at the start (ours, and where incidents were left
        open: ``resumed``, handed to it before its setup runs) or at its first incident: its
        actions act in it. A fleet's shared bans are our own namespace's alone."""
        if w.responder is None:
            path = bridging.bridge_path(w, self.config, self._seen.values())
            w.responder = r = self.make_responder(self.config_for(w), path)
            if path is not None:
                bridging.keep_path(r.ctx.store, w, path, self._seen.values(), self.clock.now(),
                                   dry_run=self.config.dry_run)
            if self.many and w.name and resumed is None:
                # a value saved for this name with no incident carried on is another
                # namespace's of that name, or was left by a crash: never put into this one
                for where, name, _ in r.ctx.store.saved_settings():
                    if where == w.name and name.startswith("net."):
                        r.ctx.store.forget_setting(where, name)
            r.resume(resumed or [])
            r.start()
        return w.responder

    def config_for(self, w: Watched) -> Config:
        """The configuration a namespace's actions run with: in it, and a fleet's shared bans
        our own namespace's alone (another node has no such container)."""
        c = self.config
        if not self.many:
            return c
        return replace(c, netns=w.name, netns_globs=(),
                       ban=c.ban if not w.name else replace(c.ban, scope="local"))

    def reload(self, config: Config) -> None:
        """New settings (a SIGHUP) for every namespace's correlator and actions; which
        namespaces are watched stays as it was until a restart."""
        self.config = replace(config, netns=self.config.netns,
                              netns_globs=self.config.netns_globs)
        for w in self.by_ident.values():
            w.correlator.reconfigure(config.thresholds, config.quiet_period)
            if w.responder is not None:
                w.responder.reload(self.config_for(w))

    def responders(self) -> list[Responder]:
        return [*(w.responder for w in self.by_ident.values() if w.responder is not None),
                *(r for _, r in self.retiring)]

    def retire(self) -> None:
        """Stop the responders of namespaces gone RETIRE_AFTER ago."""
        while self.retiring and self.retiring[0][0] <= self.clock.monotonic():
            self.retiring.pop(0)[1].stop(wait=1.0)

    def describe(self) -> dict[str, Any]:
        """The watched namespaces as `synwatch status` shows them."""
        return ns.describe([w for w in self.by_ident.values() if not w.gone],
                           self.clock.monotonic())

    def summary(self) -> str:
        """What is watched, for the one-line summary: "lab1", "the host", "12 namespaces (2
        probed in full)"."""
        return ns.summary(self.describe()) if self.many else self.config.netns or "the host"

    def stop(self) -> None:
        for w in self.by_ident.values():
            if w.sampler is not None:
                w.sampler.stop()
            if w.accounting is not None:
                try:
                    w.accounting.teardown()
                except CommandError as exc:
                    log.warning("SYN accounting: could not remove its chain: %s", exc)
