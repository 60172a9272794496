"""`synwatch run`: wires the steps together, supervises them, reloads, stops cleanly.

Signals only set flags; the main loop does the work, so nothing runs inside a signal handler.
"""

from __future__ import annotations

import logging
import math
import queue
import signal
import threading
from dataclasses import dataclass, field, replace
from types import FrameType

from synwatch.actions.registry import resolve_policy
from synwatch.actions.responder import Responder
from synwatch.clock import Clock, SystemClock
from synwatch.config import Config, load_config, state_dir
from synwatch.daemon.housekeeping import Housekeeping
from synwatch.daemon.recorder import Recorder
from synwatch.daemon.telemetry import Telemetry
from synwatch.daemon.watchdog import Watchdog
from synwatch.daemon.watched import Watched
from synwatch.daemon.watchset import WatchSet
from synwatch.detect.replay import Recording, event_line, evidence_line, probe_failed_line
from synwatch.errors import ConfigError, ProbeError
from synwatch.lines.catalogue import load_catalogue
from synwatch.records import IncidentChange, endpoint
from synwatch.sources import build_sources, plan_sources
from synwatch.sources.base import Batch
from synwatch.sources.supervisor import Supervisor
from synwatch.store.spool import Spool, SpoolFull
from synwatch.store.spooled import SpooledStore, open_spooled
from synwatch.system import netns, sdnotify
from synwatch.system.bridgepath import BridgePath

log = logging.getLogger("synwatch")
STORE_WAIT = 0.2  # seconds a write waits for a locked history before it is spooled
BATCH_RETRY = 1.0  # seconds between offers of a batch a full spool could not take
STATUS_EVERY = 1.0  # seconds between writes of the status file (and STATUS= updates)


def _shown(incident_id: int) -> str:
    """A provisional id (negative: numbered by the database when it answers) says so."""
    return str(incident_id) if incident_id > 0 else f"{incident_id} (provisional)"


@dataclass
class _Flags:
    wake: threading.Event = field(default_factory=threading.Event)
    stop: bool = False
    reload: bool = False


class Service:
    def __init__(self, config: Config, config_arg: str | None, record: str | None = None,
                 clock: Clock | None = None) -> None:
        self.config = config
        self.config_arg = config_arg
        self.clock: Clock = clock or SystemClock()
        self.recording = (Recording(record, config.thresholds, config.quiet_period)
                          if record else None)
        self.flags = _Flags()
        self.store: SpooledStore | None = None  # the history, behind its spool
        self.housekeeping: Housekeeping | None = None
        self.supervisor: Supervisor | None = None
        self.recorder: Recorder | None = None
        self.watch = WatchSet(config, self.clock, self._responder)
        # a batch neither the history nor its full spool could take: kept (its source does
        # not move on meanwhile) and offered again first, every BATCH_RETRY seconds
        self._pending: Batch | None = None
        self._pending_retry_at = 0.0
        # (namespace, correlator serial) -> incident id; a namespace by its identity, not its
        # name (a container back under its name is another namespace)
        self._ids: dict[tuple[tuple[int, int], int], int] = {}
        self.watchdog = Watchdog(self.clock, config.probe_interval)
        self.telemetry = Telemetry(config)
        self._status_due = 0.0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.flags.reload = True
        else:
            self.flags.stop = True
        self.flags.wake.set()

    def _start(self) -> None:
        resolve_policy(self.config)  # a plugin that is not installed stops the start (exit 2)
        self.store = self._open_store()
        # past the migration, a write waits only briefly for another writer's lock: what the
        # history refuses for now is spooled, and probes and correlation go on meanwhile
        self.store.set_busy_timeout(STORE_WAIT)
        self.housekeeping = Housekeeping(self.store, self.config.storage, self.clock)
        plans, skipped = plan_sources(self.config)
        for plan in plans:
            log.info("source %s: %s", plan.name, plan.reason)
        for why in skipped:
            log.info("source %s", why)
        if not plans:
            log.warning("no log source to read; kernel state is still probed")
        if self.config.dry_run:
            log.info("actions: dry run (rendered and logged, nothing changed; "
                     "[actions] dry_run = false acts)")
        else:
            log.warning("actions: LIVE: synwatch changes sysctls and firewall rules in %s "
                        "([actions] dry_run = false in %s)",
                        "every watched namespace" if self.config.many_namespaces else
                        self.config.netns or "this host's namespace", self.config.path)
        catalogue = load_catalogue()
        sources = build_sources(plans, catalogue, self.store.get_position)
        self.recorder = Recorder(self.store, catalogue, self.clock)
        said = self.watch.start()
        # where the flood's sources come from, said once
        used = [x for x in said if " off" not in x]
        off = [x for x in said if " off" in x]
        log.info("sources of a flood: %s%s", ", ".join([*used, "SYN-RECV sockets"]),
                 f"; {'; '.join(off)}" if off else "")
        c = self.config
        resumed = self.store.open_incidents(c.host, None if c.many_namespaces else c.netns)
        carried: dict[tuple[int, int], list[IncidentChange]] = {}
        for left_open in resumed:
            assert left_open.incident_id is not None
            w, serial = self.watch.resume(left_open)
            self._ids[(w.found.ident, serial)] = left_open.incident_id
            carried.setdefault(w.found.ident, []).append(left_open)
            log.info("incident %s on %s: still open from before the restart",
                     left_open.incident_id, left_open.port or "an unknown listener")
        for w in self.watch.all():  # ours, and every namespace with an incident left open
            if (w.always or w.correlator.open) and not w.gone:
                self.watch.responder(w, carried.get(w.found.ident, []))
        self.watch.drop_stale(self.store)
        self.supervisor = Supervisor(sources)
        self.supervisor.start()
        self.telemetry.start(sources)

    def _responder(self, config: Config, path: BridgePath | None = None) -> Responder:
        """A namespace's responder (the watch set resumes and starts it)."""
        responder = Responder(config, self._history(), self.clock,
                              on_record=self.telemetry.action, wake=self._wake,
                              on_drift=self.telemetry.drift,
                              on_fleet_refused=self.telemetry.fleet_refused, bridge_path=path)
        log.info("actions%s: %s", f" in {config.netns}" if self.config.many_namespaces
                 and config.netns else "",
                 ", ".join(responder.names()) or "none")
        return responder

    def _history(self) -> SpooledStore:
        assert self.store is not None
        return self.store

    def _wake(self) -> None:
        """An action has work to do now (from its own thread): end the wait for batches."""
        if self.supervisor is not None:
            self.supervisor.wake()

    def _open_store(self) -> SpooledStore:
        c = self.config
        return open_spooled(c.storage_url, c.host,
                            Spool(state_dir(c) / "spool.jsonl", c.storage.spool_max))

    # -- incidents ------------------------------------------------------------------------------

    def _save(self, changes: list[IncidentChange], w: Watched) -> None:
        """Record namespace ``w``'s incident changes in order (the spool keeps what the
        history cannot take now) and hand them to telemetry and its actions (not to those of a
        namespace gone before they ever ran: they would act by its name, which may be another
        namespace's by then). Their times are the evidence's."""
        assert self.store is not None
        for made in changes:
            key = (w.found.ident, made.serial)
            change = replace(made, incident_id=self._ids[key]) if key in self._ids else made
            incident_id = self.store.save_incident(change)
            # one id for the incident's lifetime: a spooled (provisional) one stays what the
            # actions know it by after the history numbered it (the store maps it on every
            # write), or the close would not find what opened (SYN cookies left on)
            incident_id = self._ids.setdefault(key, incident_id)
            self.telemetry.incident(replace(change, incident_id=incident_id))
            if not w.gone or w.responder is not None:
                self.watch.responder(w).on_change(replace(change, incident_id=incident_id))
            if change.event_ids:  # a line one namespace took is no other's to hold
                for other in self.watch.all():
                    if other is not w:
                        for event_id in change.event_ids:
                            other.correlator.forget(event_id)
            if change.change != "updated":
                log.info("incident %s %s: %s %s, verdict %s", _shown(incident_id),
                         change.change,
                         change.netns or "host", endpoint(change.address, change.port),
                         change.verdict)
            if change.change == "opened":
                self.watch.probe_now(w)  # fresh evidence for what just opened
            if change.change == "closed":
                self._ids.pop(key, None)

    def _probe(self, w: Watched) -> None:
        c = self.config
        started = self.clock.monotonic()
        try:
            evidence = w.evidence(c, self.clock, visiting=c.many_namespaces)
        except ProbeError as exc:
            if str(exc) != w.failure:
                log.warning("probe: %s; retrying every %.0f s", exc, c.probe_interval)
                w.failure = str(exc)
            # watching many, whether it went is the next look's to say (the process it was
            # entered by may have ended while others keep it): a look at once
            gone = not c.many_namespaces and not netns.exists(w.name)
            now = self.clock.now()
            if c.many_namespaces:
                self.watch.look_soon()
            if self.recording is not None:  # what follows changes incidents: a replay does it too
                self.recording.write(probe_failed_line(now, gone))
            changes, dropped = w.correlator.on_probe_failed(now, gone=gone)
            if dropped:
                log.warning("netns %s does not exist: %d kernel lines open no incident",
                            w.name, dropped)
            self._save(changes, w)
            self.watchdog.probed()
            return
        if w.failure is not None:
            log.info("probe: reading kernel state again")
            w.failure = None
        self.telemetry.probe(evidence.snapshot, self.clock.monotonic() - started)
        if self.recording is not None:
            self.recording.write(evidence_line(evidence.at, evidence))
        self._save(w.correlator.on_evidence(evidence), w)
        self.watch.settle(w, w.correlator.moving)
        self.watchdog.probed()

    def _probe_due(self) -> None:
        """Probe the namespaces that are due; close the incidents of those that went."""
        ready, went = self.watch.due()
        for w in went:
            self._save(w.correlator.close_all(self.clock.now()), w)
            assert self.store is not None
            if not self.watch.name_live(w):
                self.telemetry.forget(w.name)
            self.watch.forget(w, self.store)
        for w in ready:
            if self.flags.stop:
                return
            self._probe(w)
        if not ready:  # quiet namespaces swept (or none due): the loop is alive all the same
            self.watchdog.probed()

    def _record(self, batch: Batch) -> bool:
        """Record one batch; one that neither the history nor its full spool can take is kept
        and offered again first (its position is not stored either, so even a stop meanwhile
        loses nothing: the source reads it again)."""
        assert self.recorder is not None
        try:
            stored = self.recorder.record(batch)
        except SpoolFull as exc:
            if self._pending is None:  # once, not at every offer
                log.error("store: %s", exc)  # noqa: TRY400
            self._pending = batch
            self._pending_retry_at = self.clock.monotonic() + BATCH_RETRY
            return False
        if self._pending is not None:
            log.info("store: the spool takes kernel lines again")
        self._pending = None
        self.telemetry.batch(batch, stored, self.clock.now())
        for event in stored:
            if self.recording is not None:
                self.recording.write(event_line(self.clock.now(), event))
            for w, changes in self.watch.on_event(event):
                self._save(changes, w)
        return True

    def _drain(self, timeout: float) -> None:
        """Record what the sources produce for up to ``timeout`` seconds, or until a probe is
        due."""
        if self.supervisor is None:
            return
        deadline = self.clock.monotonic() + timeout
        while not self.flags.stop and self.clock.monotonic() < min(deadline,
                                                                   self.watch.next_due()):
            batch = self._pending
            if batch is not None and self.clock.monotonic() < self._pending_retry_at:
                # refused: later batches wait behind it (the sources' positions are not
                # stored meanwhile, so nothing is lost), and probes go on
                self.flags.wake.wait(max(0.0, min(deadline, self.watch.next_due(),
                                                  self._pending_retry_at)
                                         - self.clock.monotonic()))
                self.flags.wake.clear()  # a signal's wake-up, seen: the next wait waits
                continue
            if batch is None:
                try:
                    # wake for the probe too: a probe interval under a second was a second
                    batch = self.supervisor.batches.get(
                        timeout=max(0.0, min(deadline, self.watch.next_due())
                                    - self.clock.monotonic()))
                except queue.Empty:
                    return
                if batch is None:
                    return  # woken: an action has work (a fleet ban to copy)
            self._record(batch)

    def _drain_queued(self) -> None:
        """At stop: record what the sources emitted before they stopped."""
        assert self.supervisor is not None
        while True:
            batch = self._pending
            if batch is None:
                try:
                    batch = self.supervisor.batches.get_nowait()
                except queue.Empty:
                    return
                if batch is None:
                    continue
            if not self._record(batch):
                return

    def _reload(self) -> None:
        sdnotify.reloading()
        try:
            new = load_config(self.config_arg)
        except ConfigError as exc:
            # the reason is the one-line config error; a traceback would hide it
            log.error("reload refused, keeping the running configuration: %s", exc)  # noqa: TRY400
        else:
            if new.storage_url != self.config.storage_url:
                log.warning("storage.url changed; it takes effect at the next restart")
            if new.netns != self.config.netns or new.netns_globs != self.config.netns_globs:
                log.warning("watch.netns changed; it takes effect at the next restart")
            if self.housekeeping is not None:
                self.housekeeping.storage = new.storage
            self.watch.reload(new)
            self.config = self.watch.config
            self.watchdog.probe_interval = new.probe_interval
            log.info("configuration reloaded from %s", new.path)
        sdnotify.notify("READY=1", "STATUS=watching")

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self._start()
        sdnotify.notify("READY=1", "STATUS=watching")
        log.info("synwatch running (config: %s)", self.config.path)
        ping = sdnotify.watchdog_interval()
        while not self.flags.stop:
            # a turn at least once a second, and when an action's own work is due (a fleet
            # node's look at the fleet's changes, at a time of its own around the second)
            due = min((r.next_due() for r in self.watch.responders()), default=math.inf)
            self._drain(timeout=max(0.0, min(ping or 1.0, 1.0, due - self.clock.monotonic())))
            if self.clock.monotonic() >= self.watch.next_due() and not self.flags.stop:
                self._probe_due()
            for responder in self.watch.responders():
                responder.tick()
            self.watch.retire()
            assert self.store is not None
            assert self.housekeeping is not None
            self.housekeeping.step()
            if self.clock.monotonic() >= self._status_due:  # once a second, not every probe
                self._status_due = self.clock.monotonic() + STATUS_EVERY
                self.store.check()
                self.telemetry.watching = self.watch.summary()
                self.telemetry.status.namespaces = self.watch.describe()
                self.telemetry.ban_namespaces = [w.name for w in self.watch.all()
                                                 if w.responder is not None]
                self.telemetry.count_bans(self.store)
                self.telemetry.tell(self.supervisor, self.housekeeping.summary())
            self.watchdog.tick(ping)
            if self.flags.reload and not self.flags.stop:
                self.flags.reload = False
                self._reload()
        sdnotify.notify("STOPPING=1", "STATUS=stopping")
        log.info("synwatch stopping")
        self.telemetry.stop_serving()
        if self.supervisor is not None:
            self.supervisor.stop()
            self._drain_queued()
        for w in self.watch.all():
            if w.correlator.open and not w.gone:
                # one last look, so an open incident is saved with everything seen until now
                # (the sampler's current interval, the counters): a restart goes on from there
                self._probe(w)
        for responder in self.watch.responders():
            responder.stop()
        self.watch.stop()
        if self.store is not None:
            self.store.close()
        if self.recording is not None:
            self.recording.close()
        self.telemetry.status.write("stopped")
        return 0
