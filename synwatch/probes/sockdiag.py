"""Listeners and SYN-RECV request sockets through sock_diag netlink (inet_diag), stdlib only.

pyroute2 took 2.5 s and 340 MB for 60k sockets (docs/dependencies.md); this reader parses the
dump in place and aggregates SYN-RECV sources per listener port and source prefix as it goes,
so no per-socket object is ever built. Both families; ``::ffff:a.b.c.d`` sources count as IPv4.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from synwatch.errors import ProbeError

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_SYN_RECV, TCP_LISTEN = 3, 10
# states a connection reaches only once its handshake completed (include/net/tcp_states.h):
# ESTABLISHED, FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING
COMPLETED_STATES = sum(1 << s for s in (1, 4, 5, 6, 8, 9, 11))
MAX_PEERS = 4096  # peer addresses kept per listener port; past that, their /24 (/64)
INET_DIAG_SKMEMINFO, SK_MEMINFO_DROPS = 7, 8  # linux/inet_diag.h, linux/sock_diag.h
_RTA = struct.Struct("=HH")
_NLMSG = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI" "HH16s16sI8s")  # inet_diag_req_v2 with inet_diag_sockid
_MSG = struct.Struct("=BBBB" "HH16s16sI8s" "IIIII")  # inet_diag_msg
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
# A message is nlmsghdr + inet_diag_msg (88 bytes) + attributes; the local port is at byte 20,
# the remote address at byte 40.
_MIN_MSG = _NLMSG.size + _MSG.size
_DONE_SIZE = _NLMSG.size + 4


@dataclass(frozen=True, slots=True)
class Listener:
    family: int
    address: str
    port: int
    backlog: int  # sk_max_ack_backlog: min(listen() argument, somaxconn)
    accept_queue: int  # sk_ack_backlog: connections waiting for accept()
    # sk_drops: SYNs and final ACKs this listener dropped (tcp_listendrop(); accept-queue
    # overflow, a full SYN queue without cookies); cookies sent are not drops
    drops: int = 0


@dataclass(frozen=True, slots=True)
class SynRecvSummary:
    """Request sockets per listener (family, port), and per (family, port, source prefix).

    The family is the listener's: an IPv4 SYN to a dual-stack IPv6 listener is counted there,
    with its source as an IPv4 prefix.
    """

    per_listener: Counter[tuple[int, int]]
    per_prefix: Counter[tuple[int, int, str]]

    @property
    def total(self) -> int:
        return sum(self.per_listener.values())


def _dump(family: int, states: int, ext: int = 0) -> Iterator[bytes]:
    """The raw chunks of a sock_diag dump, as the kernel hands them over."""
    req = _REQ.pack(family, socket.IPPROTO_TCP, ext, 0, states, 0, 0, b"", b"", 0, b"")
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                           NETLINK_SOCK_DIAG)
    except OSError as exc:
        raise ProbeError("sock_diag", exc.strerror or str(exc)) from exc
    with nl:
        try:
            nl.sendto(_NLMSG.pack(_NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY,
                                  NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req, (0, 0))
            while True:
                data = nl.recv(1 << 20)
                yield data
                if _ends_dump(data):
                    return
        except OSError as exc:
            raise ProbeError("sock_diag", exc.strerror or str(exc)) from exc


def _ends_dump(data: bytes) -> bool:
    """Does this chunk end the dump? Raises on a netlink error. The common case (a chunk of
    same-size messages, maybe closed by NLMSG_DONE) is decided without walking it."""
    if len(data) >= _NLMSG.size:
        size, kind = _NLMSG.unpack_from(data, 0)[:2]
        if kind == SOCK_DIAG_BY_FAMILY and size >= _NLMSG.size and size % 4 == 0:
            rest = len(data) % size
            if rest == 0:
                return False
            if rest == _DONE_SIZE and _NLMSG.unpack_from(data, len(data) - rest)[:2] == (
                    _DONE_SIZE, NLMSG_DONE):
                return True
    return any(kind == NLMSG_DONE for kind, _ in _walk(data))


def _walk(data: bytes) -> Iterator[tuple[int, int]]:
    """(type, offset of the payload) of each netlink message in a chunk, up to NLMSG_DONE or a
    malformed header (both yielded, as the end of the dump); a netlink error raises."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, offset + _NLMSG.size)[0]
            raise ProbeError("sock_diag", f"netlink error {code}")
        if kind == NLMSG_DONE or length < _NLMSG.size:
            yield NLMSG_DONE, offset
            return
        yield kind, offset + _NLMSG.size
        offset += (length + 3) & ~3


def _messages(chunks: Iterable[bytes]) -> list[tuple[bytes, int]]:
    """(buffer, offset of an inet_diag_msg) for every socket in the dump."""
    return [(data, off) for data in chunks for kind, off in _walk(data)
            if kind == SOCK_DIAG_BY_FAMILY]


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def skmeminfo_drops(data: bytes, offset: int, end: int) -> int:
    """SK_MEMINFO_DROPS from the attributes between ``offset`` and ``end`` (0 without one);
    every length is checked, so a short or odd attribute ends the walk."""
    while offset + _RTA.size <= end:
        length, kind = _RTA.unpack_from(data, offset)
        if length < _RTA.size or offset + length > end:
            return 0
        if kind == INET_DIAG_SKMEMINFO and length >= _RTA.size + 4 * (SK_MEMINFO_DROPS + 1):
            return int(struct.unpack_from("=I", data, offset + _RTA.size
                                          + 4 * SK_MEMINFO_DROPS)[0])
        offset += (length + 3) & ~3
    return 0


def listeners() -> list[Listener]:
    out = []
    for family in (socket.AF_INET, socket.AF_INET6):
        chunks = _dump(family, 1 << TCP_LISTEN, 1 << (INET_DIAG_SKMEMINFO - 1))
        for data, off in _messages(chunks):
            fam, _state, _t, _r, sport, _dport, src, _dst, _if, _c, _exp, rq, wq, _uid, _ino = \
                _MSG.unpack_from(data, off)
            end = off - _NLMSG.size + _NLMSG.unpack_from(data, off - _NLMSG.size)[0]
            out.append(Listener(4 if fam == socket.AF_INET else 6, _address(fam, src),
                                socket.ntohs(sport), backlog=wq, accept_queue=rq,
                                drops=skmeminfo_drops(data, off + _MSG.size, min(end, len(data)))))
    return sorted(out, key=lambda li: (li.port, li.family, li.address))


def prefix_of(family: int, raw: bytes, v4_len: int = 24, v6_len: int = 64) -> str:
    """The ban-granularity prefix of a source address; v4-mapped IPv6 counts as IPv4."""
    if family == socket.AF_INET6 and raw[:12] == _V4_MAPPED:
        family, raw = socket.AF_INET, raw[12:16]
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Network((raw[:4], v4_len), strict=False))
    return str(ipaddress.IPv6Network((raw, v6_len), strict=False))


def _column(view: memoryview, offset: int, stride: int) -> bytes:
    """Byte ``offset`` of every message in ``view``, as one bytes object (C speed)."""
    return bytes(view[offset::stride])


def _chunk_keys(data: bytes, head: int) -> list[str]:
    """One hex key per socket in the chunk: its local port and the first ``head`` bytes of its
    remote address.

    Sixty thousand sockets must not become sixty thousand Python objects of each kind. Request
    sockets come as same-size messages (88 bytes, 96 with the mark attribute root gets), so the
    bytes that matter are pulled out column by column with strided slices, checked (every
    message the same size and type) and interleaved into fixed-size records, which bytes.hex()
    splits into one short string per socket, all in C. Other chunks are walked.
    """
    stride = _NLMSG.unpack_from(data, 0)[0] if len(data) >= _NLMSG.size else 0
    count = len(data) // stride if stride >= _MIN_MSG and stride % 4 == 0 else 0
    view = memoryview(data)[: count * stride]
    uniform = count > 0 and all(
        _column(view, i, stride) == bytes([value]) * count
        for i, value in enumerate(stride.to_bytes(4, "little")
                                  + SOCK_DIAG_BY_FAMILY.to_bytes(2, "little")))
    if not uniform:
        return [(buf[off + 4: off + 6] + buf[off + 24: off + 24 + head]).hex()
                for buf, off in _messages([data])]
    width = 2 + head
    records = bytearray(width * count)
    for j, offset in enumerate([20, 21, *range(40, 40 + head)]):  # local port, remote address
        records[j::width] = _column(view, offset, stride)
    return records.hex(" ", width).split()


def syn_recv(v4_len: int = 24, v6_len: int = 64) -> SynRecvSummary:
    """Whole-byte prefix lengths (/8, /16, /24; /32 ... /64 ...) key the count on raw bytes."""
    if v4_len % 8 or v6_len % 8:
        raise ValueError("prefix lengths must be multiples of 8")
    raw_counts: Counter[tuple[int, bytes, int, bytes]] = Counter()
    # IPv6 keeps the whole address, so v4-mapped sources can be told apart below
    for family, head in ((socket.AF_INET, v4_len // 8), (socket.AF_INET6, 16)):
        lfam = 4 if family == socket.AF_INET else 6
        keys: list[str] = []
        for data in _dump(family, 1 << TCP_SYN_RECV):
            keys.extend(_chunk_keys(data, head))
        for key, n in Counter(keys).items():
            raw = bytes.fromhex(key)
            sport, dst = raw[:2], raw[2:]
            if family == socket.AF_INET:
                raw_counts[(lfam, sport, 4, dst)] += n
            elif dst[:12] == _V4_MAPPED:
                raw_counts[(lfam, sport, 4, dst[12:12 + v4_len // 8])] += n
            else:
                raw_counts[(lfam, sport, 6, dst[: v6_len // 8])] += n
    per_listener: Counter[tuple[int, int]] = Counter()
    per_prefix: Counter[tuple[int, int, str]] = Counter()
    for (lfam, sport, fam, net), count in raw_counts.items():
        port = int.from_bytes(sport, "big")
        af = socket.AF_INET if fam == 4 else socket.AF_INET6
        full = net + b"\x00" * ((4 if fam == 4 else 16) - len(net))
        per_prefix[(lfam, port, prefix_of(af, full, v4_len, v6_len))] += count
        per_listener[(lfam, port)] += count
    return SynRecvSummary(per_listener, per_prefix)


def peers(ports: Iterable[int], v4_len: int = 24, v6_len: int = 64) -> dict[int, dict[str, int]]:
    """Per local port in ``ports``: the peers of its connections that completed a handshake
    (ESTABLISHED, TIME-WAIT, closing), address -> sockets, as networks ("/32", "/128"; past
    MAX_PEERS addresses a peer is kept as its /24 or /64, never dropped). Both families;
    ``::ffff:a.b.c.d`` peers count as IPv4."""
    wanted = {p.to_bytes(2, "big").hex() for p in ports}  # keys start with the local port
    out: dict[int, dict[str, int]] = {}
    if not wanted:
        return out
    raw: Counter[tuple[bytes, bytes]] = Counter()
    for family, head in ((socket.AF_INET, 4), (socket.AF_INET6, 16)):
        keys: list[str] = []
        for data in _dump(family, COMPLETED_STATES):
            keys.extend(k for k in _chunk_keys(data, head) if k[:4] in wanted)
        for key, n in Counter(keys).items():
            b = bytes.fromhex(key)
            addr = b[2:]
            if len(addr) == 16 and addr[:12] == _V4_MAPPED:
                addr = addr[12:]
            raw[(b[:2], addr)] += n
    for (sport, addr), n in sorted(raw.items(), key=lambda x: -x[1]):
        port = int.from_bytes(sport, "big")
        found = out.setdefault(port, {})
        af = socket.AF_INET if len(addr) == 4 else socket.AF_INET6
        key = (f"{socket.inet_ntop(af, addr)}/{len(addr) * 8}" if len(found) < MAX_PEERS
               else prefix_of(af, addr, v4_len, v6_len))
        found[key] = found.get(key, 0) + n
    return out
