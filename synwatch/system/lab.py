"""A throwaway SYN-flood lab on this kernel, for `synwatch try` and for the test suite.

Two network namespaces joined by a veth pair. Forged sources are routed back into the client
namespace, never on the veth's own subnet (where the server would ask for them by ARP and get no
answer): the SYN-ACKs go out and are lost as on the internet, request sockets stay in SYN-RECV,
and the kernel prints its real SYN-flood line. Everything is removed on exit, also on failure;
traffic never leaves the namespaces made here.
"""

from __future__ import annotations

import os
import random
import re
import socket
import struct
import subprocess
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

SERVER_IP = "10.231.0.1"
CLIENT_IP = "10.231.0.2"
SPOOF_NET = "10.232"  # sources 10.232.x.y, routed back into the client namespace
SERVER_IP6 = "fd31::1"
CLIENT_IP6 = "fd31::2"
SPOOF_NET6 = "fd32"  # sources fd32:..., routed back into the client namespace
IPV6_HDRINCL = 36  # linux/in6.h

_FLOOD_PORT = re.compile(r"SYN flooding on port (?:\S*:)?(\d+)\.")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


@dataclass(frozen=True)
class NamespacePair:
    tag: str
    server_ns: str
    client_ns: str

    @property
    def server_dev(self) -> str:
        return f"sw{self.tag}s"

    @property
    def client_dev(self) -> str:
        return f"sw{self.tag}c"


def make_pair(tag: str, prefix: str = "swt") -> NamespacePair:
    """The two namespaces, their veth pair and routes (IPv4 and IPv6); ``remove_pair`` undoes
    it. A half-made pair is removed before the error goes on."""
    pair = NamespacePair(tag, f"{prefix}-{tag}-s", f"{prefix}-{tag}-c")
    try:
        sh("ip", "netns", "add", pair.server_ns)
        sh("ip", "netns", "add", pair.client_ns)
        sh("ip", "link", "add", pair.server_dev, "netns", pair.server_ns, "type", "veth", "peer",
           "name", pair.client_dev, "netns", pair.client_ns)
        for ns, dev, ip in ((pair.server_ns, pair.server_dev, SERVER_IP),
                            (pair.client_ns, pair.client_dev, CLIENT_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # A veth has no queue: without one, bursts of SYN-ACK retransmits are dropped and the
        # kernel discards the request sockets whose retransmit failed.
        sh("ip", "netns", "exec", pair.server_ns, "tc", "qdisc", "add", "dev", pair.server_dev,
           "root", "pfifo", "limit", "200000")
        sh("ip", "-n", pair.server_ns, "route", "add", f"{SPOOF_NET}.0.0/16", "via", CLIENT_IP)
        for ns, dev, ip in ((pair.server_ns, pair.server_dev, SERVER_IP6),
                            (pair.client_ns, pair.client_dev, CLIENT_IP6)):
            sh("ip", "-n", ns, "-6", "addr", "add", f"{ip}/64", "dev", dev, "nodad")
        sh("ip", "-n", pair.server_ns, "-6", "route", "add", f"{SPOOF_NET6}::/16", "via",
           CLIENT_IP6)
    except BaseException:
        remove_pair(pair)
        raise
    return pair


def remove_pair(pair: NamespacePair) -> None:
    """Deleting a namespace deletes its end of the veth, and with it the other end."""
    for ns in (pair.server_ns, pair.client_ns):
        sh("ip", "netns", "del", ns, check=False)


@contextmanager
def namespace_pair(tag: str, prefix: str = "swt") -> Iterator[NamespacePair]:
    pair = make_pair(tag, prefix)
    try:
        yield pair
    finally:
        remove_pair(pair)


def ports_in_kernel_log() -> set[int]:
    """Ports the kernel's log already names this boot (the kmsg ring, and the journal, which
    keeps what the ring has lost): a line naming an earlier flood's port must not be mistaken
    for a new one's."""
    text = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        fd = None
    if fd is not None:
        try:
            while True:
                try:
                    text.append(os.read(fd, 8192).decode("utf-8", "replace"))
                except BrokenPipeError:  # overwritten while we read: read on
                    continue
                except BlockingIOError:
                    break
        finally:
            os.close(fd)
    with suppress(OSError, subprocess.TimeoutExpired):  # no journal: the ring is all there is
        text.append(subprocess.run(["journalctl", "-k", "-b", "-o", "cat", "--no-pager"],
                                   capture_output=True, text=True, timeout=60,
                                   check=False).stdout)
    return {int(m) for m in _FLOOD_PORT.findall("\n".join(text))}


def fresh_port(taken: set[int]) -> int:
    """A port in 20000-60000 that is not in ``taken`` (which it joins)."""
    while True:
        port = random.randint(20000, 60000)
        if port not in taken:
            taken.add(port)
            return port


def listener_code(port: int, backlog: int, address: str = "0.0.0.0",
                  accepts: bool = False) -> str:
    """Python for a listener (``accepts``: accepting and closing every connection; else never
    calling accept()); it prints "listening" once bound. "::" is dual-stack."""
    family = "AF_INET6" if ":" in address else "AF_INET"
    serve = ("while True:\n    c, _ = s.accept()\n    c.close()" if accepts
             else "time.sleep(3600)")
    return (f"import socket, time\n"
            f"s = socket.socket(socket.{family}, socket.SOCK_STREAM)\n"
            f"s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(({address!r}, {port}))\n"
            f"s.listen({backlog})\n"
            f"print('listening', flush=True)\n{serve}\n")


def burst_code(server: str, port: int, established: int, attempts: int, *,
               spacing: float = 0.005, hold: float = 2.0) -> str:
    """Python for real clients: ``established`` connections one after the other, then
    ``attempts`` non-blocking connects ``spacing`` apart, all held open for ``hold`` seconds
    (their SYNs are retransmitted meanwhile), then closed."""
    return textwrap.dedent(f"""
        import socket, time
        held = []
        for _ in range({established}):
            s = socket.create_connection(({server!r}, {port}), timeout=5)
            held.append(s)
        for _ in range({attempts}):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(({server!r}, {port}))
            held.append(s)
            time.sleep({spacing})
        time.sleep({hold})
    """)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def syn_packet(src: str, dst: str, sport: int, dport: int) -> bytes:
    """An IPv4 SYN from ``src`` (any address: the sender's raw socket writes the header)."""
    seq = random.getrandbits(32)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), random.getrandbits(16), 0, 64, 6,
                     0, socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + tcp


def syn_packet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    seq = random.getrandbits(32)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    pseudo = s + d + struct.pack("!I3xB", len(tcp), 6)
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    return struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, s, d) + tcp


def send_syns(dst: str, dport: int, sources: list[str], rate: float = 0) -> None:
    """Runs inside the client namespace: one raw SYN per source address, ``rate`` a second
    (0: as fast as the server side drains them)."""
    v6 = ":" in dst
    raw = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                        socket.IPPROTO_RAW)
    if v6:
        raw.setsockopt(socket.IPPROTO_IPV6, IPV6_HDRINCL, 1)
    start = time.monotonic()
    with raw:
        for i, src in enumerate(sources):
            sport = random.randint(1024, 65535)
            packet = syn_packet6(src, dst, sport, dport) if v6 else syn_packet(src, dst, sport,
                                                                              dport)
            raw.sendto(packet, (dst, 0))
            if rate:
                time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
            elif i % 200 == 199:
                time.sleep(0.001)  # let the server side drain its softirq backlog
