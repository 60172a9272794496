"""One look at a network namespace: listeners and their queues, SYN-RECV sources by prefix,
counters and sysctls, and what they mean (`synwatch snapshot`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from synwatch.probes import procnet, sockdiag
from synwatch.probes.conntrack import Conntrack, read_conntrack
from synwatch.system.netns import in_netns

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


def take(netns: str = "", proc: Path = Path("/proc"), v4_len: int = 24,  # noqa: PLR0917
         v6_len: int = 64, peers_for: frozenset[int] = frozenset(),
         enter: Callable[[str, Callable[[], Snapshot]], Snapshot] = in_netns) -> Snapshot:
    """``enter``: how to get into the namespace (``netns.visit`` from a loop over many)."""
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

    return enter(netns, collect)
