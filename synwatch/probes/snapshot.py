"""One look at a network namespace: listeners and their queues, SYN-RECV sources by prefix,
counters and sysctls, and what they mean (`synwatch snapshot`)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synwatch import rules
from synwatch.netns import in_netns
from synwatch.probes import procnet, sockdiag
from synwatch.probes.conntrack import Conntrack, read_conntrack

SHOWN = 5  # prefixes shown per listener
KEPT = 64  # prefixes kept per listener for the correlator; the rest are only counted


@dataclass(frozen=True, slots=True)
class ListenerState:
    listener: sockdiag.Listener
    syn_recv: int
    prefixes: tuple[tuple[str, int], ...]  # the KEPT largest, largest first
    prefix_count: int  # distinct source prefixes among the request sockets
    # prefixes with exactly one and two request sockets: how many sources the table never saw
    singletons: int = 0
    doubletons: int = 0
    # peers of its connections that completed a handshake (ESTABLISHED, TIME-WAIT, closing),
    # network -> sockets; read only for the ports of open incidents (take(peers_for=...))
    peers: tuple[tuple[str, int], ...] = ()

    @property
    def top_prefixes(self) -> tuple[tuple[str, int], ...]:
        return self.prefixes[:SHOWN]


@dataclass(frozen=True, slots=True)
class Snapshot:
    netns: str
    listeners: tuple[ListenerState, ...]
    counters: dict[str, int]
    sysctls: dict[str, int | None]
    conntrack: Conntrack | None = None  # None: no connection tracking here


def take(netns: str = "", proc: Path = Path("/proc"), v4_len: int = 24,
         v6_len: int = 64, peers_for: frozenset[int] = frozenset()) -> Snapshot:
    def collect() -> Snapshot:
        found = sockdiag.listeners()
        recv = sockdiag.syn_recv(v4_len, v6_len)
        peers = sockdiag.peers(peers_for, v4_len, v6_len) if peers_for else {}
        by_listener: dict[tuple[int, int], list[tuple[str, int]]] = defaultdict(list)
        for (family, port, prefix), n in recv.per_prefix.items():
            by_listener[(family, port)].append((prefix, n))
        states = []
        for li in found:
            key = (li.family, li.port)
            prefixes = sorted(by_listener.get(key, ()), key=lambda x: (-x[1], x[0]))
            states.append(ListenerState(li, recv.per_listener[key], tuple(prefixes[:KEPT]),
                                        len(prefixes),
                                        sum(1 for _, n in prefixes if n == 1),
                                        sum(1 for _, n in prefixes if n == 2),
                                        tuple(peers.get(li.port, {}).items())))
        return Snapshot(netns, tuple(states), procnet.read_counters(proc).values,
                        procnet.read_sysctls(proc), read_conntrack(proc))

    return in_netns(netns, collect)


def diagnose(snap: Snapshot) -> list[str]:
    """Plain statements with numbers, from the one rule table (synwatch.rules)."""
    found = rules.sysctls(snap.sysctls)
    somaxconn = snap.sysctls.get("net.core.somaxconn")
    for st in snap.listeners:
        want = rules.suggested_backlog(st.listener.backlog, st.syn_recv)
        found += rules.listener(st.listener, st.syn_recv, somaxconn, want)
    table = rules.conntrack(snap.conntrack)
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


def as_json(snap: Snapshot) -> dict[str, Any]:
    listeners = []
    for st in snap.listeners:
        li = st.listener
        listeners.append({
            "address": li.address, "port": li.port, "family": li.family,
            "backlog": li.backlog, "accept_queue": li.accept_queue, "drops": li.drops,
            "syn_recv": st.syn_recv,
            "top_prefixes": [{"prefix": p, "count": n,
                              "share": round(n / st.syn_recv, 3) if st.syn_recv else 0.0}
                             for p, n in st.top_prefixes],
        })
    ct = snap.conntrack
    conntrack = None if ct is None else {
        "count": ct.count, "max": ct.max, "fill": round(ct.fill, 3), "drop": ct.drop,
        "early_drop": ct.early_drop, "insert_failed": ct.insert_failed}
    return {"netns": snap.netns, "listeners": listeners, "counters": snap.counters,
            "sysctls": snap.sysctls, "conntrack": conntrack, "diagnosis": diagnose(snap)}
