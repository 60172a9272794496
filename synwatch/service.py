"""`synwatch run`: wires the steps together, supervises them, reloads, stops cleanly.

Signals only set flags; the main loop does the work, so nothing runs inside a signal handler.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from types import FrameType

from synwatch import __version__, netns, sdnotify
from synwatch.actions.registry import resolve_policy
from synwatch.catalogue import load_catalogue
from synwatch.clock import Clock, SystemClock
from synwatch.config import Config, load_config, sqlite_file, state_dir
from synwatch.correlate import Correlator
from synwatch.errors import CommandError, ConfigError, ProbeError, StoreError
from synwatch.probes.accounting import CHAIN, TABLE, SynAccounting
from synwatch.probes.snapshot import take
from synwatch.probes.synsample import SynSampler, open_sampler
from synwatch.recorder import Recorder
from synwatch.records import Evidence, IncidentChange, endpoint
from synwatch.replay import Recording, event_line, evidence_line, probe_failed_line
from synwatch.respond import Responder
from synwatch.runner import available
from synwatch.sources import build_sources, plan_sources
from synwatch.sources.base import Batch
from synwatch.store import PRUNE_BATCH, History, prepare
from synwatch.store.api import ServiceStore
from synwatch.store.spool import Spool, SpooledStore, unreachable
from synwatch.supervisor import Supervisor
from synwatch.telemetry import Telemetry

log = logging.getLogger("synwatch")
STORE_WAIT = 0.2  # seconds a write waits for a locked store before it is kept for later
STORE_RETRY = 1.0  # seconds between tries while the store refuses writes
STATUS_EVERY = 1.0  # seconds between writes of the status file (and STATUS= updates)
HEARTBEAT_EVERY = 10.0  # seconds between this node's heartbeats in the history (status, fleets)
PRUNE_EVERY = 3600.0  # seconds between retention passes (storage.retention); the first is soon
PRUNE_FIRST = 60.0


def _shown(incident_id: int) -> str:
    """A provisional id (negative: numbered by the database when it answers) says so."""
    return str(incident_id) if incident_id > 0 else f"{incident_id} (provisional)"


@dataclass
class _Flags:
    wake: threading.Event = field(default_factory=threading.Event)
    stop: bool = False
    reload: bool = False


class Service:
    def __init__(self, config: Config, config_arg: str | None,
                 record: str | None = None) -> None:
        self.config = config
        self.config_arg = config_arg
        self.recording = (Recording(record, config.thresholds, config.quiet_period)
                          if record else None)
        self.flags = _Flags()
        self.store: ServiceStore | None = None
        self.spooled: SpooledStore | None = None  # the store, when it is a database server's
        self.supervisor: Supervisor | None = None
        self.recorder: Recorder | None = None
        self.correlator: Correlator | None = None
        self.clock: Clock = SystemClock()
        self._pending: Batch | None = None  # a batch the store refused, retried first
        self._unsaved: list[IncidentChange] = []  # incident changes the store refused
        self._ids: dict[int, int] = {}  # correlator serial -> incident id
        self._probe_due = 0.0
        self._probe_failure: str | None = None
        self._probed_at = time.monotonic()  # when the last probe step ran to its end
        self._watchdog_held = False  # WATCHDOG=1 withheld: the loop is not probing
        self._store_retry_at = 0.0  # while the store refuses writes: when to try again
        self._store_problem: str | None = None
        self.accounting: SynAccounting | None = None
        self.sampler: SynSampler | None = None
        self.responder: Responder | None = None
        self.telemetry = Telemetry(config)
        self._status_due = 0.0
        self._heartbeat_due = 0.0
        self._started_at = self.clock.now()
        self._prune_due = time.monotonic() + PRUNE_FIRST
        self._pruning: list[str] = []  # what the running retention pass has left to prune
        self._catch_up_due = 0.0
        self._pruned = 0  # rows the running retention step has pruned so far
        self._housekeeping_problem: str | None = None

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
        # store refuses is kept and retried, and probes and correlation go on meanwhile
        self.store.set_busy_timeout(STORE_WAIT)
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
                        "([actions] dry_run = false in %s)", self.config.netns or
                        "this host's namespace", self.config.path)
        catalogue = load_catalogue()
        sources = build_sources(plans, catalogue, self.store.get_position)
        self.recorder = Recorder(self.store, catalogue, self.clock)
        resumed = self.store.open_incidents(self.config.host, self.config.netns)
        self.correlator = self._correlator(resumed)
        self.accounting, accounting = self._accounting()
        self.sampler, sampler = self._sampler()
        # where the flood's sources come from, said once
        used = [x for x in (sampler, accounting) if " off" not in x]
        off = [x for x in (sampler, accounting) if " off" in x]
        log.info("sources of a flood: %s%s", ", ".join([*used, "SYN-RECV sockets"]),
                 f"; {'; '.join(off)}" if off else "")
        self.responder = Responder(self.config, self.store, self.clock,
                                   on_record=self.telemetry.action, wake=self._wake,
                                   on_drift=self.telemetry.drift,
                                   on_fleet_refused=self.telemetry.fleet_refused)
        log.info("actions: %s", ", ".join(self.responder.names()) or "none")
        self.responder.resume(resumed)
        self.responder.start()
        self.supervisor = Supervisor(sources)
        self.supervisor.start()
        self.telemetry.start(sources)

    def _store_summary(self) -> str | None:
        """What the status line says of the store when it is not simply written to."""
        spooled = self.spooled
        if spooled is not None and spooled.spooling:
            kept = f"{spooled.spool.records} records spooled"
            if spooled.spool.problem is not None:
                kept += f" in memory (the spool cannot be written: {spooled.spool.problem})"
            if spooled.away:
                return f"history away ({spooled.problem or 'not answering'}): acting, " \
                       f"not recording; {kept}"
            return f"catching up, {kept}"
        return None if self._store_problem is None else "store refusing writes"

    def _wake(self) -> None:
        """An action has work to do now (from its own thread): end the wait for batches."""
        if self.supervisor is not None:
            self.supervisor.wake()

    def _open_store(self) -> ServiceStore:
        """The history, behind the spool (synwatch/store/spool.py): whatever happens to it (a
        database server that does not answer; an SQLite file locked, full, read-only, deleted
        or corrupt), detection and actions go on and it is written when it can be. A history
        that cannot be opened does not stop the start."""
        c = self.config
        url, host = c.storage_url, c.host
        spool = Spool(state_dir(c) / "spool.jsonl", c.storage.spool_max)
        try:
            # bounded: a server that does not answer fails within seconds, as one that refuses
            history = History.open(url, host=host, bounded=True)
        except StoreError as exc:
            if not unreachable(exc):
                raise
            log.error("store: %s; starting on the spool %s (%d records waiting): "  # noqa: TRY400
                      "acting, not recording until it can be written", exc, spool.path,
                      spool.records)
            if sqlite_file(url) is not None:  # not even a file: made when the disk takes it
                self.spooled = SpooledStore(
                    None, spool, migrated=False, url=url, host=host,
                    opener=lambda: History.open(url, host=host, bounded=True),
                    prepare=lambda: prepare(url, host))
            else:  # a server: tried every few seconds, migrated when it answers
                self.spooled = SpooledStore(History.open(url, host=host, migrate=False,
                                                         bounded=True), spool, migrated=False)
            self.spooled.problem = exc.why
            return self.spooled
        log.info("store: %s (schema %s%s)", history.display_url, history.schema_revision(),
                 "" if sqlite_file(url) is not None else f", node {host}")
        return self._spooled(SpooledStore(history, spool, migrated=True))

    def _spooled(self, spooled: SpooledStore) -> SpooledStore:
        if spooled.spool.ops:
            log.info("store: %d records spooled before the restart are written first",
                     spooled.spool.records)
        self.spooled = spooled
        return spooled

    def _correlator(self, resumed: list[IncidentChange]) -> Correlator:
        c = self.config
        correlator = Correlator(c.host, c.netns, c.thresholds, c.quiet_period, self.clock)
        for left_open in resumed:
            assert left_open.incident_id is not None
            self._ids[correlator.resume(left_open)] = left_open.incident_id
            log.info("incident %s on %s: still open from before the restart",
                     left_open.incident_id, left_open.port or "an unknown listener")
        return correlator

    def _accounting(self) -> tuple[SynAccounting | None, str]:
        """The accounting set, or None; what to say of it in the start's evidence line."""
        c = self.config
        if c.accounting is False:
            return None, "SYN accounting off (incident.accounting = false)"
        if c.accounting == "auto":
            why = ("actions are a dry run" if c.dry_run else "not root" if os.geteuid() != 0
                   else "nft is not installed" if not available("nft") else None)
            if why:
                return None, f"SYN accounting off ({why})"
        acct = SynAccounting(c.netns, c.thresholds.ipv4_prefix, c.thresholds.ipv6_prefix)
        try:
            acct.setup()
        except CommandError as exc:
            log.warning("SYN accounting: off: %s", exc)
            return None, "SYN accounting off (it could not be set up)"
        return acct, f"SYN accounting (nftables table inet {TABLE}, chain {CHAIN})"

    def _sampler(self) -> tuple[SynSampler | None, str]:
        """The SYN sampler, or None; what to say of it in the start's evidence line."""
        c = self.config
        if c.sampler is False:
            return None, "SYN sampler off (incident.sampler = false)"
        try:
            sampler = open_sampler(c.netns, c.thresholds.ipv4_prefix, c.thresholds.ipv6_prefix)
        except ProbeError as exc:
            if c.sampler is True:  # asked for: its failure is a warning of its own
                log.warning("SYN sampler: off: %s", exc.why)
            return None, f"SYN sampler off ({exc.why})"
        return sampler, (f"SYN sampler (a packet socket in "
                         f"{c.netns or 'the host namespace'}, 1 in N adapting to the rate)")

    # -- incidents ------------------------------------------------------------------------------

    def _store_refused(self, exc: StoreError, kept: str) -> None:
        """Log an outage once (not every retry) and wait STORE_RETRY before the next write."""
        log.debug("store: %s", exc)
        self._store_retry_at = time.monotonic() + STORE_RETRY
        if self._store_problem is None:  # one line an outage; its errors vary in wording
            self._store_problem = str(exc)
            log.error("store: %s; %s kept, retrying every %.0f s; detection goes on",
                      exc, kept, STORE_RETRY)

    def _store_ok(self) -> None:
        if self._store_problem is not None:
            self._store_problem = None
            log.info("store: writable again")

    def _save(self, changes: list[IncidentChange]) -> None:
        """Store incident changes in order; what the store refuses is kept and retried first.
        Their times are the evidence's, whenever the write succeeds."""
        assert self.store is not None
        self._unsaved.extend(changes)
        while self._unsaved and time.monotonic() >= self._store_retry_at:
            change = self._unsaved[0]
            if change.serial in self._ids:
                change = replace(change, incident_id=self._ids[change.serial])
            try:
                incident_id = self.store.save_incident(change)
            except StoreError as exc:
                self._store_refused(exc, f"{len(self._unsaved)} incident changes")
                return
            self._store_ok()
            self._unsaved.pop(0)
            # one id for the incident's lifetime: a spooled (provisional) one stays what the
            # actions know it by after the history numbered it (the store maps it on every
            # write), or the close would not find what opened (SYN cookies left on)
            incident_id = self._ids.setdefault(change.serial, incident_id)
            self.telemetry.incident(replace(change, incident_id=incident_id))
            if self.responder is not None:
                self.responder.on_change(replace(change, incident_id=incident_id))
            if change.change != "updated":
                log.info("incident %s %s: %s %s, verdict %s", _shown(incident_id),
                         change.change,
                         change.netns or "host", endpoint(change.address, change.port),
                         change.verdict)
            if change.change == "opened":
                self._probe_due = 0.0  # fresh evidence for what just opened
            if change.change == "closed":
                self._ids.pop(change.serial, None)

    def _probe(self) -> None:
        assert self.correlator is not None
        c = self.config
        started = time.monotonic()
        try:
            snap = take(c.netns, v4_len=c.thresholds.ipv4_prefix,
                        v6_len=c.thresholds.ipv6_prefix,
                        peers_for=self.correlator.ports_to_watch())
        except ProbeError as exc:
            if str(exc) != self._probe_failure:
                log.warning("probe: %s; retrying every %.0f s", exc, c.probe_interval)
                self._probe_failure = str(exc)
            gone, now = not netns.exists(c.netns), self.clock.now()
            if self.recording is not None:  # what follows changes incidents: a replay does it too
                self.recording.write(probe_failed_line(now, gone))
            changes, dropped = self.correlator.on_probe_failed(now, gone=gone)
            if dropped:
                log.warning("netns %s does not exist: %d kernel lines open no incident",
                            c.netns, dropped)
            self._save(changes)
            self._probed_at = time.monotonic()
            return
        if self._probe_failure is not None:
            log.info("probe: reading kernel state again")
            self._probe_failure = None
        counted = None
        if self.accounting is not None:
            try:
                counted = self.accounting.read()
            except ProbeError as exc:
                log.warning("%s", exc)
        sampled = self.sampler.read() if self.sampler is not None else None
        evidence = Evidence(self.clock.now(), snap, counted, sampled)
        self.telemetry.probe(snap, time.monotonic() - started)
        if self.recording is not None:
            self.recording.write(evidence_line(evidence.at, evidence))
        self._save(self.correlator.on_evidence(evidence))
        self._probed_at = time.monotonic()

    def _watchdog(self, ping: float | None, next_ping: float) -> float:
        """WATCHDOG=1 when a ping is due and the loop is healthy; the next ping's time."""
        if ping and time.monotonic() >= next_ping and self._healthy(ping):
            sdnotify.notify("WATCHDOG=1")
            return time.monotonic() + ping
        return next_ping

    def _healthy(self, ping: float) -> bool:
        """May systemd's watchdog be told the service is alive? Only while the loop keeps
        probing: the last probe step (a probe, or one that found the namespace missing) ended
        within a probe interval and one watchdog ping interval. A loop that still turns but no
        longer probes (blind to floods) goes unfed, and systemd restarts it."""
        late = time.monotonic() - self._probed_at - self.config.probe_interval
        if late <= ping:
            if self._watchdog_held:
                self._watchdog_held = False
                log.info("watchdog: probing again; systemd's watchdog is fed again")
            return True
        if not self._watchdog_held:
            self._watchdog_held = True
            log.error("watchdog: no probe for %.1f s; systemd's watchdog is no longer fed",
                      late + self.config.probe_interval)
        return False

    def _record(self, batch: Batch) -> bool:
        """Store one batch; on a store failure keep it to retry first (its position is not
        stored either, so even a stop meanwhile loses nothing: the source reads it again)."""
        assert self.recorder is not None
        assert self.correlator is not None
        try:
            stored = self.recorder.record(batch)
        except StoreError as exc:
            self._pending = batch
            self._store_refused(exc, f"a batch of {len(batch.records)} log records")
            return False
        self._store_ok()
        self._pending = None
        self.telemetry.batch(batch, stored, self.clock.now())
        for event in stored:
            if self.recording is not None:
                self.recording.write(event_line(self.clock.now(), event))
            self._save(self.correlator.on_event(event))
        if self.correlator.held:
            self._probe_due = 0.0  # a line for a port the last probe did not see: look now
        return True

    def _drain(self, timeout: float) -> None:
        """Record what the sources produce for up to ``timeout`` seconds, or until a probe is
        due."""
        if self.supervisor is None:
            return
        deadline = time.monotonic() + timeout
        while not self.flags.stop and time.monotonic() < min(deadline, self._probe_due):
            batch = self._pending
            if batch is not None and time.monotonic() < self._store_retry_at:
                # the store refused it: later batches wait behind it (the sources' positions
                # are not stored meanwhile, so nothing is lost), and probes go on
                self.flags.wake.wait(max(0.0, min(deadline, self._probe_due,
                                                  self._store_retry_at) - time.monotonic()))
                continue
            if batch is None:
                try:
                    # wake for the probe too: a probe interval under a second was a second
                    batch = self.supervisor.batches.get(
                        timeout=max(0.0, min(deadline, self._probe_due) - time.monotonic()))
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

    def _keep_up(self) -> None:
        """Store housekeeping between the steps of detection: the heartbeat, and one small
        batch of the retention pass at a time (never a long transaction)."""
        assert self.store is not None
        mono = time.monotonic()
        if self.spooled is not None and self.spooled.spooling:
            # while it does not answer, only the spool's own thread tries it (never this loop)
            if mono >= self._catch_up_due and not self.spooled.away:
                try:
                    self.spooled.catch_up()
                except StoreError as exc:
                    self._catch_up_due = mono + STORE_RETRY
                    log.debug("store: still unreachable: %s", exc)
            return
        if self._store_problem is not None:
            return
        try:
            if mono >= self._heartbeat_due:
                self._heartbeat_due = mono + HEARTBEAT_EVERY
                self.store.heartbeat(os.getpid(), self._started_at, self.clock.now(),
                                     __version__)
            if mono >= self._prune_due and not self._pruning:
                self._prune_due = mono + PRUNE_EVERY
                self._pruning = ["events", "incidents"]
            if self._pruning:
                self._prune_step()
        except StoreError as exc:
            if str(exc) != self._housekeeping_problem:  # once, not every ten seconds
                log.warning("store: %s; housekeeping (heartbeat, retention) tried again later",
                            exc)
                self._housekeeping_problem = str(exc)
        else:
            self._housekeeping_problem = None

    def _prune_step(self) -> None:
        assert self.store is not None
        keep = self.config.storage
        what, now = self._pruning[0], self.clock.now()
        if what == "events" and keep.keep_events is not None:
            gone = self.store.prune_events(now - timedelta(seconds=keep.keep_events))
            done = gone < PRUNE_BATCH
        elif what == "incidents" and keep.keep_incidents is not None:
            gone = self.store.prune_incidents(now - timedelta(seconds=keep.keep_incidents), now)
            done = gone == 0
        else:
            gone, done = 0, True
        self._pruned += gone
        if done:
            if self._pruned:  # one line a pass, however many batches it took
                log.info("retention: %d %s pruned", self._pruned, what)
            self._pruned = 0
            self._pruning.pop(0)

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
            if new.netns != self.config.netns:
                log.warning("watch.netns changed; it takes effect at the next restart")
            if self.correlator is not None:
                self.correlator.th = new.thresholds
                self.correlator.quiet = timedelta(seconds=new.quiet_period)
            if self.responder is not None:
                self.responder.reload(new)
            self.config = replace(new, netns=self.config.netns)
            log.info("configuration reloaded from %s", new.path)
        sdnotify.notify("READY=1", "STATUS=watching")

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self._start()
        sdnotify.notify("READY=1", "STATUS=watching")
        log.info("synwatch running (config: %s)", self.config.path)
        ping = sdnotify.watchdog_interval()
        next_ping = time.monotonic()
        while not self.flags.stop:
            self._drain(timeout=min(ping or 1.0, 1.0))
            if time.monotonic() >= self._probe_due and not self.flags.stop:
                self._probe_due = time.monotonic() + self.config.probe_interval
                self._probe()
            if self.responder is not None:
                self.responder.tick()
            self._keep_up()
            if time.monotonic() >= self._status_due:
                self._status_due = time.monotonic() + STATUS_EVERY
                if self.spooled is not None:
                    self.spooled.check()
                if self._store_problem is None:  # once a second, not at every probe
                    self.telemetry.count_bans(self.store)
                self.telemetry.tell(self.supervisor, self._store_summary())
            next_ping = self._watchdog(ping, next_ping)
            if self.flags.reload and not self.flags.stop:
                self.flags.reload = False
                self._reload()
        sdnotify.notify("STOPPING=1", "STATUS=stopping")
        log.info("synwatch stopping")
        self.telemetry.stop_serving()
        if self.supervisor is not None:
            self.supervisor.stop()
            self._drain_queued()
        if self.correlator is not None and self.correlator.open:
            # one last look, so an open incident is saved with everything seen until now (the
            # sampler's current interval, the counters): a restart goes on from there
            self._probe()
        if self.store is not None and self._unsaved:
            self._store_retry_at = 0.0  # one last try, whenever the last one was
            self._save([])
        if self.responder is not None:
            self.responder.stop()
        if self.sampler is not None:
            self.sampler.stop()
        if self.accounting is not None:
            try:
                self.accounting.teardown()
            except CommandError as exc:
                log.warning("SYN accounting: could not remove its chain: %s", exc)
        if self.store is not None:
            self.store.close()
        if self.recording is not None:
            self.recording.close()
        self.telemetry.status.write("stopped")
        return 0
