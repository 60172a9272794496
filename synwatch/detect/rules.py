"""The diagnosis rules, once: sysctls and listeners judged into findings with numbers.

`synwatch snapshot`, `synwatch doctor` and the verdict's recommendations all ask these
functions, so they can no longer disagree (one used to flag somaxconn at 128, another below
4096). Pure: plain values in, findings out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from synwatch.probes.conntrack import Conntrack
from synwatch.probes.snapshot import Snapshot
from synwatch.probes.sockdiag import Listener
from synwatch.records import endpoint

Severity = Literal["bad", "warn", "ok"]
DEFAULT_SOMAXCONN = 4096  # net.core.somaxconn's default since 5.4 (19f92a030ca6)
SMALL_BACKLOG = 128
MAX_BACKLOG = 65535  # sk_max_ack_backlog was 16 bits before 4.4; also a sane ceiling


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    subject: str  # a listener "0.0.0.0:80", a sysctl, or "counters"
    text: str

    @property
    def sentence(self) -> str:
        """The finding as one line: "net.core.somaxconn is 128 ...", "0.0.0.0:80: ..."."""
        joiner = " " if self.text.startswith("is ") else ": "
        return f"{self.subject}{joiner}{self.text}"


def suggested_backlog(backlog: int | None, peak_syn_recv: int = 0, overflow_rate: float = 0,
                      peak_accept_queue: int = 0, listen_overflow_rate: float = 0) -> int:
    """A power of two above the backlog, the queue's peak and one second of the overflow."""
    need = max(SMALL_BACKLOG, 2 * (backlog or 0), peak_syn_recv + int(overflow_rate),
               peak_accept_queue + int(listen_overflow_rate))
    return min(MAX_BACKLOG, 1 << (need - 1).bit_length())


def syncookies(mode: int | None, dropped: int = 0) -> Finding | None:
    name = "net.ipv4.tcp_syncookies"
    if mode == 0:
        lost = f" ({dropped} SYNs were dropped)" if dropped else ""
        return Finding("bad", name, f"is 0: a full SYN queue drops every new client{lost}; "
                                    "`sysctl -w net.ipv4.tcp_syncookies=1`")
    if mode == 2:
        return Finding("warn", name, "is 2: every SYN gets a cookie (TCP options such as window "
                                     "scaling are reduced) and the kernel never logs a flood; "
                                     "1 is the usual setting")
    return None


def somaxconn(value: int | None, need: int = DEFAULT_SOMAXCONN) -> Finding | None:
    if value is None or value >= need:
        return None
    return Finding("warn", "net.core.somaxconn",
                   f"is {value} and clamps every listen() backlog (the default has been "
                   f"{DEFAULT_SOMAXCONN} since 5.4): `sysctl -w net.core.somaxconn={need}` "
                   "(and in /etc/sysctl.d/)")


def sysctls(values: dict[str, int | None]) -> list[Finding]:
    """Every sysctl rule on one namespace's values."""
    out = [f for f in (syncookies(values.get("net.ipv4.tcp_syncookies")),
                       somaxconn(values.get("net.core.somaxconn"))) if f]
    if values.get("net.ipv4.tcp_abort_on_overflow") == 1:
        out.append(Finding("warn", "net.ipv4.tcp_abort_on_overflow",
                           "is 1: clients get a reset when an accept queue is full instead of "
                           "being retried; 0 rides out short bursts"))
    retries = values.get("net.ipv4.tcp_synack_retries")
    if retries is not None and retries > 5:
        out.append(Finding("warn", "net.ipv4.tcp_synack_retries",
                           f"is {retries}: request sockets of a spoofed flood live for about "
                           f"{2 ** (retries + 1) - 1} s; 5 (63 s) is the default, 2 is enough "
                           "under attack"))
    return out


CONNTRACK_FULL = 0.9  # a table this full drops new flows at the next burst


def conntrack(table: Conntrack | None, dropped_now: int = 0) -> Finding | None:
    """The connection-tracking table: full (or dropping) is every new flow refused, real
    clients' and outgoing ones included; a spoofed SYN flood fills it long before SYN cookies
    matter (docs/kernel.md §7)."""
    if table is None or table.max <= 0:
        return None
    fill = f"{table.count} of {table.max} entries ({table.fill:.0%})"
    if dropped_now:
        return Finding("bad", "net.netfilter.nf_conntrack_max",
                       f"the connection-tracking table is full: {fill}, {dropped_now} new flows "
                       "dropped just now (every new connection, real clients' included); "
                       "keep the flooded port's SYNs out of it (SYNPROXY: notrack + synproxy "
                       "in nftables) or raise nf_conntrack_max")
    if table.fill >= CONNTRACK_FULL:
        return Finding("warn", "net.netfilter.nf_conntrack_max",
                       f"the connection-tracking table is nearly full: {fill}; at the next "
                       "burst of new flows (a spoofed SYN flood makes one per forged source) "
                       "new connections are dropped")
    return None


def half_open_floor(backlog: int, minimum: int) -> int:
    """SYN-RECV at or above this, for long, is a half-open build-up: at least ``minimum``, or a
    quarter of the backlog if that is more."""
    return max(minimum, backlog // 4)


def listener(li: Listener, syn_recv: int, somaxconn_value: int | None, want: int,
             half_open_min: int = 64) -> list[Finding]:
    """The listener's own state now: its backlog and its two queues."""
    where = endpoint(li.address, li.port)
    out: list[Finding] = []
    if li.backlog == 0:
        out.append(Finding("bad", where, "listens with backlog 0 (listen(fd, 0)): on kernels "
                                         "4.4 to 6.12 its SYN queue is full from the first "
                                         f"SYN; use {want}"))
    elif (somaxconn_value is not None and li.backlog == somaxconn_value
          and somaxconn_value < DEFAULT_SOMAXCONN):
        out.append(Finding("warn", where, f"backlog {li.backlog} is net.core.somaxconn: the "
                                          "application asked for more and was clamped"))
    elif li.backlog < SMALL_BACKLOG:
        out.append(Finding("warn", where, f"backlog {li.backlog} is small (Python's "
                                          "socketserver uses 5, mio/tokio 128, nginx 511): a "
                                          f"burst of {li.backlog + 1} clients overflows it; "
                                          f"use {want}"))
    if li.backlog and syn_recv >= li.backlog:
        out.append(Finding("bad", where, f"SYN queue full now ({syn_recv} of {li.backlog})"))
    elif li.backlog and syn_recv >= half_open_floor(li.backlog, half_open_min):
        out.append(Finding("warn", where, f"{syn_recv} requests half-open now "
                                          f"({syn_recv * 100 // li.backlog}% of the SYN "
                                          "queue): if they stay and do not complete, a slow "
                                          "SYN flood (`synwatch run` opens a half_open "
                                          "incident)"))
    if li.backlog and li.accept_queue >= li.backlog:
        out.append(Finding("bad", where, f"accept queue full now ({li.accept_queue} of "
                                         f"{li.backlog}): the application is not accepting"))
    return out


def diagnose(snap: Snapshot) -> list[str]:
    """Plain statements with numbers, from the one rule table (above)."""
    found = sysctls(snap.sysctls)
    somaxconn = snap.sysctls.get("net.core.somaxconn")
    for st in snap.listeners:
        want = suggested_backlog(st.listener.backlog, st.syn_recv)
        found += listener(st.listener, st.syn_recv, somaxconn, want)
    table = conntrack(snap.conntrack)
    if table is not None:
        found.append(table)
    out = [f.sentence for f in found]
    overflowed = (snap.counters.get("TcpExt.TCPReqQFullDoCookies", 0)
                  + snap.counters.get("TcpExt.TCPReqQFullDrop", 0))
    if overflowed:
        out.append(f"since boot, {overflowed} SYNs found a full SYN queue "
                   f"({snap.counters.get('TcpExt.SyncookiesRecv', 0)} cookie handshakes "
                   "completed)")
    if snap.counters.get("TcpExt.ListenOverflows"):
        out.append(f"since boot, accept queues overflowed "
                   f"{snap.counters['TcpExt.ListenOverflows']} times")
    return out or ["nothing overflowing"]
