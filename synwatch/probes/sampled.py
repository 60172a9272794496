"""What the SYN sampler counted in one interval (synwatch.probes.synsample): SYNs and completing
ACKs per port, source prefix and address, each sample weighed by the 1-in-N of the filter that
kept it, bounded under a flood from everywhere, and handed on as frozen records."""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from synwatch.probes.synfilter import V4_MAPPED

MAX_PORTS: Final = 256  # ports tracked per interval; the rest are only counted
MAX_PREFIXES: Final = 4096  # prefixes tracked per port and interval
MAX_ADDRESSES: Final = 4096  # source addresses tracked per port and interval (SYNs, ACKs each)
KEPT: Final = 64  # prefixes handed on per port
KEPT_ADDRESSES: Final = 512  # flooding addresses handed on per port


@dataclass(frozen=True, slots=True)
class PortSample:
    """The SYNs sampled to one port in one interval."""

    port: int
    samples: int  # packets handed to synwatch
    syns: int  # estimated SYNs: every sample counts for the 1-in-N in force
    prefixes: tuple[tuple[str, int, int], ...]  # (prefix, estimated SYNs, samples), KEPT largest
    distinct: int  # distinct source prefixes among the samples
    singletons: int  # prefixes sampled exactly once, and twice: the unseen-prefix estimate
    doubletons: int
    # the KEPT_ADDRESSES busiest source addresses: (address, estimated SYNs), a ban's width
    addresses: tuple[tuple[str, int], ...] = ()
    # sources seen completing (ACKs without SYN or RST): network -> estimated packets; a /32 or
    # /128 per address, or the address's prefix once MAX_ADDRESSES are tracked (never dropped:
    # a completing source must never look like a flooding one)
    completed: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class SynSample:
    """What the sampler saw since its last read."""

    one_in: int  # 1-in-N in force at the end of the interval
    seconds: float
    ports: tuple[PortSample, ...]
    lost: int = 0  # samples the socket dropped (its queue was full)

    def port(self, port: int) -> PortSample | None:
        return next((p for p in self.ports if p.port == port), None)


class Interval:
    """Counts per (port, prefix) and per (port, address) for one interval, bounded."""

    def __init__(self, known: frozenset[int] = frozenset()) -> None:
        self.started = time.monotonic()
        self.ports: dict[int, dict[str, list[int]]] = {}  # prefix -> [estimated SYNs, samples]
        self.evicted: dict[int, int] = {}  # prefixes dropped under the bound, per port
        self.untracked = 0
        self.weighed = 0  # packets every sample kept stands for (its weight), all kinds
        self.lost = 0  # samples the socket dropped (its queue was full)
        self.lost_weight = 0  # the packets they stood for
        self.addresses: dict[int, dict[bytes, int]] = {}  # SYNs per source address
        self.completed: dict[int, dict[bytes, int]] = {}  # ACKs per source address
        self.completed_wide: dict[int, dict[str, int]] = {}  # ACKs per prefix, past the bound
        # ports that had SYNs in the last interval: ACKs to others (replies to our own
        # outgoing connections, ephemeral ports) are not kept
        self.known = known

    def add(self, port: int, prefix: str, weight: int, source: bytes = b"") -> None:
        self.weighed += weight
        counts = self.ports.get(port)
        if counts is None:
            if len(self.ports) >= MAX_PORTS:
                self.untracked += 1
                return
            counts = self.ports[port] = {}
            self.addresses[port] = {}
        entry = counts.get(prefix)
        if entry is None:
            counts[prefix] = [weight, 1]
            if len(counts) > MAX_PREFIXES:
                keep = sorted(counts.items(), key=lambda x: -x[1][1])[:MAX_PREFIXES // 2]
                self.evicted[port] = self.evicted.get(port, 0) + len(counts) - len(keep)
                self.ports[port] = dict(keep)
        else:
            entry[0] += weight
            entry[1] += 1
        if source:
            by_address = self.addresses[port]
            by_address[source] = by_address.get(source, 0) + weight
            if len(by_address) > MAX_ADDRESSES:  # a flood from everywhere: keep the busiest
                self.addresses[port] = dict(sorted(by_address.items(),
                                                   key=lambda x: -x[1])[:MAX_ADDRESSES // 2])

    def add_completed(self, port: int, source: bytes, prefix: str, weight: int) -> None:
        """An ACK from ``source``: it completed a handshake (or sends data) to ``port``."""
        self.weighed += weight
        if port not in self.known and port not in self.ports:
            return
        by_address = self.completed.setdefault(port, {})
        if source in by_address or len(by_address) < MAX_ADDRESSES:
            by_address[source] = by_address.get(source, 0) + weight
            return
        wide = self.completed_wide.setdefault(port, {})
        if prefix in wide or len(wide) < MAX_PREFIXES:
            wide[prefix] = wide.get(prefix, 0) + weight

    def summary(self, one_in: int) -> SynSample:
        """The interval's counts. Samples the socket dropped (the reader fell behind: a
        saturated machine) were kept by the filter all the same: the estimates are scaled up
        by what they stood for, spread as the samples read were."""
        scale = (self.weighed + self.lost_weight) / self.weighed if self.weighed else 1.0

        def up(n: int) -> int:
            return round(n * scale)

        ports = []
        for port in sorted(set(self.ports) | set(self.completed)):
            counts = self.ports.get(port, {})
            ranked = sorted(counts.items(), key=lambda x: (-x[1][0], x[0]))
            busiest = sorted(self.addresses.get(port, {}).items(),
                             key=lambda x: (-x[1], x[0]))[:KEPT_ADDRESSES]
            completed = [(f"{_text(a)}/{len(a) * 8}", n)
                         for a, n in self.completed.get(port, {}).items()]
            completed += self.completed_wide.get(port, {}).items()
            ports.append(PortSample(
                port=port, samples=sum(c[1] for c in counts.values()),
                syns=up(sum(c[0] for c in counts.values())),
                prefixes=tuple((p, up(c[0]), c[1]) for p, c in ranked[:KEPT]),
                distinct=len(counts) + self.evicted.get(port, 0),
                singletons=sum(1 for c in counts.values() if c[1] == 1),
                doubletons=sum(1 for c in counts.values() if c[1] == 2),
                addresses=tuple((_text(a), up(n)) for a, n in busiest),
                completed=tuple(completed)))
        return SynSample(one_in, round(time.monotonic() - self.started, 3), tuple(ports),
                         self.lost)


Swap = tuple[int, int, int, int]  # began, ended (ns, CLOCK_REALTIME), 1-in-N before, after


def weight_at(swaps: Sequence[Swap], at: int, one_in: int) -> int:
    """The 1-in-N a sample received at ``at`` was kept under, from the filter swaps (oldest
    first) and the 1-in-N now: samples queue behind a swap, several swaps deep when the reader
    falls behind. During a swap, the filter that kept more (the smaller N) most likely."""
    earliest = one_in
    for began, ended, before, after in reversed(swaps):
        if at >= ended:
            return after
        if at >= began:
            return min(before, after)
        earliest = before
    return earliest


def _text(address: bytes) -> str:
    """An address as text; an IPv4-mapped IPv6 address as the IPv4 address (prefix_of does
    the same for prefixes)."""
    if len(address) == 16 and address[:12] == V4_MAPPED:
        address = address[12:]
    return socket.inet_ntop(socket.AF_INET if len(address) == 4 else socket.AF_INET6, address)
