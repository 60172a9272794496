"""The SYN sampler: its classic BPF filter run on recorded packets by a small cBPF interpreter
(pure), its parser fuzzed, and the real thing in a lab namespace."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synwatch.probes import sampled, synfilter, synring, synsample
from synwatch.probes.sampled import Interval
from synwatch.probes.synfilter import (
    ETH_P_IP,
    ETH_P_IPV6,
    PACKET_OUTGOING,
    SNAPLEN,
    parse_packet,
    parse_syn,
    program,
)
from synwatch.probes.synsample import next_one_in

PACKET_HOST = 0


def run_cbpf(prog: list[tuple[int, int, int, int]], packet: bytes, *, protocol: int,
             pkttype: int = PACKET_HOST, rand: int = 0, ifindex: int = 2) -> int:
    """What the kernel's classic BPF interpreter returns for ``packet`` (net/core/filter.c
    semantics for the instructions the sampler uses; an out-of-range load returns 0)."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    ancillary = {synfilter.SKF_AD_OFF + synfilter.SKF_AD_PKTTYPE: pkttype,
                 synfilter.SKF_AD_OFF + synfilter.SKF_AD_PROTOCOL: protocol,
                 synfilter.SKF_AD_OFF + synfilter.SKF_AD_IFINDEX: ifindex,
                 synfilter.SKF_AD_OFF + synfilter.SKF_AD_RANDOM: rand}
    size = {0x00: 4, 0x08: 2, 0x10: 1}

    def load(offset: int, width: int) -> int | None:
        if offset < 0 or offset + width > len(packet):
            return None
        return int.from_bytes(packet[offset:offset + width], "big")

    while True:
        code, jt, jf, k = prog[pc]
        signed_k = k - (1 << 32) if k >= 1 << 31 else k
        cls, pc = code & 0x07, pc + 1
        if cls == synfilter.BPF_LD:
            mode = code & 0xE0
            if mode == synfilter.BPF_ABS and signed_k < 0:
                a = ancillary[signed_k]
            elif mode in (synfilter.BPF_ABS, synfilter.BPF_IND):
                got = load(signed_k + (x if mode == synfilter.BPF_IND else 0), size[code & 0x18])
                if got is None:
                    return 0
                a = got
            elif mode == synfilter.BPF_MEM:
                a = mem[k]
            else:
                a = k
        elif cls == synfilter.BPF_LDX:
            mode = code & 0xE0
            if mode == synfilter.BPF_MSH:
                got = load(k, 1)
                if got is None:
                    return 0
                x = (got & 0xF) * 4
            elif mode == synfilter.BPF_MEM:
                x = mem[k]
            else:
                x = k
        elif cls == synfilter.BPF_ST:
            mem[k] = a
        elif cls == synfilter.BPF_ALU:
            operand = x if code & synfilter.BPF_X else k
            op = code & 0xF0
            if op == synfilter.BPF_ADD:
                a = (a + operand) & 0xFFFFFFFF
            elif op == synfilter.BPF_AND:
                a &= operand
            elif op == synfilter.BPF_LSH:
                a = (a << operand) & 0xFFFFFFFF
            elif op == synfilter.BPF_MOD:
                a %= operand
            else:
                raise AssertionError(f"ALU op {op:#x} not modelled")
        elif cls == synfilter.BPF_JMP:
            op = code & 0xF0
            if op == synfilter.BPF_JA:
                pc += k
            elif op == synfilter.BPF_JEQ:
                pc += jt if a == k else jf
            elif op == synfilter.BPF_JSET:
                pc += jt if a & k else jf
            else:
                raise AssertionError(f"jump {op:#x} not modelled")
        elif cls == synfilter.BPF_RET:
            return k
        elif cls == synfilter.BPF_MISC:
            if code & 0xF8 == synfilter.BPF_TXA:
                a = x
            else:
                x = a


def tcp(flags: int, dport: int = 443, options: bytes = b"") -> bytes:
    offset = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, offset << 4, flags, 64240, 0, 0) + \
        options


def ipv4(payload: bytes, src: str = "198.51.100.7", proto: int = 6, frag: int = 0,
         options: bytes = b"") -> bytes:
    ihl = (20 + len(options)) // 4
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + len(payload), 1,
                       frag, 64, proto, 0, socket.inet_aton(src),
                       socket.inet_aton("192.0.2.1")) + options + payload


def ipv6(payload: bytes, src: str = "2001:db8:5::9", next_header: int = 6,
         extensions: list[tuple[int, bytes]] | None = None) -> bytes:
    """``extensions``: (this header's type, its body after the two-byte head) in order."""
    chain = b""
    headers = extensions or []
    first = headers[0][0] if headers else next_header
    for i, (_, body) in enumerate(headers):
        following = headers[i + 1][0] if i + 1 < len(headers) else next_header
        full = bytes([following, 0]) + body
        full += b"\0" * (-len(full) % 8)
        chain += bytes([full[0], len(full) // 8 - 1]) + full[2:]
    return struct.pack("!IHBB16s16s", 6 << 28, len(chain) + len(payload), first, 64,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, "2001:db8::1")) + chain + payload


SYN, SYN_ACK, ACK, RST = 0x02, 0x12, 0x10, 0x04
HOP, ROUTING, DEST, FRAGMENT = 0, 43, 60, 44

# (what it is, packet, its ethertype, its pkttype, sampled?)
RECORDED = [
    ("IPv4 SYN", ipv4(tcp(SYN, 80)), ETH_P_IP, PACKET_HOST, (4, "198.51.100.7", 80)),
    ("IPv4 SYN with TCP options", ipv4(tcp(SYN, 80, b"\x02\x04\x05\xb4" * 5)), ETH_P_IP,
     PACKET_HOST, (4, "198.51.100.7", 80)),
    ("IPv4 SYN with IP options", ipv4(tcp(SYN, 8080), options=b"\x01" * 8), ETH_P_IP,
     PACKET_HOST, (4, "198.51.100.7", 8080)),
    ("IPv4 SYN-ACK", ipv4(tcp(SYN_ACK)), ETH_P_IP, PACKET_HOST, None),
    # an ACK without SYN or RST: the source completed a handshake (kept, as not a SYN)
    ("IPv4 ACK", ipv4(tcp(ACK)), ETH_P_IP, PACKET_HOST, (4, "198.51.100.7", 443, False)),
    ("IPv4 FIN-ACK", ipv4(tcp(ACK | 0x01)), ETH_P_IP, PACKET_HOST,
     (4, "198.51.100.7", 443, False)),
    ("IPv4 PSH-ACK with data", ipv4(tcp(ACK | 0x08, 80, b"GET / HTTP/1.1\r\n")), ETH_P_IP,
     PACKET_HOST, (4, "198.51.100.7", 80, False)),
    ("IPv4 RST", ipv4(tcp(RST)), ETH_P_IP, PACKET_HOST, None),
    ("IPv4 RST-ACK", ipv4(tcp(RST | ACK)), ETH_P_IP, PACKET_HOST, None),
    ("outgoing IPv4 ACK", ipv4(tcp(ACK)), ETH_P_IP, PACKET_OUTGOING, None),
    ("IPv4 SYN+ECN flags", ipv4(tcp(SYN | 0xC0)), ETH_P_IP, PACKET_HOST,
     (4, "198.51.100.7", 443)),
    ("outgoing IPv4 SYN", ipv4(tcp(SYN)), ETH_P_IP, PACKET_OUTGOING, None),
    ("another host's IPv4 SYN (a bridge, a promiscuous NIC)", ipv4(tcp(SYN)), ETH_P_IP, 3, None),
    ("IPv4 UDP", ipv4(tcp(SYN), proto=17), ETH_P_IP, PACKET_HOST, None),
    ("IPv4 non-first fragment", ipv4(tcp(SYN), frag=0x0010), ETH_P_IP, PACKET_HOST, None),
    ("IPv4 first fragment (MF set)", ipv4(tcp(SYN), frag=0x2000), ETH_P_IP, PACKET_HOST,
     (4, "198.51.100.7", 443)),
    ("IPv4 truncated before the flags", ipv4(tcp(SYN))[:33], ETH_P_IP, PACKET_HOST, None),
    ("IPv6 SYN", ipv6(tcp(SYN, 443)), ETH_P_IPV6, PACKET_HOST, (6, "2001:db8:5::9", 443)),
    ("IPv6 SYN-ACK", ipv6(tcp(SYN_ACK)), ETH_P_IPV6, PACKET_HOST, None),
    ("IPv6 ACK", ipv6(tcp(ACK, 443)), ETH_P_IPV6, PACKET_HOST, (6, "2001:db8:5::9", 443, False)),
    ("outgoing IPv6 SYN", ipv6(tcp(SYN)), ETH_P_IPV6, PACKET_OUTGOING, None),
    ("IPv6 SYN behind hop-by-hop", ipv6(tcp(SYN, 22), extensions=[(HOP, b"\x01\x04" + b"\0" * 4)]),
     ETH_P_IPV6, PACKET_HOST, (6, "2001:db8:5::9", 22)),
    ("IPv6 SYN behind hop-by-hop and destination options",
     ipv6(tcp(SYN, 22), extensions=[(HOP, b"\0" * 6), (DEST, b"\0" * 14)]), ETH_P_IPV6,
     PACKET_HOST, (6, "2001:db8:5::9", 22)),
    ("IPv6 SYN behind three extension headers (not walked)",
     ipv6(tcp(SYN), extensions=[(HOP, b"\0" * 6), (DEST, b"\0" * 6), (ROUTING, b"\0" * 6)]),
     ETH_P_IPV6, PACKET_HOST, None),
    ("IPv6 fragment", ipv6(tcp(SYN), extensions=[(FRAGMENT, b"\0" * 6)]), ETH_P_IPV6,
     PACKET_HOST, None),
    ("IPv6 UDP", ipv6(tcp(SYN), next_header=17), ETH_P_IPV6, PACKET_HOST, None),
    ("ARP", b"\x00\x01\x08\x00\x06\x04\x00\x01" + b"\0" * 20, 0x0806, PACKET_HOST, None),
    ("IPv4 ethertype but IPv6 bytes", ipv6(tcp(SYN)), ETH_P_IP, PACKET_HOST, None),
]


@pytest.mark.parametrize(("what", "packet", "protocol", "pkttype", "want"), RECORDED,
                         ids=[r[0] for r in RECORDED])
def test_filter_and_parser_agree_on_recorded_packets(what: str, packet: bytes, protocol: int,
                                                     pkttype: int, want: object) -> None:
    kept = run_cbpf(program(1), packet, protocol=protocol, pkttype=pkttype)
    assert kept == (SNAPLEN if want else 0), what
    if want is None:
        if pkttype == PACKET_HOST and protocol in (ETH_P_IP, ETH_P_IPV6) and (
                packet[0] >> 4 == (4 if protocol == ETH_P_IP else 6)):
            assert parse_packet(packet) is None, what
        return
    got = parse_packet(packet[:SNAPLEN])
    assert got is not None, what
    af = socket.AF_INET if got.family == 4 else socket.AF_INET6
    assert (got.family, socket.inet_ntop(af, got.source), got.port) == want[:3]
    assert got.syn == (len(want) == 3), what
    assert (parse_syn(packet[:SNAPLEN]) is not None) == got.syn


def test_what_comes_in_on_loopback_is_never_sampled() -> None:
    """A local user can bind any source (IPV6_FREEBIND) and connect over lo: never evidence."""
    for packet, protocol in ((ipv4(tcp(SYN)), ETH_P_IP), (ipv6(tcp(SYN)), ETH_P_IPV6),
                             (ipv4(tcp(ACK)), ETH_P_IP)):
        assert run_cbpf(program(1), packet, protocol=protocol, ifindex=2) == SNAPLEN
        assert run_cbpf(program(1), packet, protocol=protocol, ifindex=1) == 0


def test_one_in_n_keeps_only_where_the_random_number_divides() -> None:
    packet = ipv4(tcp(SYN))
    prog = program(7)
    kept = [r for r in range(70)
            if run_cbpf(prog, packet, protocol=ETH_P_IP, rand=r) == SNAPLEN]
    assert kept == list(range(0, 70, 7))
    assert run_cbpf(prog, ipv4(tcp(SYN_ACK)), protocol=ETH_P_IP, rand=0) == 0


def test_program_bounds() -> None:
    with pytest.raises(ValueError, match="one_in"):
        program(0)
    assert len(program(1)) < len(program(2))  # no random load when every SYN is kept
    assert all(0 <= jt < 256 and 0 <= jf < 256 for _, jt, jf, _ in program(1000))


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=200))
def test_parser_takes_any_bytes(data: bytes) -> None:
    got = parse_syn(data)
    assert got is None or (got[0] in (4, 6) and 0 <= got[2] < 65536
                           and len(got[1]) == (4 if got[0] == 4 else 16))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([ETH_P_IP, ETH_P_IPV6]))
def test_filter_and_parser_agree_on_any_bytes(data: bytes, protocol: int) -> None:
    """Whatever the kernel keeps, the parser reads as a SYN, and the other way round (for
    packets whose version matches their ethertype, as the kernel guarantees)."""
    if not data or data[0] >> 4 != (4 if protocol == ETH_P_IP else 6):
        return
    kept = run_cbpf(program(1), data, protocol=protocol) == SNAPLEN
    assert kept == (parse_packet(data) is not None)


def test_sampling_rate_follows_the_flood() -> None:
    assert next_one_in(1, 500) == 1
    assert next_one_in(1, 30_000) >= 60  # down to about half the target (1,000 a second)
    assert next_one_in(18, 100) == 4  # the flood slowed: ~1,800 SYN/s, 1 in 4
    assert next_one_in(18, 10) == 1
    assert next_one_in(18, 0) == 1
    assert next_one_in(synfilter.MAX_ONE_IN, 1e9) == synfilter.MAX_ONE_IN


def test_interval_counts_are_weighted_and_bounded() -> None:
    iv = Interval()
    iv.add(80, "10.0.1.0/24", 5)
    iv.add(80, "10.0.1.0/24", 5)
    iv.add(80, "10.0.2.0/24", 5)
    iv.add(443, "10.0.3.0/24", 1)
    s = iv.summary(5)
    p80 = s.port(80)
    assert p80 is not None
    assert (p80.samples, p80.syns, p80.distinct, p80.singletons, p80.doubletons) == (3, 15, 2, 1, 1)
    assert p80.prefixes[0] == ("10.0.1.0/24", 10, 2)
    for i in range(sampled.MAX_PREFIXES + 1):
        iv.add(22, f"10.{i // 256}.{i % 256}.0/24", 1)
    p22 = iv.summary(1).port(22)
    assert p22 is not None
    assert p22.distinct == sampled.MAX_PREFIXES + 1  # evicted ones still counted
    assert len(p22.prefixes) == sampled.KEPT


def test_interval_keeps_flooding_addresses_and_never_forgets_a_completing_one() -> None:
    iv = Interval(known=frozenset({443}))
    flood, client = bytes([10, 0, 1, 5]), bytes([10, 0, 1, 9])
    for _ in range(3):
        iv.add(80, "10.0.1.0/24", 4, flood)
    iv.add(80, "10.0.1.0/24", 4, client)
    iv.add_completed(80, client, "10.0.1.0/24", 4)  # a port with SYNs this interval
    iv.add_completed(443, client, "10.0.1.0/24", 4)  # a port that had SYNs in the last one
    iv.add_completed(51000, client, "10.0.1.0/24", 4)  # a reply to our own connection: not kept
    p80 = iv.summary(4).port(80)
    assert p80 is not None
    assert p80.addresses == (("10.0.1.5", 12), ("10.0.1.9", 4))
    assert p80.completed == (("10.0.1.9/32", 4),)
    assert iv.summary(4).port(51000) is None
    # past the bound, a completing address is kept as its prefix, never dropped
    for i in range(sampled.MAX_ADDRESSES + 10):
        iv.add_completed(80, bytes([10, 1, i // 256, i % 256]), f"10.1.{i // 256}.0/24", 1)
    completed = dict(iv.summary(1).port(80).completed)  # type: ignore[union-attr]
    assert sum(completed.values()) == 4 + sampled.MAX_ADDRESSES + 10
    assert "10.1.16.0/24" in completed  # the last ones, folded


@pytest.mark.needs_root
def test_real_sampler_counts_a_lab_flood_by_port_and_prefix() -> None:
    from tests.support.lab import SPOOF_NET, lab, lab_port

    with lab() as the_lab:
        port = lab_port()
        the_lab.listen(port, backlog=16)
        sampler = synsample.SynSampler(the_lab.server_ns).start()
        assert sampler.mapped, "the receive ring, where this kernel has one"
        try:
            sources = [f"{SPOOF_NET}.5.{i % 250 + 1}" for i in range(3000)] + \
                      [f"{SPOOF_NET}.6.{i % 250 + 1}" for i in range(1000)]
            # 3,000 SYN/s: over the sampler's target, so it samples 1 in N with N near 6 and
            # the estimate's standard deviation stays near 3 %
            flood = the_lab.start_flood(port, len(sources), sources, rate=3000)
            assert flood.wait(timeout=60) == 0
            # the flood is over; read until the sampler is drained too
            deadline, seen, idle = time.monotonic() + 10, [], 0
            while time.monotonic() < deadline and idle < 3:
                got = sampler.read().port(port)
                seen += [got] if got else []
                idle = 0 if got or not seen else idle + 1
                time.sleep(0.2)
        finally:
            sampler.stop()
    syns = sum(p.syns for p in seen)
    by_prefix: dict[str, int] = {}
    for p in seen:
        for prefix, n, _ in p.prefixes:
            by_prefix[prefix] = by_prefix.get(prefix, 0) + n
    # each sample counts for its 1-in-N: within 15 % (5 standard deviations)
    assert 3400 <= syns <= 4600, syns
    assert sum(p.samples for p in seen) < syns / 2, "N followed the rate: 1 in N, not every SYN"
    assert set(by_prefix) == {f"{SPOOF_NET}.5.0/24", f"{SPOOF_NET}.6.0/24"}
    share = by_prefix[f"{SPOOF_NET}.5.0/24"] / syns
    assert 0.65 <= share <= 0.85, share


def _blocked_without_timeout(tid: int) -> bool:
    """Is the thread in poll(2) with no timeout (/proc/TID/syscall: the number, then the
    arguments; ppoll's NULL timespec where poll is ppoll)?"""
    import platform
    from pathlib import Path

    fields = Path(f"/proc/self/task/{tid}/syscall").read_text().split()
    if not fields or fields[0] in ("running", "-1"):
        return False
    nr, args = int(fields[0]), [int(a, 16) for a in fields[1:7]]
    poll, ppoll = {"x86_64": (7, 271), "aarch64": (-1, 73)}[platform.machine()]
    return (nr == poll and args[2] & 0xFFFFFFFF == 0xFFFFFFFF) or (nr == ppoll and args[2] == 0)


class _RefusedMapping(mmap.mmap):
    def __new__(cls, *args: object, **kwargs: object) -> _RefusedMapping:
        raise OSError(errno.EPERM, "Operation not permitted")


@pytest.mark.needs_root
@pytest.mark.parametrize("how", ["ring", "recvmsg", "mapping refused"])
def test_an_idle_sampler_sleeps_until_a_syn_and_stops_at_once(
        how: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """No SYN at 1 in 1: the sampler's thread waits in poll(2) without a timeout (it woke
    five times a second), a SYN wakes it, and stop() wakes it to end; through the receive ring
    and without it. A ring the kernel set up but that cannot be mapped is taken down again:
    the SYNs come by recvmsg, and that is said once, at debug."""
    import threading
    from types import SimpleNamespace

    from tests.support.lab import SPOOF_NET, lab, lab_port
    from tests.support.wait import eventually

    if how == "mapping refused":
        monkeypatch.setattr(synring, "mmap", SimpleNamespace(**{**vars(mmap),
                                                                "mmap": _RefusedMapping}))
        synsample._without_ring.cache_clear()
    with lab() as the_lab, caplog.at_level(logging.DEBUG, logger=synsample.__name__):
        port = lab_port()
        the_lab.listen(port, backlog=16)
        sampler = synsample.SynSampler(the_lab.server_ns, ring=how != "recvmsg").start()
        assert sampler.mapped == (how == "ring")
        if how == "mapping refused":
            synsample.SynSampler(the_lab.server_ns).stop()  # a second one says nothing more
            said = [r.getMessage() for r in caplog.records if "no receive ring" in r.getMessage()]
            assert said == ["SYN sampler: no receive ring (Operation not permitted): one "
                            "recvmsg a sample"], said
        try:
            [tid] = [t.native_id for t in threading.enumerate()
                     if t.name == "syn sampler" and t.native_id is not None]
            eventually(lambda: _blocked_without_timeout(tid), "poll(2) without a timeout", 5)
            the_lab.flood(port, 20, [f"{SPOOF_NET}.7.{i}" for i in range(1, 21)])
            seen: list[int] = []

            def all_sampled() -> bool:
                got = sampler.read().port(port)
                seen.append(got.syns if got is not None else 0)
                return sum(seen) == 20

            eventually(all_sampled, "the SYNs sampled", 10, seen=lambda: seen)
            eventually(lambda: _blocked_without_timeout(tid), "asleep again", 5)
        finally:
            started = time.monotonic()
            sampler.stop()
            stopped = time.monotonic() - started
    assert stopped < 1.0, f"stop() took {stopped:.2f} s"


def test_a_late_sample_weighs_the_filter_that_kept_it() -> None:
    """Samples queue behind filter swaps, several deep when the reader falls behind: each
    weighs the 1-in-N in force when the kernel received it."""
    swaps = [(100, 110, 1, 50), (200, 210, 50, 400), (300, 305, 400, 90)]
    assert sampled.weight_at(swaps, 99, 90) == 1  # before every swap
    assert sampled.weight_at(swaps, 105, 90) == 1  # during a swap: the smaller N
    assert sampled.weight_at(swaps, 150, 90) == 50
    assert sampled.weight_at(swaps, 205, 90) == 50
    assert sampled.weight_at(swaps, 250, 90) == 400
    assert sampled.weight_at(swaps, 303, 90) == 90
    assert sampled.weight_at(swaps, 999, 90) == 90
    assert sampled.weight_at([], 5, 7) == 7


def test_dropped_samples_scale_the_estimates_up() -> None:
    iv = Interval()
    for i in range(100):
        iv.add(80, "10.0.0.0/24" if i % 4 else "10.0.1.0/24", 10)
    iv.lost, iv.lost_weight = 50, 500  # half as many again, unread
    port = iv.summary(10).port(80)
    assert port is not None
    assert (port.samples, port.syns) == (100, 1500)
    assert {p: n for p, n, _ in port.prefixes} == {"10.0.0.0/24": 1125, "10.0.1.0/24": 375}
    assert iv.summary(10).lost == 50


@pytest.mark.needs_root
def test_the_sampler_is_within_a_tenth_of_the_kernel_at_this_machines_limit() -> None:
    """trafgen on every core: the machine saturated, the sampler's thread starved as the flood
    starts (its socket drops samples), N swapped while samples queue behind the swaps. Its
    estimate stays within 10 % of the SYNs the kernel received, and of each /24's share."""
    from tests.support.lab import SPOOF_NET, lab, lab_port

    nets = (f"{SPOOF_NET}.5.0/24", f"{SPOOF_NET}.6.0/24")  # trafgen sends them in turn
    with lab() as the_lab:
        port = lab_port()
        the_lab.listen(port, backlog=1024)
        sampler = synsample.SynSampler(the_lab.server_ns).start()
        assert sampler.mapped
        seen: list[sampled.PortSample] = []
        try:
            before = the_lab.segments_in()
            flood = the_lab.trafgen_flood(port, 5, nets, cpus=os.cpu_count() or 1)
            while flood.poll() is None:
                time.sleep(0.5)  # the service's probe reads it about this often
                got = sampler.read().port(port)
                seen += [got] if got else []
            _, err = flood.communicate()
            assert flood.returncode == 124, err  # timeout ended it: it ran its time
            received = the_lab.segments_in() - before
            last = sampler.read().port(port)  # what was queued when the flood ended
            seen += [last] if last else []
        finally:
            sampler.stop()
    assert received > 100_000, f"{received} SYNs: trafgen did not flood"
    estimate = sum(p.syns for p in seen)
    assert 0.9 <= estimate / received <= 1.1, (estimate, received)
    by_prefix: dict[str, int] = {}
    for p in seen:
        for prefix, n, _ in p.prefixes:
            by_prefix[prefix] = by_prefix.get(prefix, 0) + n
    assert set(by_prefix) == set(nets)
    assert 0.45 <= by_prefix[nets[0]] / estimate <= 0.55, by_prefix


def _frame(ring: bytearray, index: int, packet: bytes, at: int, *,
           status: int = synring.TP_STATUS_USER, size: int = 256) -> None:
    """A frame as the kernel fills one for a SOCK_DGRAM socket (af_packet.c, tpacket_rcv):
    the tpacket2_hdr, then the packet at tp_net."""
    base, net = index * size, synring.tpacket_align(synring.tpacket_align(52)) + 16
    snaplen = min(len(packet), SNAPLEN)
    synring.HEADER.pack_into(ring, base, status, len(packet), snaplen, net, net,
                             at // 1_000_000_000, at % 1_000_000_000)
    ring[base + net:base + net + snaplen] = packet[:snaplen]


def test_the_ring_walk_takes_filled_frames_in_turn_and_gives_them_back() -> None:
    """The frames the kernel filled (TP_STATUS_USER) in the order it filled them, round the
    ring, each with its receive time; each frame given back (TP_STATUS_KERNEL) once read, the
    walk stopping at the first one the kernel has not filled (one it is still writing, when a
    later one is done already)."""
    size, frames = synring.frame_size(SNAPLEN), 4
    assert size == 256 and size % synring.TPACKET_ALIGNMENT == 0
    assert size >= synring.tpacket_align(52) + 16 + SNAPLEN  # the header, sockaddr_ll, packet
    memory = bytearray(size * frames)
    ring = synring.RxRing(memory, size, frames)
    assert ring.take(100) == []
    syn = ipv4(tcp(SYN, 80), src="198.51.100.7")
    ack = ipv6(tcp(ACK, 443), src="2001:db8:5::9")
    second = 1_700_000_000_000_000_000
    _frame(memory, 0, syn, second + 1)
    _frame(memory, 1, ack, second + 999_999_999)
    _frame(memory, 2, ipv4(tcp(SYN, 80), proto=17), second + 2_000_000_003)  # not TCP
    _frame(memory, 3, syn, second + 4, status=synring.TP_STATUS_KERNEL)  # still the kernel's
    got = ring.take(100)
    assert [at for _, at in got] == [second + 1, second + 999_999_999, second + 2_000_000_003]
    assert got[0][0] == parse_packet(syn) and got[0][0] is not None and got[0][0].syn
    assert got[1][0] == parse_packet(ack) and got[1][0] is not None and not got[1][0].syn
    assert got[2][0] is None
    statuses = [synring.STATUS.unpack_from(memory, i * size)[0] for i in range(frames)]
    assert statuses == [synring.TP_STATUS_KERNEL] * frames
    assert ring.next == 3
    # round the ring: frames 3, 0 and 1 filled since; at most `limit` taken at a time
    for index, at in ((3, 10), (0, 11), (1, 12)):
        _frame(memory, index, syn, second + at)
    assert [at - second for _, at in ring.take(2)] == [10, 11]
    assert ring.next == 1
    assert [at - second for _, at in ring.take(100)] == [12]
    assert ring.take(100) == []
    ring.close()
    assert ring.take(100) == []  # closed: nothing, and no error


def test_the_ring_reads_what_the_kernel_captured_of_a_frame() -> None:
    """tp_snaplen bytes at tp_net, never past the frame: a packet the filter cut at SNAPLEN
    (an IPv6 SYN behind long extension headers) is read as the kernel left it."""
    size = synring.frame_size(SNAPLEN)
    memory = bytearray(size * 2)
    long_chain = ipv6(tcp(SYN, 22), extensions=[(HOP, b"\0" * 62), (DEST, b"\0" * 46)])
    assert len(long_chain) > SNAPLEN
    _frame(memory, 0, long_chain, 5)
    # what an earlier, longer packet left in the frame past tp_snaplen: read, it would make the
    # cut packet a whole SYN
    net = synring.tpacket_align(synring.tpacket_align(52)) + 16
    memory[net:net + len(long_chain)] = long_chain
    assert net + len(long_chain) <= size and parse_packet(long_chain) is not None
    _frame(memory, 1, ipv6(tcp(SYN, 22), extensions=[(HOP, b"\0" * 6)]), 6)
    got = synring.RxRing(memory, size, 2).take(10)
    assert got[0] == (None, 5) and parse_packet(long_chain[:SNAPLEN]) is None
    assert got[1][0] is not None and got[1][0].port == 22


class _Dropping:
    """A packet socket whose statistics say ``drops`` more dropped samples at each look
    (PACKET_STATISTICS is reset as it is read), and takes any filter."""

    def __init__(self, drops: list[int]) -> None:
        self.drops = drops

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        return struct.pack("II", 0, self.drops.pop(0) if self.drops else 0)

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        pass


def test_samples_dropped_before_a_swap_weigh_the_filter_they_passed() -> None:
    """A flood's first burst at 1 in 1 fills the socket; the sampler thread looks at the
    drops, then swaps the filter, and may wait for the lock or the GIL in between while the
    full socket drops on: those drops passed 1 in 1, not the new filter."""
    import threading
    from collections import deque

    sampler = object.__new__(synsample.SynSampler)
    sampler.one_in, sampler.target = 1, synsample.TARGET_RATE
    sampler._sock = _Dropping([100, 5000])  # type: ignore[assignment]
    sampler._lock, sampler._interval, sampler._swaps = threading.Lock(), Interval(), deque()
    sampler._drained = sampler._weighed = 4000
    sampler._lost_weight = 0
    sampler._adapt(0.06)  # 4,000 samples in 60 ms: ~70,000 SYN/s
    assert sampler.one_in > 100
    sampler._take_drops()  # the probe's next read()
    assert (sampler._interval.lost, sampler._interval.lost_weight) == (5100, 5100)
