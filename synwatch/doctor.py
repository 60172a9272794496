"""`synwatch doctor`: the kernel state of a namespace judged, with tuning advice in numbers.

Pure: it reads two snapshots (for rates) and the history's peaks per port, so every rule is
tested without a kernel; the CLI does the probing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from synwatch.probes.snapshot import Snapshot
from synwatch.records import endpoint
from synwatch.verdict import Tally, suggested_backlog

Severity = Literal["bad", "warn", "ok"]
SMALL_BACKLOG = 128


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    subject: str  # a listener "0.0.0.0:80", a sysctl, or "counters"
    text: str


@dataclass(frozen=True, slots=True)
class PortHistory:
    """What the history remembers of one port: for "backlog below the observed peak"."""

    port: int
    incidents: int
    peak_syn_recv: int
    capacity_incidents: int
    last_incident_id: int


def examine(before: Snapshot, after: Snapshot, seconds: float,
            history: dict[int, PortHistory]) -> list[Finding]:
    out: list[Finding] = []
    sysctls = after.sysctls
    cookies = sysctls.get("net.ipv4.tcp_syncookies")
    somaxconn = sysctls.get("net.core.somaxconn")
    if cookies == 0:
        out.append(Finding("bad", "net.ipv4.tcp_syncookies",
                           "is 0: a full SYN queue drops every new client; "
                           "`sysctl -w net.ipv4.tcp_syncookies=1`"))
    elif cookies == 2:
        out.append(Finding("warn", "net.ipv4.tcp_syncookies",
                           "is 2: cookies for every SYN (reduced TCP options) and the kernel "
                           "never logs a flood; 1 is the usual setting"))
    if somaxconn is not None and somaxconn < 4096:
        out.append(Finding("warn", "net.core.somaxconn",
                           f"is {somaxconn}: every listen() backlog is clamped to it (the "
                           "default has been 4096 since 5.4); `sysctl -w net.core.somaxconn=4096`"))
    if sysctls.get("net.ipv4.tcp_abort_on_overflow") == 1:
        out.append(Finding("warn", "net.ipv4.tcp_abort_on_overflow",
                           "is 1: clients get a reset when an accept queue is full instead of "
                           "being retried; 0 rides out short bursts"))
    retries = sysctls.get("net.ipv4.tcp_synack_retries")
    if retries is not None and retries > 5:
        out.append(Finding("warn", "net.ipv4.tcp_synack_retries",
                           f"is {retries}: request sockets of a spoofed flood live for about "
                           f"{2 ** (retries + 1) - 1} s; 5 (63 s) is the default, 2 is enough "
                           "under attack"))

    for st in after.listeners:
        li = st.listener
        where = endpoint(li.address, li.port)
        seen = history.get(li.port)
        tally = Tally(family=li.family, address=li.address, port=li.port, backlog=li.backlog,
                      peak_syn_recv=max(st.syn_recv, seen.peak_syn_recv if seen else 0),
                      peak_accept_queue=li.accept_queue)
        want = suggested_backlog(tally)
        if li.backlog == 0:
            out.append(Finding("bad", where, "listens with backlog 0 (listen(fd, 0)): on "
                               "kernels 4.4 to 6.12 its SYN queue is full from the first SYN; "
                               f"use {want}"))
        elif somaxconn is not None and li.backlog == somaxconn and somaxconn < 4096:
            out.append(Finding("warn", where, f"backlog {li.backlog} is net.core.somaxconn: "
                               "the application asked for more and was clamped"))
        elif li.backlog < SMALL_BACKLOG:
            out.append(Finding("warn", where, f"backlog {li.backlog} is small (Python's "
                               "socketserver uses 5, mio/tokio 128, nginx 511): a burst of "
                               f"{li.backlog + 1} clients overflows it; use {want}"))
        if seen and seen.peak_syn_recv >= li.backlog > 0:
            out.append(Finding("warn", where, f"backlog {li.backlog} is below the peak seen "
                               f"in {seen.incidents} incidents ({seen.peak_syn_recv} request "
                               f"sockets, last incident {seen.last_incident_id}); use {want}"))
        if seen and seen.capacity_incidents:
            out.append(Finding("warn", where, f"{seen.capacity_incidents} capacity incidents: "
                               "real clients found the queue full; raise the backlog to "
                               f"{want} and check the application's workers"))
        if li.backlog and st.syn_recv >= li.backlog:
            out.append(Finding("bad", where, f"SYN queue full now ({st.syn_recv} of "
                               f"{li.backlog})"))
        if li.backlog and li.accept_queue >= li.backlog:
            out.append(Finding("bad", where, f"accept queue full now ({li.accept_queue} of "
                               f"{li.backlog}): the application is not accepting"))

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
