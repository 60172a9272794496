"""The classic BPF program of the SYN sampler, and the same rules in Python.

The program runs on SOCK_DGRAM packets, which start at the network header (af_packet.c
packet_rcv pulls the link header): it keeps inbound TCP SYNs without ACK and ACKs without SYN
or RST (a forged source never sends one: it never saw the SYN-ACK), IPv4 (non-first
fragments skipped) and IPv6 (up to two hop-by-hop, routing or destination-options headers
walked, fragments skipped), skips PACKET_OUTGOING and whatever comes in on lo, and keeps 1 in N
at random with the ancillary load SKF_AD_RANDOM then ``mod N``
(Documentation/networking/filter.rst; docs/kernel.md §6). ``parse_packet`` reads a kept packet
with the same rules.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from typing import Final, NamedTuple

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
SKF_AD_PROTOCOL, SKF_AD_PKTTYPE, SKF_AD_IFINDEX, SKF_AD_RANDOM = 0, 4, 8, 56
LOOPBACK_IFINDEX = 1  # lo is interface 1 in every network namespace (net/core/dev.c)
PACKET_OTHERHOST, PACKET_OUTGOING = 3, 4
ETH_P_ALL, ETH_P_IP, ETH_P_IPV6 = 0x0003, 0x0800, 0x86DD
SO_ATTACH_FILTER = 26
IPPROTO_TCP = 6
V6_EXTENSIONS = (0, 43, 60)  # hop-by-hop, routing, destination options: walked
V6_WALKED = 2  # extension headers walked before giving up
V4_MAPPED = b"\x00" * 10 + b"\xff\xff"  # counted as IPv4 by prefix_of: never cached


SYN, RST, ACK = 0x02, 0x04, 0x10  # TCP flags (RFC 9293 §3.1)

MAX_ONE_IN: Final = 1 << 20
SNAPLEN: Final = 128  # IPv6 + two small extension headers + the TCP ports and flags

Instruction = tuple[int, int, int, int]  # code, jt, jf, k (struct sock_filter)


class Packet(NamedTuple):
    """What the sampler reads of a kept packet."""

    family: int
    source: bytes  # the source address, 4 or 16 bytes
    port: int  # the destination port: the listener's
    syn: bool  # a SYN without ACK; else an ACK without SYN or RST (the source completed)


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
    """The classic BPF filter: inbound TCP SYN without ACK, and ACK without SYN or RST (a
    handshake's last packet, data, FIN: what only a source that saw our SYN-ACK sends), kept
    1 in ``one_in`` at random."""
    if not 1 <= one_in <= MAX_ONE_IN:
        raise ValueError(f"one_in must be from 1 to {MAX_ONE_IN}")
    jeq, jset = BPF_JMP | BPF_JEQ | BPF_K, BPF_JMP | BPF_JSET | BPF_K
    lines: list[Line] = [
        ("ld pkttype", BPF_LD | BPF_W | BPF_ABS, None, None, SKF_AD_OFF + SKF_AD_PKTTYPE),
        ("jeq outgoing", jeq, "drop", None, PACKET_OUTGOING),
        ("jeq otherhost", jeq, "drop", None, PACKET_OTHERHOST),  # a bridge's, a promisc NIC's
        # what comes in on lo never crossed an interface from outside: any local user can
        # forge its source (IPV6_FREEBIND), so it is never a ban's evidence
        ("ld ifindex", BPF_LD | BPF_W | BPF_ABS, None, None, SKF_AD_OFF + SKF_AD_IFINDEX),
        ("jeq loopback", jeq, "drop", None, LOOPBACK_IFINDEX),
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
        ("and #syn|rst|ack", BPF_ALU | BPF_AND | BPF_K, None, None, SYN | RST | ACK),
        ("jeq syn", jeq, "keep", None, SYN),
        ("jeq ack", jeq, "keep", "drop", ACK),
        "keep",
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


def parse_packet(packet: bytes | memoryview) -> Packet | None:
    """An IPv4 or IPv6 TCP SYN without ACK, or ACK without SYN or RST, read with the filter's
    own rules; None for anything else. Every offset is checked. A memoryview is read in place
    (a frame of the receive ring): only the source address is copied."""
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
    flags = packet[tcp + 13] & (SYN | RST | ACK)
    if flags not in (SYN, ACK):
        return None
    return Packet(family, bytes(source), struct.unpack_from("!H", packet, tcp + 2)[0],
                  flags == SYN)


def parse_syn(packet: bytes) -> tuple[int, bytes, int] | None:
    """(family, source address bytes, destination port) of a SYN without ACK, else None."""
    got = parse_packet(packet)
    return (got.family, got.source, got.port) if got is not None and got.syn else None


def attach_filter(sock: socket.socket, one_in: int) -> None:
    prog = program(one_in)
    array = (ctypes.c_ubyte * (8 * len(prog))).from_buffer_copy(
        b"".join(struct.pack("HBBI", *ins) for ins in prog))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(array))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
