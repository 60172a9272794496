"""Passive SYN sampling: an AF_PACKET socket with a classic BPF filter, per network namespace.

The socket table keeps a flood's sources only while their request sockets live, and never
with ``tcp_syncookies=2``; the nftables accounting set needs a firewall change. This socket sees
every inbound SYN (TCP SYN without ACK, IPv4 and IPv6) of the namespace it was opened in, and the
kernel itself keeps 1 in N of them at random (the ancillary load SKF_AD_RANDOM, then ``mod N``;
Documentation/networking/filter.rst), so userspace handles a few thousand samples a second
whatever the flood's rate. N adapts to the rate; every sample counts for N SYNs. It changes no
firewall rule, so it works in dry run, with cookies 1 or 2, and without nftables.

The filter runs on SOCK_DGRAM packets, which start at the network header (af_packet.c
packet_rcv pulls the link header), and skips PACKET_OUTGOING so loopback traffic counts once.
IPv6 SYNs behind up to two hop-by-hop, routing or destination-options headers are walked;
fragments are not sampled (a SYN is never fragmented by a real stack).

It also keeps ACKs without SYN or RST (the handshake's last packet, data, FIN), 1 in the same N:
a forged source never sends one, since it never saw the SYN-ACK, so they tell per address which
sources complete handshakes, and a ban can spare them. SYNs are also counted per source address
(the busiest sampled.MAX_ADDRESSES), so a ban can be as narrow as the flood.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Final

from synwatch.errors import ProbeError
from synwatch.probes.sampled import Interval, Swap, SynSample, weight_at
from synwatch.probes.sockdiag import prefix_of
from synwatch.probes.synfilter import (
    ETH_P_ALL,
    MAX_ONE_IN,
    SNAPLEN,
    V4_MAPPED,
    Packet,
    attach_filter,
    parse_packet,
)
from synwatch.probes.synring import RxRing, map_ring
from synwatch.system.netns import in_netns

log = logging.getLogger(__name__)

# linux/socket.h, linux/if_packet.h
SO_RCVBUFFORCE, SO_TIMESTAMPNS = 33, 35
TIMESTAMP_SPACE = socket.CMSG_SPACE(16)  # struct timespec
SOL_PACKET, PACKET_STATISTICS = 263, 6

TARGET_RATE: Final = 1000  # samples a second userspace is asked to handle, at most
LINGER: Final = 0.02  # after a wake-up, let samples gather so one read loop takes many
# ... once N follows a flood (its samples at most TARGET_RATE a second, a quarter second of them
# far below the socket's buffer): each wake-up costs more than its reads on a machine the flood
# saturates (a thread waking 70 times a second was charged 2.5 % of a core there, 0.5 % idle)
LINGER_ADAPTED: Final = 0.25
PREFIX_CACHE: Final = 4096  # source prefixes kept as strings (cleared when full): a flood from
# a few networks repeats them; one from everywhere (a new /64 every SYN) would only fill it
RCVBUF: Final = 4 << 20
SWAPS_KEPT: Final = 64  # filter swaps remembered to weigh late samples: 3 s of swaps or more

@functools.cache
def _without_ring(why: str) -> None:
    """Said once a reason: every sampler of the process would say the same."""
    log.debug("SYN sampler: no receive ring (%s): one recvmsg a sample", why)


def _open(netns: str, one_in: int, *, ring: bool) -> tuple[socket.socket, RxRing | None]:
    def make() -> tuple[socket.socket, RxRing | None]:
        # Python cannot bind a packet socket to "every interface" (ifindex 0), so the socket is
        # made with its protocol; what it queued before the filter was attached is discarded.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                             socket.htons(ETH_P_ALL))
        mapped = None
        try:
            attach_filter(sock, one_in)
            # with the ring too: the kernel then stamps each packet as it comes in, before the
            # filter runs, and the ring's frames carry that stamp (af_packet.c, tpacket_rcv:
            # "prefer an existing software timestamp"; socket(7), SO_TIMESTAMPNS)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            if ring:
                try:
                    mapped = map_ring(sock)
                except OSError as exc:
                    _without_ring(exc.strerror or str(exc))
            if mapped is None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            # what was queued before the filter (and the ring): from now on the ring has it all
            while True:
                try:
                    sock.recv(1, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
        except BaseException:
            if mapped is not None:
                mapped.close()
            sock.close()
            raise
        return sock, mapped

    try:
        return in_netns(netns, make)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ProbeError("SYN sampler", f"cannot open a packet socket: {why} "
                                        "(needs CAP_NET_RAW)") from exc


def next_one_in(one_in: int, rate: float, target: int = TARGET_RATE) -> int:
    """The 1-in-N for the next second, from the samples a second seen under ``one_in``."""
    syns = rate * one_in
    if rate > target:
        return min(MAX_ONE_IN, max(one_in + 1, int(syns / (target / 2)) + 1))
    if rate < target / 8 and one_in > 1:
        return max(1, int(syns / (target / 2)) + 1) if syns else 1
    return one_in


class SynSampler:
    """Samples a namespace's inbound SYNs on a thread of its own until stop()."""

    def __init__(self, netns: str = "", v4_len: int = 24, v6_len: int = 64,
                 target: int = TARGET_RATE, *, ring: bool = True) -> None:
        """``ring``: read through a receive ring (synring) where the kernel sets one up; one
        recvmsg a sample otherwise."""
        self.netns, self.v4_len, self.v6_len, self.target = netns, v4_len, v6_len, target
        self.one_in = 1
        self._sock, self._ring = _open(netns, self.one_in, ring=ring)
        # the sampler thread and a probe's read() both drain: one at a time (the ring has no
        # lock of its own), taken before _lock
        self._draining = threading.Lock()
        self._lock = threading.Lock()
        self._interval = Interval()
        self._prefixes: dict[tuple[int, bytes], str] = {}
        self._swaps: deque[Swap] = deque(maxlen=SWAPS_KEPT)
        # samples read, and the packets they stood for, since the sampler thread last adapted
        # N (either thread reads: a probe drains the socket too)
        self._drained = self._weighed = 0
        self._lost_weight = 0  # the packets dropped samples stood for, since then
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # stop() wakes it
        self._thread = threading.Thread(target=self._run, name="syn sampler", daemon=True)

    def start(self) -> SynSampler:
        self._thread.start()
        return self

    def read(self) -> SynSample:
        """What was sampled since the last read (each read starts a new interval), including
        what is queued on the socket now: a probe must not miss a burst the sampler thread
        has not woken up for yet."""
        self._drain()
        with self._lock:
            self._take_drops()  # this interval's, read before the socket drops more
            interval = self._interval
            self._interval = Interval(frozenset(interval.ports))
            return interval.summary(self.one_in)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with self._draining:  # a probe's read() may be walking the ring
            if self._ring is not None:
                self._ring.close()  # unmapped: the socket's close frees the ring
            self._sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _prefix(self, family: int, source: bytes) -> str:
        """The source's prefix as text, cached: a flood repeats its networks."""
        length = self.v4_len if family == 4 else self.v6_len
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        if length % 8 or (family == 6 and source[:12] == V4_MAPPED):
            return prefix_of(af, source, self.v4_len, self.v6_len)
        key = (family, source[:length // 8])  # whole bytes: the key is the prefix
        text = self._prefixes.get(key)
        if text is None:
            if len(self._prefixes) >= PREFIX_CACHE:
                self._prefixes.clear()
            text = self._prefixes[key] = prefix_of(af, source, self.v4_len, self.v6_len)
        return text

    @property
    def mapped(self) -> bool:
        """Does it read through a receive ring?"""
        return self._ring is not None

    def _count(self, samples: Sequence[tuple[Packet | None, int | None]]) -> None:
        """Each sample with its receive time (ns), weighed under the lock the swaps are
        recorded under: a swap made while the samples were read is seen."""
        with self._lock:
            self._drained += len(samples)
            swaps, one_in = tuple(self._swaps), self.one_in
            for got, at in samples:
                weight = one_in if at is None else weight_at(swaps, at, one_in)
                self._weighed += weight
                if got is None:
                    continue
                source = got.source
                if len(source) == 16 and source[:12] == V4_MAPPED:
                    source = source[12:]
                prefix = self._prefix(got.family, got.source)
                if got.syn:
                    self._interval.add(got.port, prefix, weight, source)
                else:
                    self._interval.add_completed(got.port, source, prefix, weight)

    def _drain(self) -> None:
        """Read every queued sample (at most 4 * target: the thread then adapts N).

        Each sample counts for the 1-in-N of the filter that kept it. A filter swapped while
        a burst is in flight leaves samples of the old filter queued behind the swap, so the
        kernel's receive timestamp (SO_TIMESTAMPNS, taken before the filter runs) tells which
        filter a sample went through."""
        with self._draining:
            if self._ring is not None:
                self._count(self._ring.take(4 * self.target))
            else:
                self._count(self._receive())

    def _receive(self) -> list[tuple[Packet | None, int | None]]:
        """Without the ring: a recvmsg a sample, its timestamp in the ancillary data."""
        samples: list[tuple[Packet | None, int | None]] = []
        while True:
            try:
                data, ancillary, _flags, _addr = self._sock.recvmsg(
                    SNAPLEN, TIMESTAMP_SPACE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("SYN sampler: %s", exc)
                break
            at = None
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                    sec, nsec = struct.unpack_from("qq", value)
                    at = sec * 1_000_000_000 + nsec
            samples.append((parse_packet(data), at))
            if len(samples) >= 4 * self.target:
                break
        return samples

    def _take_drops(self) -> None:
        """(Under the lock.) The samples the socket dropped since the last look (the
        statistics are reset as they are read), charged to the interval now open and to the
        next choice of N, at the N in force: they were dropped while it was."""
        try:
            _packets, drops = struct.unpack(
                "II", self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        except OSError:
            return
        self._interval.lost += drops
        self._interval.lost_weight += drops * self.one_in
        self._lost_weight += drops * self.one_in

    def _adapt(self, elapsed: float) -> None:
        """The 1-in-N for what comes next, from the packets the samples of the last
        ``elapsed`` seconds stood for (each weighed by the filter that kept it, so a backlog
        read late is not taken for a faster flood) and the samples the socket dropped."""
        with self._lock:
            self._take_drops()
            weighed = self._weighed + self._lost_weight
            self._drained = self._weighed = self._lost_weight = 0
        rate = weighed / elapsed / self.one_in  # samples a second at the N in force
        want = next_one_in(self.one_in, rate, self.target)
        if want < self.one_in and elapsed < 1.0:
            want = self.one_in
        if want != self.one_in:
            log.debug("SYN sampler: %.0f packets/s at 1 in %d; now 1 in %d",
                      weighed / elapsed, self.one_in, want)
            with self._lock:  # a read() on the probe's thread weighs with the swap or before it
                # the drops since the look above were the old filter's: charged at its N. The
                # thread may have waited for the lock or the GIL meanwhile, and a full socket at
                # 1 in 1 drops hundreds a millisecond: charged at the new N, they made a flood
                # at this machine's limit half as large again, 2 runs in 10
                self._take_drops()
                began = time.time_ns()
                attach_filter(self._sock, want)
                self._swaps.append((began, time.time_ns(), self.one_in, want))
                self.one_in = want

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        window = time.monotonic()
        try:
            while not self._stop.is_set():
                # No SYN at 1 in 1: nothing to adapt, so sleep until one comes (or stop());
                # otherwise look each second to lower N. Idle, the thread never wakes.
                idle = self.one_in == 1 and not self._drained
                if poller.poll(-1 if idle else 1000):
                    if idle:  # a spell without SYNs is no window to measure a rate over
                        window = time.monotonic()
                    if self._stop.wait(LINGER if self.one_in == 1 else LINGER_ADAPTED):
                        break
                    self._drain()
                elapsed = time.monotonic() - window
                # faster than the target: act at once (a flood's first second at 1 in 1 would
                # cost more than the rest of it); slower: wait a whole second before lowering N
                if (self._drained > self.target / 10 and elapsed >= 0.05) or elapsed >= 1.0:
                    self._adapt(elapsed)
                    window = time.monotonic()
        except Exception:
            log.exception("SYN sampler stopped")


def open_sampler(netns: str, v4_len: int, v6_len: int) -> SynSampler:
    """A running sampler, or ProbeError saying why not (no CAP_NET_RAW, no AF_PACKET)."""
    return SynSampler(netns, v4_len, v6_len).start()

