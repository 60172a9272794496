"""Prometheus metrics of the running service (``metrics.listen``), with prometheus_client.

Kernel state is read at scrape time from the latest probe (a custom collector), so a listener
that goes away goes away from /metrics too; labels are the listener's (netns, address, port)
and never a source prefix, so cardinality stays that of the machine's listeners. What the
service does (events, incidents, bans, actions, probes, source lag) is counted as it happens.
The names are an interface (docs/operations.md, "Metrics and alerts"); packaging/prometheus
holds alert rules and a Grafana dashboard built on them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from synwatch.config import VERDICTS
from synwatch.daemon.metricsserver import MetricsServer
from synwatch.detect.delta import OVERFLOW
from synwatch.probes.snapshot import Snapshot
from synwatch.records import IncidentChange

log = logging.getLogger(__name__)
LISTENER = ("netns", "address", "port")
# the namespace's counters exported as they are: the overflow node_exporter leaves out by
# default (its netstat collector keeps TcpExt_Listen* and TcpExt_Syncookies* only)
NAMESPACE_COUNTERS = {
    "synwatch_syn_overflow": (OVERFLOW, "SYNs that found a full SYN queue "
                                        "(TCPReqQFullDoCookies + TCPReqQFullDrop)"),
    "synwatch_syn_dropped": (("TcpExt.TCPReqQFullDrop",), "SYNs dropped at a full SYN queue "
                                                          "(cookies off)"),
    "synwatch_listen_overflows": (("TcpExt.ListenOverflows",), "accept-queue overflows"),
    "synwatch_syncookies_sent": (("TcpExt.SyncookiesSent",), "SYN cookies sent"),
    "synwatch_syncookies_recv": (("TcpExt.SyncookiesRecv",), "SYN cookies that came back valid"),
}


class _KernelCollector(Collector):
    """Listeners and namespace counters, from the latest probe of each namespace (a quiet one
    of many, read on its counters alone, keeps its last full probe's)."""

    def __init__(self) -> None:
        self.snapshots: dict[str, Snapshot] = {}  # netns -> its latest, replaced whole

    def collect(self) -> Iterator[Any]:
        snaps = list(self.snapshots.values())  # the probe thread replaces entries: read once
        if not snaps:
            return
        gauges = {
            "syn_recv": GaugeMetricFamily("synwatch_listener_syn_recv", "request sockets "
                                          "(SYN-RECV) of a listener", labels=LISTENER),
            "backlog": GaugeMetricFamily("synwatch_listener_backlog", "a listener's backlog "
                                         "(min(listen() argument, somaxconn))", labels=LISTENER),
            "accept_queue": GaugeMetricFamily("synwatch_listener_accept_queue", "connections "
                                              "waiting for accept()", labels=LISTENER),
        }
        drops = CounterMetricFamily("synwatch_listener_drops", "SYNs and final ACKs the listener "
                                    "dropped (its sk_drops)", labels=LISTENER)
        entries = GaugeMetricFamily("synwatch_conntrack_entries", "entries in the "
                                    "connection-tracking table", labels=["netns"])
        limit = GaugeMetricFamily("synwatch_conntrack_max", "the table's size "
                                  "(net.netfilter.nf_conntrack_max)", labels=["netns"])
        dropped = CounterMetricFamily("synwatch_conntrack_dropped", "new flows dropped "
                                      "because the table was full", labels=["netns"])
        families = {name: CounterMetricFamily(name, f"the namespace's {text}", labels=["netns"])
                    for name, (_, text) in NAMESPACE_COUNTERS.items()}
        tracked = False
        for snap in snaps:
            for st in snap.listeners:
                li = st.listener
                labels = [snap.netns, li.address, str(li.port)]
                gauges["syn_recv"].add_metric(labels, st.syn_recv)
                gauges["backlog"].add_metric(labels, li.backlog)
                gauges["accept_queue"].add_metric(labels, li.accept_queue)
                drops.add_metric(labels, li.drops)
            table = snap.conntrack
            if table is not None:  # connection tracking in the namespace (docs/kernel.md §7)
                tracked = True
                entries.add_metric([snap.netns], table.count)
                limit.add_metric([snap.netns], table.max)
                dropped.add_metric([snap.netns], table.drop)
            for name, (counters, _) in NAMESPACE_COUNTERS.items():
                families[name].add_metric([snap.netns],
                                          sum(snap.counters.get(c, 0) for c in counters))
        yield from gauges.values()
        yield drops
        if tracked:
            yield from (entries, limit, dropped)
        yield from families.values()


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.registry = CollectorRegistry()
        r = self.registry
        self.kernel = _KernelCollector()
        r.register(self.kernel)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total
        self.events = Counter("synwatch_events", "kernel events recorded",
                              ["source", "trusted", "kind"], registry=r)
        self.incidents_open = Gauge("synwatch_incidents_open", "incidents open now",
                                    ["verdict"], registry=r)
        self.incidents_total = Counter("synwatch_incidents", "incidents closed, by their "
                                       "verdict (open ones are synwatch_incidents_open)",
                                       ["verdict"], registry=r)
        self.bans_active = Gauge("synwatch_bans_active", "prefixes banned now", ["backend"],
                                 registry=r)
        self.actions = Counter("synwatch_actions", "action outcomes", ["action", "status"],
                               registry=r)
        self.bans_drift = Counter("synwatch_bans_drift", "active bans the reconcile found not "
                                  "enforced in the kernel (missing, at another prefix length, "
                                  "with another time left) and put back", ["backend"],
                                  registry=r)
        self.fleet_refused = Counter("synwatch_fleet_refused", "other nodes' fleet bans not "
                                     "copied here, by reason: malformed (not a ban), origin "
                                     "(not in actions.ban.fleet_from), guard (too wide, a "
                                     "special range, allowlisted, this host's), cap, covered "
                                     "(already banned here)", ["reason"], registry=r)
        self.source_lag = Gauge("synwatch_source_lag_seconds", "how long after its own time "
                                "the latest kernel line of a source was recorded", ["source"],
                                registry=r)
        self.probe_duration = Histogram("synwatch_probe_duration_seconds", "one probe of the "
                                        "kernel's state (counters, sockets, sample)",
                                        buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
                                        registry=r)
        for verdict in VERDICTS:  # every series exists from the start, at 0
            self.incidents_open.labels(verdict).set(0)
            self.incidents_total.labels(verdict)
        self._open: dict[int, str] = {}  # incident id -> verdict
        self._server: MetricsServer | None = None
        self._lock = threading.Lock()

    def serve(self, host: str, port: int) -> bool:
        try:
            self._server = MetricsServer(self.registry, host, port)  # one thread, bounded
        except OSError as exc:
            log.error("metrics: cannot listen on %s:%d: %s; running without /metrics",  # noqa: TRY400
                      host, port, exc.strerror or exc)
            return False
        log.info("metrics: http://%s:%d/metrics", host if ":" not in host else f"[{host}]",
                 self._server.port)
        self._server.start()
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def incident(self, change: IncidentChange) -> None:
        """Follow an incident's verdict while it is open; count it by its last one."""
        if change.incident_id is None:
            return
        with self._lock:
            if change.status == "closed":
                verdict = self._open.pop(change.incident_id, change.verdict)
                self.incidents_total.labels(change.verdict or verdict).inc()
            else:
                self._open[change.incident_id] = change.verdict
            for verdict in VERDICTS:
                self.incidents_open.labels(verdict).set(
                    sum(1 for v in self._open.values() if v == verdict))

    def bans(self, per_backend: dict[str, int], backends: list[str]) -> None:
        for backend in backends:
            self.bans_active.labels(backend).set(per_backend.get(backend, 0))
            self.bans_drift.labels(backend)  # the series exists from the start, at 0
