"""`synwatch doctor`: the kernel state of a namespace judged, with tuning advice in numbers.

Pure: it reads two snapshots (for rates) and the history's peaks per port, so every rule is
tested without a kernel; the CLI does the probing.
"""

from __future__ import annotations

from synwatch.detect import rules
from synwatch.detect.rules import Finding
from synwatch.probes.snapshot import Snapshot
from synwatch.records import NOT_ACCEPTING_AFTER, PortHistory, endpoint

__all__ = ["Finding", "PortHistory", "examine"]


def examine(before: Snapshot, after: Snapshot, seconds: float,
            history: dict[int, PortHistory], half_open_min: int = 64) -> list[Finding]:
    sysctls = after.sysctls
    somaxconn = sysctls.get("net.core.somaxconn")
    out = rules.sysctls(sysctls)
    if after.conntrack is not None:
        dropped = after.conntrack.drop - (before.conntrack.drop if before.conntrack else 0)
        table = rules.conntrack(after.conntrack, max(0, dropped))
        if table is not None:
            out.append(table)
    for st in after.listeners:
        li = st.listener
        where = endpoint(li.address, li.port)
        seen = history.get(li.port)
        want = rules.suggested_backlog(li.backlog, max(st.syn_recv,
                                                        seen.peak_syn_recv if seen else 0),
                                       peak_accept_queue=li.accept_queue)
        out += rules.listener(li, st.syn_recv, somaxconn, want, half_open_min)
        if seen and seen.peak_syn_recv >= li.backlog > 0:
            out.append(Finding("warn", where, f"backlog {li.backlog} is below the peak of real "
                               f"load seen in {seen.capacity_incidents} capacity incidents "
                               f"({seen.peak_syn_recv} request sockets, last incident "
                               f"{seen.last_incident_id}); use {want}"))
        if seen and seen.capacity_incidents:
            out.append(Finding("warn", where, f"{seen.capacity_incidents} capacity incidents: "
                               "real clients found the queue full; raise the backlog to "
                               f"{want} and check the application's workers"))
        if seen and seen.not_accepting:
            out.append(Finding("warn", where, f"{seen.not_accepting} incidents where its "
                               "application stopped accepting (its accept queue full for "
                               f"{NOT_ACCEPTING_AFTER:.0f} s or more): a larger backlog does "
                               "not help; check the application"))

    def rate(name: str) -> float:
        delta = after.counters.get(name, 0) - before.counters.get(name, 0)
        return max(0, delta) / seconds if seconds > 0 else 0.0

    overflow = rate("TcpExt.TCPReqQFullDoCookies") + rate("TcpExt.TCPReqQFullDrop")
    if overflow:
        out.append(Finding("bad", "counters", f"{overflow:.0f} SYNs/s are finding a full SYN "
                           "queue right now"))
    if rate("TcpExt.ListenOverflows"):
        out.append(Finding("bad", "counters", f"{rate('TcpExt.ListenOverflows'):.0f} accept-"
                           "queue overflows/s right now"))
    since_boot = after.counters.get("TcpExt.ListenOverflows", 0)
    if since_boot and not rate("TcpExt.ListenOverflows"):
        out.append(Finding("warn", "counters", f"accept queues overflowed {since_boot} times "
                           "since boot (no log line is ever printed for that)"))
    if not any(f.severity != "ok" for f in out):
        out.append(Finding("ok", "all", f"{len(after.listeners)} listeners, nothing to tune"))
    order = {"bad": 0, "warn": 1, "ok": 2}
    return sorted(out, key=lambda f: order[f.severity])
