"""One probe as differences from the one before: counter movements and their rates, new SYNs per
(port, prefix) in the accounting set, the listeners' own drops and whose SYN-RECV grew. The
correlator decides on these; a Tally (verdict.py) adds them up."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from synwatch.probes.evidence import Evidence
from synwatch.probes.sampled import SynSample
from synwatch.probes.snapshot import ListenerState, Snapshot

OVERFLOW = ("TcpExt.TCPReqQFullDoCookies", "TcpExt.TCPReqQFullDrop")
# the movements an incident adds up, each the sum of these counters (docs/kernel.md §3)
RATES = {"syns_overflowed": OVERFLOW, "syns_dropped": ("TcpExt.TCPReqQFullDrop",),
         "cookies_sent": ("TcpExt.SyncookiesSent",), "cookies_recv": ("TcpExt.SyncookiesRecv",),
         "passive_opens": ("Tcp.PassiveOpens",), "listen_overflows": ("TcpExt.ListenOverflows",)}
MAX_PREFIXES = 4096  # per incident and per kind of count
FOLDS = ((24, 64), (16, 32), (8, 16), (8, 8))  # completing sources, folded this far at most
ListenerId = tuple[int, str, int]  # (family, address, port)


def listener_id(st: ListenerState) -> ListenerId:
    return st.listener.family, st.listener.address, st.listener.port


@dataclass(frozen=True, slots=True)
class ProbeDelta:
    """One probe, as differences from the one before."""

    snap: Snapshot
    deltas: dict[str, int]
    rates: dict[str, float]
    accounted: dict[tuple[int, str], int]  # new SYNs per (port, prefix) in the accounting set
    sampled: SynSample | None  # SYNs sampled from packets over the same interval
    dropped: dict[ListenerId, int]  # listeners' own drops (sk_drops) over it
    grew: frozenset[ListenerId]  # listeners whose SYN-RECV rose over it
    conntrack_dropped: int = 0  # new flows connection tracking dropped over it (table full)
    # measured against the last probe before a restart: the packet sampler did not watch it
    since_restart: bool = False
    at: datetime | None = None  # when the probe was taken

    @property
    def moving(self) -> bool:
        """Did SYNs find a full queue, or the accept queue overflow, in this interval?"""
        return self.deltas["syns_overflowed"] > 0 or self.deltas["listen_overflows"] > 0


def measure(prev: Evidence | None, ev: Evidence) -> ProbeDelta:
    snap = ev.snapshot
    deltas = dict.fromkeys(RATES, 0)
    dt = 0.0
    if prev is not None and ev.at > prev.at:
        dt = (ev.at - prev.at).total_seconds()
        for name, counters in RATES.items():
            # a counter going back means the namespace was recreated: no delta this time
            deltas[name] = sum(max(0, snap.counters.get(c, 0)
                                   - prev.snapshot.counters.get(c, 0)) for c in counters)
        if snap.sysctls.get("net.ipv4.tcp_syncookies") == 2:
            # every SYN gets a cookie and counts in TCPReqQFullDoCookies, real clients' too
            # (kernel-facts.md §1.4, mode 2), so a busy healthy server would look flooded: what
            # only a flood leaves is cookies sent and never validated
            deltas["syns_overflowed"] = max(0, deltas["cookies_sent"] - deltas["cookies_recv"])
    rates = ({k: round(v / dt, 1) for k, v in deltas.items()} if dt
             else dict.fromkeys(deltas, 0.0))
    accounted: dict[tuple[int, str], int] = {}
    if ev.accounting is not None and prev is not None and prev.accounting is not None:
        for k, n in ev.accounting.items():
            before = prev.accounting.get(k, 0)
            moved = n - before if n >= before else n  # expired and counted anew
            if moved:  # a flood from everywhere fills the set with prefixes that stay still
                accounted[k] = moved
    dropped: dict[ListenerId, int] = {}
    grew: set[ListenerId] = set()
    if prev is not None:
        last_seen = {listener_id(li): li for li in prev.snapshot.listeners}
        for li in snap.listeners:
            was = last_seen.get(listener_id(li))
            if was is None or li.syn_recv > was.syn_recv:
                grew.add(listener_id(li))
            n = li.listener.drops - (was.listener.drops if was else li.listener.drops)
            if n > 0:
                dropped[listener_id(li)] = n
    ct_dropped = 0
    if prev is not None and snap.conntrack is not None and prev.snapshot.conntrack is not None:
        ct_dropped = max(0, snap.conntrack.drop - prev.snapshot.conntrack.drop)
    return ProbeDelta(snap, deltas, rates, accounted, ev.sampled, dropped, frozenset(grew),
                      ct_dropped, at=ev.at)


def add_counts(counts: dict[str, int], more: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Per-prefix counts, bounded under a flood from everywhere: past MAX_PREFIXES the
    smaller half is dropped."""
    for prefix, n in more:
        if n:
            counts[prefix] = counts.get(prefix, 0) + n
    if len(counts) > MAX_PREFIXES:
        counts = dict(sorted(counts.items(), key=lambda x: -x[1])[:MAX_PREFIXES // 2])
    return counts


def add_completed(counts: dict[str, int], more: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Networks seen completing handshakes, bounded without ever forgetting one: past
    MAX_PREFIXES they are folded into wider blocks (/24, /16, /8; /64, /32, /16, /8), which a
    ban then spares whole (wider, never narrower, than what was seen). An ACK spray from
    everywhere so makes bans rarer, never wrong, and the table stays bounded."""
    coarsest = {4: 32, 6: 128}  # how far the table is folded already: new ones join there
    for network in counts:
        version, length = _shape(network)
        coarsest[version] = min(coarsest[version], length)
    for network, n in more:
        version, length = _shape(network)
        key = _fold(network, coarsest[version]) if length > coarsest[version] else network
        counts[key] = counts.get(key, 0) + n
    for v4, v6 in FOLDS:
        if len(counts) <= MAX_PREFIXES:
            break
        folded: dict[str, int] = {}
        for network, n in counts.items():
            version, length = _shape(network)
            wide = v4 if version == 4 else v6
            key = _fold(network, wide) if length > wide else network
            folded[key] = folded.get(key, 0) + n
        counts = folded
    return counts


@functools.lru_cache(maxsize=1 << 16)
def _shape(network: str) -> tuple[int, int]:
    net = ipaddress.ip_network(network, strict=False)
    return net.version, net.prefixlen


@functools.lru_cache(maxsize=1 << 16)
def _fold(network: str, length: int) -> str:
    return str(ipaddress.ip_network(network, strict=False).supernet(new_prefix=length))
