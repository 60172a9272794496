"""What the correlator sums while an incident lasts, for its verdict (synwatch/detect/verdict.py):
the counters' deltas, the SYN-RECV and accept-queue peaks, the prefixes the evidence names
(sampled SYNs, SYN-RECV sockets, the accounting set) and which of them completed handshakes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from synwatch.detect import rules
from synwatch.detect.delta import add_completed, add_counts

if TYPE_CHECKING:
    from synwatch.detect.delta import ProbeDelta
    from synwatch.probes.sampled import SynSample
    from synwatch.probes.snapshot import ListenerState


@dataclass
class Tally:
    """What one incident's kernel evidence adds up to. Owned and updated by the correlator."""

    family: int | None = None
    address: str | None = None
    port: int | None = None
    samples: int = 0
    syns_overflowed: int = 0  # TCPReqQFullDoCookies + TCPReqQFullDrop
    syns_dropped: int = 0  # TCPReqQFullDrop alone (no cookies)
    cookies_sent: int = 0
    cookies_recv: int = 0  # handshakes completed with a cookie
    passive_opens: int = 0
    listen_overflows: int = 0
    backlog: int | None = None
    peak_syn_recv: int = 0
    peak_accept_queue: int = 0
    # the accept queue full at every probe since (epoch seconds; 0: not full at the last), and
    # the longest such stretch: an application that stopped accepting, not a burst
    accept_full_since: float = 0.0
    accept_full_for: float = 0.0
    peak_overflow_rate: float = 0.0  # SYNs/s finding a full SYN queue
    peak_listen_overflow_rate: float = 0.0
    syn_recv_sum: int = 0  # request sockets summed over samples: the denominator of shares
    prefixes: dict[str, int] = field(default_factory=dict)  # from SYN-RECV samples
    prefix_count: int = 0  # distinct prefixes seen (at least)
    accounted: dict[str, int] = field(default_factory=dict)  # SYNs per prefix (nft set)
    sysctls: dict[str, int | None] = field(default_factory=dict)
    half_open: bool = False  # opened on a half-open build-up (no overflow, no log line)
    # The probe with the most request sockets while the incident was active: the socket table's
    # one sample of independent sources (summing probes would count a socket many times).
    socket_n: int = 0
    socket_distinct: int = 0
    socket_singletons: int = 0
    socket_doubletons: int = 0
    # The packet sampler (AF_PACKET, 1 in N): estimated SYNs and samples per prefix.
    sampled: dict[str, int] = field(default_factory=dict)
    sampled_seen: dict[str, int] = field(default_factory=dict)
    sampled_n: int = 0
    sampled_syns: int = 0
    sampled_distinct: int = 0  # distinct prefixes in the busiest interval (the dicts are bounded)
    one_in: int = 0
    # The sampler per source: estimated SYNs per address (the busiest), and the networks seen
    # completing handshakes (ACKs without SYN or RST), with the packets seen: a ban's width.
    sampled_addr: dict[str, int] = field(default_factory=dict)
    completed: dict[str, int] = field(default_factory=dict)
    # peers of the listener's completed connections (inet_diag), network -> peak sockets
    connected: dict[str, int] = field(default_factory=dict)
    # the packet sampler watched while the incident was active: it sees every SYN that crossed
    # an interface from outside (never lo), so a flood it did not see came from this host
    sampler_on: bool = False
    overflow_watched: int = 0  # SYNs that overflowed while the sampler watched
    # Connection tracking in the namespace (none where it is not loaded): the table's peak and
    # the new flows it dropped while the incident was active (docs/kernel.md §7).
    conntrack_max: int = 0
    conntrack_peak: int = 0
    conntrack_dropped: int = 0

    def absorb_counters(self, deltas: dict[str, int]) -> None:
        """Add one probe interval's counter movements (keys as in delta.RATES)."""
        self.syns_overflowed += deltas["syns_overflowed"]
        self.syns_dropped += deltas["syns_dropped"]
        self.cookies_sent += deltas["cookies_sent"]
        self.cookies_recv += deltas["cookies_recv"]
        self.passive_opens += deltas["passive_opens"]
        self.listen_overflows += deltas["listen_overflows"]

    def absorb(self, st: ListenerState | None, probe: ProbeDelta, *, active: bool) -> None:
        """Add one probe: this listener's state, and while the incident is active the
        counters, the accounting set's and the sampler's SYNs for its port."""
        snap, rates = probe.snap, probe.rates
        self.samples += 1
        self.sysctls = dict(snap.sysctls)
        if active:
            self.accounted = add_counts(self.accounted, ((prefix, n) for (port, prefix), n
                                                         in probe.accounted.items()
                                                         if port == self.port))
            self._absorb_sampled(probe.sampled)
            self.absorb_counters(probe.deltas)
            if probe.sampled is not None and not probe.since_restart:
                self.overflow_watched += probe.deltas["syns_overflowed"]
            self.peak_overflow_rate = max(self.peak_overflow_rate, rates["syns_overflowed"])
            self.peak_listen_overflow_rate = max(self.peak_listen_overflow_rate,
                                                 rates["listen_overflows"])
        table = snap.conntrack
        if table is not None:
            self.conntrack_max = table.max
            self.conntrack_peak = max(self.conntrack_peak, table.count)
            if active:
                self.conntrack_dropped += probe.conntrack_dropped
        if st is None:
            return
        if st.peers:
            self.connected = add_completed(self.connected, (
                (p, n - self.connected.get(p, 0)) for p, n in st.peers
                if n > self.connected.get(p, 0)))
        self.backlog = st.listener.backlog
        self.peak_syn_recv = max(self.peak_syn_recv, st.syn_recv)
        self.peak_accept_queue = max(self.peak_accept_queue, st.listener.accept_queue)
        li = st.listener
        if li.backlog > 0 and li.accept_queue >= li.backlog and probe.at is not None:
            now = probe.at.timestamp()
            self.accept_full_since = self.accept_full_since or now
            self.accept_full_for = max(self.accept_full_for, now - self.accept_full_since)
        else:
            self.accept_full_since = 0.0
        if active and st.syn_recv:
            self.syn_recv_sum += st.syn_recv
            self.prefixes = add_counts(self.prefixes, st.prefixes)
            self.prefix_count = max(self.prefix_count, st.prefix_count, len(self.prefixes))
            if st.syn_recv > self.socket_n:
                self.socket_n, self.socket_distinct = st.syn_recv, st.prefix_count
                self.socket_singletons, self.socket_doubletons = st.singletons, st.doubletons

    def _absorb_sampled(self, sampled: SynSample | None) -> None:
        """One interval of the packet sampler (this listener's port only)."""
        if sampled is not None:
            self.sampler_on = True
        got = sampled.port(self.port) if sampled is not None and self.port is not None else None
        if sampled is None or got is None:
            return
        self.completed = add_completed(self.completed, got.completed)
        if not got.samples:
            return
        self.sampled_addr = add_counts(self.sampled_addr, got.addresses)
        self.one_in = sampled.one_in
        self.sampled_n += got.samples
        self.sampled_syns += got.syns
        self.sampled = add_counts(self.sampled, ((p, n) for p, n, _ in got.prefixes))
        self.sampled_seen = add_counts(self.sampled_seen, ((p, k) for p, _, k in got.prefixes))
        self.sampled_distinct = max(self.sampled_distinct, got.distinct)

    def conntrack_filled(self) -> bool:
        """Did connection tracking refuse flows, or come near to it, during the incident?"""
        return self.conntrack_dropped > 0 or (
            self.conntrack_max > 0 and self.conntrack_peak >= rules.CONNTRACK_FULL
            * self.conntrack_max)

    def fresh(self) -> Tally:
        """An empty tally for the same listener and settings (a new phase, a window)."""
        return Tally(family=self.family, address=self.address, port=self.port,
                     backlog=self.backlog, sysctls=dict(self.sysctls), half_open=self.half_open)

    def keep_peaks(self, earlier: Tally) -> None:
        """Carry an earlier phase's peaks into this one, and who completed handshakes: a client
        seen completing in an earlier phase, idle now, is still a client (never in a ban)."""
        self.completed = add_completed(self.completed, earlier.completed.items())
        self.connected = add_completed(self.connected, (
            (p, n - self.connected.get(p, 0)) for p, n in earlier.connected.items()
            if n > self.connected.get(p, 0)))
        self.sampler_on = self.sampler_on or earlier.sampler_on
        self.peak_syn_recv = max(self.peak_syn_recv, earlier.peak_syn_recv)
        self.peak_accept_queue = max(self.peak_accept_queue, earlier.peak_accept_queue)
        self.accept_full_since = self.accept_full_since or earlier.accept_full_since
        self.accept_full_for = max(self.accept_full_for, earlier.accept_full_for)
        self.peak_overflow_rate = max(self.peak_overflow_rate, earlier.peak_overflow_rate)
        self.peak_listen_overflow_rate = max(self.peak_listen_overflow_rate,
                                             earlier.peak_listen_overflow_rate)

    def to_json(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Tally:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)  # type: ignore[arg-type]
