"""One look at a network namespace: listeners and their queues, SYN-RECV sources by prefix,
counters and sysctls, and what they mean (`synwatch snapshot`)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
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
    # request sockets the dump found, whatever their listener; None: not dumped (a baseline)
    syn_recv_total: int | None = None


# A request socket is made by a SYN that came in (RFC 9293 3.10.7.2; tcp_conn_request), so
# while Tcp InSegs and the counters that move when requests overflow or go unanswered stand
# still, a namespace whose last dump held none holds none now. Its SYN-RECV dump is skipped
# then: inet_diag walks every bucket of the established hash for it, in each family (3.2 ms
# here on an idle host, two thirds of an idle service's CPU). Nor can a listener's queue have
# filled or overflowed without a segment coming in, so the listeners and sysctls of the last
# look (0.4 ms more) stand as well, for as long as the caller lets it (``reread``).
STILL = ("Tcp.InSegs", *(f"TcpExt.{name}" for name in procnet.STIRRING))


def nothing_came_in(previous: Snapshot | None, counters: dict[str, int]) -> bool:
    """Can ``previous``'s empty SYN-RECV dump stand for one now (``counters``: read now)?"""
    return (previous is not None and previous.syn_recv_total == 0
            and "Tcp.InSegs" in counters
            and all(counters.get(k) == previous.counters.get(k) for k in STILL))


def take(netns: str = "", proc: Path = Path("/proc"), v4_len: int = 24,  # noqa: PLR0917
         v6_len: int = 64, peers_for: frozenset[int] = frozenset(),
         enter: Callable[[str, Callable[[], Snapshot]], Snapshot] = in_netns,
         previous: Snapshot | None = None, reread: bool = True) -> Snapshot:
    """``enter``: how to get into the namespace (``netns.visit`` from a loop over many);
    ``previous``: its last snapshot: while nothing came in, its SYN-RECV dump stands, and
    unless ``reread`` (or completed connections are asked for) the rest of it too."""
    def collect() -> Snapshot:
        counters = procnet.read_counters(proc).values
        still = nothing_came_in(previous, counters)
        if still and not reread and not peers_for:
            assert previous is not None
            # connection tracking fills with any flow (UDP, forwarded), not only TCP's
            return replace(previous, counters=counters, conntrack=read_conntrack(proc))
        found = sockdiag.listeners()
        recv = (sockdiag.SynRecvSummary(Counter(), Counter()) if still
                else sockdiag.syn_recv(v4_len, v6_len))
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
        return Snapshot(netns, tuple(states), counters, procnet.read_sysctls(proc),
                        read_conntrack(proc), recv.total)

    return enter(netns, collect)
