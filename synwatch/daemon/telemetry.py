"""What the running service tells about itself: Prometheus metrics (``metrics.listen``), the
status file `synwatch status` reads, and the one-line summary sd_notify's STATUS= carries. The
service calls it at each step; nothing here acts or decides."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from synwatch.config import Config
from synwatch.daemon.status import DaemonStatus, SourceState, status_path
from synwatch.errors import StoreError
from synwatch.probes.snapshot import Snapshot
from synwatch.records import ActionRun, IncidentChange, StoredEvent, endpoint
from synwatch.sources.base import Batch, Source
from synwatch.sources.supervisor import Supervisor
from synwatch.store.api import ServiceStore
from synwatch.system import sdnotify

if TYPE_CHECKING:
    from synwatch.daemon.metrics import Metrics


BANS_EVERY = 10.0  # seconds between counts of the active bans without a ban action
LAG_SLACK = 30.0  # seconds before the start whose lines still count toward the source lag

class Telemetry:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics: Metrics | None = None
        if config.metrics_listen:  # prometheus_client costs 14 MB: only when asked for
            from synwatch.daemon.metrics import Metrics  # noqa: PLC0415

            self.metrics = Metrics()
        self.status = DaemonStatus(status_path(config), config.path)
        logging.getLogger("synwatch").addHandler(self.status.errors)
        self._sources: list[Source] = []
        self.open: dict[int, str] = {}  # incident id -> "concentrated on 0.0.0.0:80"
        self.bans = 0
        # the active bans are counted at once after a ban action, else every BANS_EVERY s: a
        # fleet's thousands of rows read at every status tick cost the loop its probes
        self._bans_due, self._bans_stale = 0.0, True
        self.drifts = 0  # bans found not enforced in the kernel (and put back) since the start
        self.fleet_refused_n = 0  # other nodes' fleet bans refused here since the start
        self._summary = ""
        self.started = datetime.now(tz=UTC)
        self.watching = config.netns or "the host"  # what the summary says is watched
        self.ban_namespaces: list[str] = [config.netns]  # where bans are counted

    def start(self, sources: list[Source]) -> None:
        self._sources = list(sources)
        self.status.sources = {s.name: SourceState(s.name) for s in sources}
        if self.metrics is not None and self.config.metrics_listen is not None:
            self.metrics.serve(*self.config.metrics_listen)

    def stop_serving(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()

    def probe(self, snap: Snapshot, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.probe_duration.observe(seconds)
            self.metrics.kernel.snapshots[snap.netns] = snap

    def forget(self, netns: str) -> None:
        """A namespace gone: its listeners leave /metrics."""
        if self.metrics is not None:
            self.metrics.kernel.snapshots.pop(netns, None)

    def batch(self, batch: Batch, stored: list[StoredEvent], now: datetime) -> None:
        source = self.status.sources.get(batch.source)
        if source is not None:  # its position is read from the source itself (summary)
            # lag is how late a line is read, so only lines printed since the start count:
            # the backlog a start catches up on (kmsg's ring, the journal since the saved
            # cursor) is old, not late, and would hold the lag alert on after every restart.
            # LAG_SLACK: kmsg's stamps are the printk clock's, seconds off the wall clock on
            # a VM (8 s measured here), so a line of the first seconds may look older
            since = self.started - timedelta(seconds=LAG_SLACK)
            times = [r.time for r in batch.records if r.time is not None and r.time >= since]
            if times:
                source.lag_seconds = round(max(0.0, (now - max(times)).total_seconds()), 3)
                if self.metrics is not None:
                    self.metrics.source_lag.labels(batch.source).set(source.lag_seconds)
        if self.metrics is not None:
            for s in stored:
                self.metrics.events.labels(batch.source, str(s.event.trusted).lower(),
                                           s.event.kind).inc()

    def incident(self, change: IncidentChange) -> None:
        assert change.incident_id is not None
        if change.status == "closed":
            self.open.pop(change.incident_id, None)
        else:
            self.open[change.incident_id] = (f"{change.verdict} on "
                                             f"{endpoint(change.address, change.port)}")
        if self.metrics is not None:
            self.metrics.incident(change)

    def action(self, run: ActionRun) -> None:
        if run.action in ("ban", "unban"):
            self._bans_stale = True
        if self.metrics is not None:
            self.metrics.actions.labels(run.action, run.status).inc()

    def drift(self, backend: str, n: int) -> None:
        """The ban reconcile found ``n`` bans not enforced in the kernel."""
        self.drifts += n
        if self.metrics is not None:
            self.metrics.bans_drift.labels(backend).inc(n)

    def fleet_refused(self, reason: str, n: int) -> None:
        """``n`` of other nodes' fleet bans refused here (synwatch/actions/fleetcopy.py: malformed,
        origin, guard, cap, covered)."""
        self.fleet_refused_n += n
        self.status.counts["fleet_refused"] = self.fleet_refused_n
        if self.metrics is not None:
            self.metrics.fleet_refused.labels(reason).inc(n)

    def count_bans(self, store: ServiceStore | None) -> None:
        if store is None or not self.config.ban.enabled:
            return
        if not self._bans_stale and time.monotonic() < self._bans_due:
            return
        self._bans_due, self._bans_stale = time.monotonic() + BANS_EVERY, False
        try:
            now = datetime.now(tz=UTC)
            bans = [b for ns in self.ban_namespaces for b in store.active_bans(ns, now)]
        except StoreError:
            return  # counted again at the next probe
        self.bans = len(bans)
        if self.metrics is not None:
            per: dict[str, int] = {}
            for b in bans:
                per[b.backend] = per.get(b.backend, 0) + 1
            self.metrics.bans(per, [self.config.ban.backend, *per])

    def summary(self, supervisor: Supervisor | None, store_problem: str | None) -> str:
        """One line: what synwatch is doing, for sd_notify STATUS= and `synwatch status`."""
        if supervisor is not None:
            for name, source in self.status.sources.items():
                why = supervisor.failures.get(name)
                source.state = f"failed: {why}" if why else "running"
        for live in self._sources:  # where each has read to, recorded or not yet
            if live.name in self.status.sources:
                self.status.sources[live.name].position = getattr(live, "position", None) or None
        failing = [n for n, s in self.status.sources.items() if s.state != "running"]
        n = len(self.open)
        incidents = (f"{n} open incident{'s' if n != 1 else ''}"
                     + (f" ({'; '.join(f'#{i} {t}' for i, t in sorted(self.open.items()))})"
                        if self.open else ""))
        return (f"watching {self.watching}: "
                f"{len(self.status.sources)} source{'s' if len(self.status.sources) != 1 else ''}"
                + (f" ({', '.join(failing)} failing)" if failing else "")
                + f", {incidents}, {self.bans} bans"
                + (f" ({self.drifts} drift{'s' if self.drifts != 1 else ''} repaired)"
                   if self.drifts else "")
                + (f", {self.fleet_refused_n} fleet ban{'s' if self.fleet_refused_n != 1 else ''}"
                   " refused" if self.fleet_refused_n else "")
                + ("" if store_problem is None else f", {store_problem}"))

    def tell(self, supervisor: Supervisor | None, store_problem: str | None) -> None:
        summary = self.summary(supervisor, store_problem)
        self.status.write(summary)
        if summary != self._summary:
            self._summary = summary
            sdnotify.notify(f"STATUS={summary}")
