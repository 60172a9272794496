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
"""

from __future__ import annotations

import ctypes
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from synwatch.errors import ProbeError
from synwatch.netns import in_netns
from synwatch.probes.sockdiag import prefix_of

log = logging.getLogger(__name__)

# linux/filter.h, linux/bpf_common.h, linux/if_packet.h
BPF_LD, BPF_LDX, BPF_ST, BPF_ALU = 0x00, 0x01, 0x02, 0x04
BPF_JMP, BPF_RET, BPF_MISC = 0x05, 0x06, 0x07
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0xA0
BPF_ADD, BPF_AND, BPF_LSH, BPF_MOD = 0x00, 0x50, 0x60, 0x90
BPF_JA, BPF_JEQ, BPF_JSET = 0x00, 0x10, 0x40
BPF_K, BPF_X = 0x00, 0x08
BPF_TAX, BPF_TXA = 0x00, 0x80
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL, SKF_AD_PKTTYPE, SKF_AD_RANDOM = 0, 4, 56
PACKET_OUTGOING = 4
ETH_P_ALL, ETH_P_IP, ETH_P_IPV6 = 0x0003, 0x0800, 0x86DD
SO_ATTACH_FILTER, SO_RCVBUFFORCE, SO_TIMESTAMPNS = 26, 33, 35
TIMESTAMP_SPACE = socket.CMSG_SPACE(16)  # struct timespec
SOL_PACKET, PACKET_STATISTICS = 263, 6
IPPROTO_TCP = 6
V6_EXTENSIONS = (0, 43, 60)  # hop-by-hop, routing, destination options: walked
V6_WALKED = 2  # extension headers walked before giving up
V4_MAPPED = b"\x00" * 10 + b"\xff\xff"  # counted as IPv4 by prefix_of: never cached

SNAPLEN: Final = 128  # IPv6 + two small extension headers + the TCP ports and flags
TARGET_RATE: Final = 1000  # samples a second userspace is asked to handle, at most
LINGER: Final = 0.02  # after a wake-up, let samples gather so one read loop takes many
PREFIX_CACHE: Final = 65536  # source prefixes kept as strings (cleared when full)
MAX_ONE_IN: Final = 1 << 20
MAX_PORTS: Final = 256  # ports tracked per interval; the rest are only counted
MAX_PREFIXES: Final = 4096  # prefixes tracked per port and interval
KEPT: Final = 64  # prefixes handed on per port
RCVBUF: Final = 4 << 20

Instruction = tuple[int, int, int, int]  # code, jt, jf, k (struct sock_filter)


Line = tuple[str, int, str | None, str | None, int] | str  # an instruction, or a label


def _assemble(lines: list[Line]) -> list[Instruction]:
    """Labels (plain strings) and (name, code, jump-if-true label, jump-if-false label, k);
    an unconditional `ja` jumps to its jump-if-true label (cBPF keeps that distance in k)."""
    where: dict[str, int] = {}
    ops: list[tuple[int, str | None, str | None, int]] = []
    for line in lines:
        if isinstance(line, str):
            where[line] = len(ops)
        else:
            _, code, jt, jf, k = line
            ops.append((code, jt, jf, k))

    def rel(label: str | None, at: int) -> int:
        return 0 if label is None else where[label] - at - 1

    out = []
    for i, (code, jt, jf, k) in enumerate(ops):
        if code == BPF_JMP | BPF_JA:
            out.append((code, 0, 0, rel(jt, i)))
        else:
            out.append((code, rel(jt, i), rel(jf, i), k & 0xFFFFFFFF))
    return out


def program(one_in: int, snaplen: int = SNAPLEN) -> list[Instruction]:
    """The classic BPF filter: inbound TCP SYN without ACK, kept 1 in ``one_in`` at random."""
    if not 1 <= one_in <= MAX_ONE_IN:
        raise ValueError(f"one_in must be from 1 to {MAX_ONE_IN}")
    jeq, jset = BPF_JMP | BPF_JEQ | BPF_K, BPF_JMP | BPF_JSET | BPF_K
    lines: list[Line] = [
        ("ld pkttype", BPF_LD | BPF_W | BPF_ABS, None, None, SKF_AD_OFF + SKF_AD_PKTTYPE),
        ("jeq outgoing", jeq, "drop", None, PACKET_OUTGOING),
        ("ld proto", BPF_LD | BPF_W | BPF_ABS, None, None, SKF_AD_OFF + SKF_AD_PROTOCOL),
        ("jeq ipv4", jeq, "v4", None, ETH_P_IP),
        ("jeq ipv6", jeq, "v6", "drop", ETH_P_IPV6),
        "v4",
        ("ldb [9]", BPF_LD | BPF_B | BPF_ABS, None, None, 9),
        ("jeq tcp", jeq, None, "drop", IPPROTO_TCP),
        ("ldh [6]", BPF_LD | BPF_H | BPF_ABS, None, None, 6),
        ("jset fragment offset", jset, "drop", None, 0x1FFF),
        ("ldxb 4*([0]&0xf)", BPF_LDX | BPF_B | BPF_MSH, None, None, 0),
        ("ja flags", BPF_JMP | BPF_JA, "flags", None, 0),
        "v6",
        ("ldx #40", BPF_LDX | BPF_W | BPF_IMM, None, None, 40),
        ("ldb [6]", BPF_LD | BPF_B | BPF_ABS, None, None, 6),
    ]
    for n in range(V6_WALKED + 1):
        lines += [
            f"next{n}",
            ("jeq tcp", jeq, "flags", None, IPPROTO_TCP),
        ]
        if n == V6_WALKED:
            lines.append(("ja drop", BPF_JMP | BPF_JA, "drop", None, 0))
            break
        lines += [
            ("jeq hop-by-hop", jeq, f"ext{n}", None, V6_EXTENSIONS[0]),
            ("jeq routing", jeq, f"ext{n}", None, V6_EXTENSIONS[1]),
            ("jeq destination options", jeq, f"ext{n}", "drop", V6_EXTENSIONS[2]),
            f"ext{n}",
            # next header at [x], header length in 8-octet units (less one) at [x+1]
            ("ldb [x+0]", BPF_LD | BPF_B | BPF_IND, None, None, 0),
            ("st M[0]", BPF_ST, None, None, 0),
            ("ldb [x+1]", BPF_LD | BPF_B | BPF_IND, None, None, 1),
            ("add #1", BPF_ALU | BPF_ADD | BPF_K, None, None, 1),
            ("lsh #3", BPF_ALU | BPF_LSH | BPF_K, None, None, 3),
            ("st M[1]", BPF_ST, None, None, 1),
            ("txa", BPF_MISC | BPF_TXA, None, None, 0),
            ("ldx M[1]", BPF_LDX | BPF_W | BPF_MEM, None, None, 1),
            ("add x", BPF_ALU | BPF_ADD | BPF_X, None, None, 0),
            ("tax", BPF_MISC | BPF_TAX, None, None, 0),
            ("ld M[0]", BPF_LD | BPF_W | BPF_MEM, None, None, 0),
        ]
    lines += [
        "flags",
        ("ldb [x+13]", BPF_LD | BPF_B | BPF_IND, None, None, 13),
        ("and #syn|ack", BPF_ALU | BPF_AND | BPF_K, None, None, 0x12),
        ("jeq syn", jeq, None, "drop", 0x02),
    ]
    if one_in > 1:
        lines += [
            ("ld rand", BPF_LD | BPF_W | BPF_ABS, None, None, SKF_AD_OFF + SKF_AD_RANDOM),
            ("mod #one_in", BPF_ALU | BPF_MOD | BPF_K, None, None, one_in),
            ("jeq 0", jeq, None, "drop", 0),
        ]
    lines += [("ret #snaplen", BPF_RET | BPF_K, None, None, snaplen), "drop",
              ("ret #0", BPF_RET | BPF_K, None, None, 0)]
    return _assemble(lines)


def parse_syn(packet: bytes) -> tuple[int, bytes, int] | None:
    """(family, source address bytes, destination port) of an IPv4 or IPv6 TCP SYN without
    ACK, read with the filter's own rules; None for anything else. Every offset is checked."""
    if len(packet) < 1:
        return None
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or len(packet) < ihl + 14 or packet[9] != IPPROTO_TCP:
            return None
        if struct.unpack_from("!H", packet, 6)[0] & 0x1FFF:
            return None
        tcp = ihl
        family, source = 4, packet[12:16]
    elif version == 6:
        if len(packet) < 40:
            return None
        following, tcp = packet[6], 40
        for _ in range(V6_WALKED):
            if following not in V6_EXTENSIONS or len(packet) < tcp + 2:
                break
            following, tcp = packet[tcp], tcp + (packet[tcp + 1] + 1) * 8
        if following != IPPROTO_TCP or len(packet) < tcp + 14:
            return None
        family, source = 6, packet[8:24]
    else:
        return None
    if packet[tcp + 13] & 0x12 != 0x02:
        return None
    return family, bytes(source), struct.unpack_from("!H", packet, tcp + 2)[0]


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


@dataclass(frozen=True, slots=True)
class SynSample:
    """What the sampler saw since its last read."""

    one_in: int  # 1-in-N in force at the end of the interval
    seconds: float
    ports: tuple[PortSample, ...]
    lost: int = 0  # samples the socket dropped (its queue was full)

    def port(self, port: int) -> PortSample | None:
        return next((p for p in self.ports if p.port == port), None)


class _Interval:
    """Counts per (port, prefix) for one interval, bounded."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.ports: dict[int, dict[str, list[int]]] = {}  # prefix -> [estimated SYNs, samples]
        self.evicted: dict[int, int] = {}  # prefixes dropped under the bound, per port
        self.untracked = 0

    def add(self, port: int, prefix: str, weight: int) -> None:
        counts = self.ports.get(port)
        if counts is None:
            if len(self.ports) >= MAX_PORTS:
                self.untracked += 1
                return
            counts = self.ports[port] = {}
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

    def summary(self, one_in: int, lost: int) -> SynSample:
        ports = []
        for port, counts in sorted(self.ports.items()):
            ranked = sorted(counts.items(), key=lambda x: (-x[1][0], x[0]))
            ports.append(PortSample(
                port=port, samples=sum(c[1] for c in counts.values()),
                syns=sum(c[0] for c in counts.values()),
                prefixes=tuple((p, c[0], c[1]) for p, c in ranked[:KEPT]),
                distinct=len(counts) + self.evicted.get(port, 0),
                singletons=sum(1 for c in counts.values() if c[1] == 1),
                doubletons=sum(1 for c in counts.values() if c[1] == 2)))
        return SynSample(one_in, round(time.monotonic() - self.started, 3), tuple(ports), lost)


def _attach(sock: socket.socket, one_in: int) -> None:
    prog = program(one_in)
    array = (ctypes.c_ubyte * (8 * len(prog))).from_buffer_copy(
        b"".join(struct.pack("HBBI", *ins) for ins in prog))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(array))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _open(netns: str, one_in: int) -> socket.socket:
    def make() -> socket.socket:
        # Python cannot bind a packet socket to "every interface" (ifindex 0), so the socket is
        # made with its protocol; what it queued before the filter was attached is discarded.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                             socket.htons(ETH_P_ALL))
        try:
            _attach(sock, one_in)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            while True:
                try:
                    sock.recv(1, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
        except BaseException:
            sock.close()
            raise
        return sock

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
                 target: int = TARGET_RATE) -> None:
        self.netns, self.v4_len, self.v6_len, self.target = netns, v4_len, v6_len, target
        self.one_in = 1
        self._sock = _open(netns, self.one_in)
        self._lock = threading.Lock()
        self._interval = _Interval()
        self._lost = 0
        self._prefixes: dict[tuple[int, bytes], str] = {}
        # the last filter swap: began, ended (ns, CLOCK_REALTIME), the 1-in-N before it
        self._switched = (0, 0, 1)
        self._stop = threading.Event()
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
            interval, self._interval = self._interval, _Interval()
            lost, self._lost = self._lost, 0
            return interval.summary(self.one_in, lost)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._sock.close()

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

    def _count(self, samples: Iterable[tuple[bytes, int]]) -> None:
        with self._lock:
            for packet, weight in samples:
                syn = parse_syn(packet)
                if syn is not None:
                    family, source, port = syn
                    self._interval.add(port, self._prefix(family, source), weight)

    def _drain(self) -> int:
        """Read every queued sample; returns how many there were.

        Each sample counts for the 1-in-N of the filter that kept it. A filter swapped while
        a burst is in flight leaves samples of the old filter queued behind the swap, so the
        kernel's receive timestamp (SO_TIMESTAMPNS, taken before the filter runs) tells which
        filter a sample went through."""
        samples: list[tuple[bytes, int]] = []
        started, ended, before = self._switched
        while True:
            try:
                data, ancillary, _flags, _addr = self._sock.recvmsg(
                    SNAPLEN, TIMESTAMP_SPACE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("SYN sampler: %s", exc)
                break
            weight = self.one_in
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                    sec, nsec = struct.unpack_from("qq", value)
                    at = sec * 1_000_000_000 + nsec
                    if at < started:
                        weight = before
                    elif at < ended:  # during the swap: most likely the filter that kept more
                        weight = min(before, self.one_in)
            samples.append((data, weight))
            if len(samples) >= 4 * self.target:
                break
        self._count(samples)
        return len(samples)

    def _stats_lost(self) -> int:
        try:
            _packets, drops = struct.unpack(
                "II", self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        except OSError:
            return 0
        return int(drops)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        window, seen = time.monotonic(), 0
        try:
            while not self._stop.is_set():
                if poller.poll(200):
                    self._stop.wait(LINGER)
                    seen += self._drain()
                elapsed = time.monotonic() - window
                # faster than the target: act at once (a flood's first second at 1 in 1 would
                # cost more than the rest of it); slower: wait a whole second before lowering N
                if (seen > self.target / 10 and elapsed >= 0.05) or elapsed >= 1.0:
                    lost = self._stats_lost()
                    rate = (seen + lost) / elapsed
                    want = next_one_in(self.one_in, rate, self.target)
                    if want < self.one_in and elapsed < 1.0:
                        want = self.one_in
                    if want != self.one_in:
                        log.debug("SYN sampler: %.0f samples/s at 1 in %d; now 1 in %d",
                                  rate, self.one_in, want)
                        started = time.time_ns()
                        _attach(self._sock, want)
                        # together, so a read() on the probe's thread weighs consistently
                        self._switched, self.one_in = (started, time.time_ns(), self.one_in), want
                    with self._lock:
                        self._lost += lost
                    window, seen = time.monotonic(), 0
        except Exception:
            log.exception("SYN sampler stopped")


def open_sampler(netns: str, v4_len: int, v6_len: int) -> SynSampler:
    """A running sampler, or ProbeError saying why not (no CAP_NET_RAW, no AF_PACKET)."""
    return SynSampler(netns, v4_len, v6_len).start()

