"""A SYN-flood lab on the real kernel (docs/kernel.md §5: spoofed ranges are routed, never on-link).

Two network namespaces joined by a veth pair; a listener with a small backlog in the server
namespace; raw SYNs with spoofed sources from the client namespace. The server routes the spoofed
range back to the client namespace, which drops the SYN-ACKs, so request sockets stay in SYN-RECV
and the kernel prints its real SYN-flood line. Names are unique per lab; everything is removed
on exit, also when the test fails. Traffic never leaves the namespaces the lab made.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synwatch.system.lab import (  # noqa: F401 (the lab's names, for the tests and the benchmarks)
    CLIENT_IP,
    CLIENT_IP6,
    IPV6_HDRINCL,
    SERVER_IP,
    SERVER_IP6,
    SPOOF_NET,
    SPOOF_NET6,
    burst_code,
    fresh_port,
    listener_code,
    make_pair,
    ports_in_kernel_log,
    remove_pair,
    send_syns,
    sh,
    syn_packet,
    syn_packet6,
)

LAB_NAMESPACES = ("swt-", "swtry-")  # the lab's (lab() below) and `synwatch try`'s


def lab_namespaces(prefixes: tuple[str, ...] = LAB_NAMESPACES) -> list[str]:
    """The named namespaces there now whose names start with one of ``prefixes``."""
    run = Path("/run/netns")
    return sorted(p.name for p in run.iterdir() if p.name.startswith(prefixes)) \
        if run.is_dir() else []


_ports_given: set[int] = set()


def lab_port() -> int:
    """A listener port no kernel line of this boot names yet: /dev/kmsg and the journal keep
    the lines of earlier tests (and earlier runs)."""
    if not _ports_given:
        _ports_given.update(ports_in_kernel_log())
        _ports_given.add(0)  # read once, even when the log names none
    return fresh_port(_ports_given)


@dataclass
class Lab:
    tag: str
    server_ns: str
    client_ns: str
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    given: set[str] = field(default_factory=set)  # addresses given to the client namespace

    def in_server(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.server_ns, *argv)

    def track_connections(self) -> None:
        """Connection tracking in the server namespace, as ufw, firewalld or Docker have it:
        a `ct state` rule in a table of the lab's own (removed with the namespace)."""
        self.in_server("nft", "add", "table", "inet", "labtrack")
        self.in_server("nft", "add", "chain", "inet", "labtrack", "input",
                       "{ type filter hook input priority 0; }")
        self.in_server("nft", "add", "rule", "inet", "labtrack", "input", "ct", "state",
                       "established,related", "accept")

    def sysctl(self, name: str, value: str | int) -> None:
        self.in_server("sysctl", "-qw", f"{name}={value}")

    def listen(self, port: int, backlog: int = 8, address: str = "0.0.0.0") -> None:
        """A listener in the server namespace that never accepts ("::" is dual-stack)."""
        self._listening(listener_code(port, backlog, address))

    def _listening(self, code: str) -> None:
        """Run ``code`` in the server namespace until it prints "listening"; killed with the
        lab."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.server_ns, sys.executable, "-c",
                                 code], stdout=subprocess.PIPE, text=True)
        self.processes.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "listening"

    def serve(self, port: int, backlog: int = 128, address: str = "0.0.0.0") -> None:
        """A listener in the server namespace that accepts and closes every connection ("::"
        is dual-stack)."""
        self._listening(listener_code(port, backlog, address, accepts=True))

    def give_client(self, addresses: list[str]) -> None:
        """Give these addresses to the client namespace's veth (once each)."""
        dev = f"sw{self.tag}c"
        for a in addresses:
            if a in (CLIENT_IP, CLIENT_IP6) or a in self.given:
                continue
            self.given.add(a)
            if ":" in a:
                self.in_client("ip", "-6", "addr", "add", f"{a}/128", "dev", dev, "nodad")
            else:
                self.in_client("ip", "addr", "add", f"{a}/32", "dev", dev)

    def held_clients(self, port: int, addresses: list[str], each: int) -> None:
        """``each`` connections from every address, completed and held open until the lab
        ends."""
        self.give_client(addresses)
        server = SERVER_IP6 if ":" in addresses[0] else SERVER_IP
        code = textwrap.dedent(f"""
            import socket, time
            held = []
            for a in {addresses!r}:
                for _ in range({each}):
                    held.append(socket.create_connection(({server!r}, {port}), timeout=5,
                                                         source_address=(a, 0)))
            print("listening", flush=True)
            time.sleep(3600)
        """)
        proc = self._client_process(code)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "listening"

    def real_clients(self, port: int, addresses: list[str], seconds: float,
                     per_second: int = 20) -> subprocess.Popen[str]:
        """Real clients from ``addresses`` (given to the client namespace's veth, so they may
        sit inside the routed spoofed ranges): ``per_second`` connections a second for
        ``seconds``, one line per attempt: "start_time ok|fail"."""
        self.give_client(addresses)
        server = SERVER_IP6 if ":" in addresses[0] else SERVER_IP
        family = "AF_INET6" if ":" in server else "AF_INET"
        code = textwrap.dedent(f"""
            import socket, time
            sources = {addresses!r}
            end, i = time.time() + {seconds}, 0
            while time.time() < end:
                started = time.time()
                s = socket.socket(socket.{family}, socket.SOCK_STREAM)
                s.settimeout(3)
                try:
                    s.bind((sources[i % len(sources)], 0))
                    s.connect(({server!r}, {port}))
                    print(started, "ok", flush=True)
                except OSError as exc:
                    print(started, "fail", exc, flush=True)
                finally:
                    s.close()
                i += 1
                time.sleep(max(0.0, started + 1 / {per_second} - time.time()))
        """)
        return self._client_process(code)

    def slow_clients(self, port: int, seconds: float, per_second: int = 150) -> (
            subprocess.Popen[str]):
        """Real clients on a congested link: the client side's egress is a 1 Mbit/s token
        bucket kept full by a UDP stream, so every ACK waits up to ~0.8 s behind it and the
        server holds each request half-open that long (or retransmits its SYN-ACK). Every
        handshake completes in the end; prints "completed failed" when done."""
        self.in_client("tc", "qdisc", "add", "dev", f"sw{self.tag}c", "root", "tbf", "rate",
                       "1mbit", "burst", "4kb", "latency", "800ms")
        filler = textwrap.dedent(f"""
            import socket, time
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            end = time.monotonic() + {seconds} + 2
            while time.monotonic() < end:
                for _ in range(25):
                    s.sendto(b"x" * 1000, ({SERVER_IP!r}, 9))
                time.sleep(0.1)
        """)
        clients = textwrap.dedent(f"""
            import select, socket, time
            end, pending, ok, failed = time.monotonic() + {seconds}, [], 0, 0
            while time.monotonic() < end or pending:
                if time.monotonic() < end:
                    for _ in range({per_second} // 10):
                        s = socket.socket()
                        s.setblocking(False)
                        s.connect_ex(({SERVER_IP!r}, {port}))
                        pending.append((time.monotonic(), s))
                time.sleep(0.1)
                poller = select.poll()  # select() stops at fd 1024
                for _, s in pending:
                    poller.register(s, select.POLLOUT)
                ready, keep = {{fd for fd, _ in poller.poll(0)}}, []
                for t, s in pending:
                    if s.fileno() in ready:
                        good = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                        ok, failed = ok + good, failed + (not good)
                        s.close()
                    elif time.monotonic() - t > 10:
                        failed += 1
                        s.close()
                    else:
                        keep.append((t, s))
                pending = keep
            print(ok, failed)
        """)
        for code, out in ((filler, subprocess.DEVNULL), (clients, subprocess.PIPE)):
            proc = self._client_process(code, stdout=out)
        return proc

    def _client_process(self, code: str, stdout: int | None = subprocess.PIPE,
                        stdin: int | None = None) -> subprocess.Popen[str]:
        """Python ``code`` in the background in the client namespace, able to import
        tests.support.lab; stopped with the lab."""
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        proc = subprocess.Popen(["ip", "netns", "exec", self.client_ns, sys.executable, "-c",
                                 code], stdin=stdin, stdout=stdout, text=True, env=env)
        self.processes.append(proc)
        return proc

    def in_client(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.client_ns, *argv)

    def flood(self, port: int, count: int, sources: list[str] | None = None) -> None:
        """``count`` SYNs to the listener from spoofed addresses (random ones in SPOOF_NET)."""
        assert self.start_flood(port, count, sources).wait(timeout=120) == 0

    def start_flood(self, port: int, count: int, sources: list[str] | None = None,
                    rate: float = 0) -> subprocess.Popen[str]:
        """The flood in the background, ``rate`` SYNs a second (0: as fast as it goes); the
        sources are IPv4 or IPv6 (then sent to SERVER_IP6). Stopped with the lab."""
        srcs = sources or [f"{SPOOF_NET}.{random.randint(0, 255)}.{random.randint(1, 254)}"
                           for _ in range(count)]
        dst = SERVER_IP6 if ":" in srcs[0] else SERVER_IP
        code = ("import json, sys; from tests.support.lab import send_syns; "
                f"send_syns({dst!r}, {port}, json.load(sys.stdin), {rate})")
        proc = self._client_process(code, stdout=None, stdin=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(srcs))
        proc.stdin.close()
        return proc

    def timed_flood(self, port: int, seconds: float, rate: float = 0,
                    pool: int = 8192, family: int = 4) -> subprocess.Popen[str]:
        """A benchmark's flood: forged SYNs from all over SPOOF_NET/16 for ``seconds``, at
        ``rate`` a second (0: as fast as one core sends), cycling through ``pool`` prepared
        source/port pairs. It prints "SENT ELAPSED" when done (``flood_rate`` reads it).
        ``family=6``: from all over SPOOF_NET6::/16 to SERVER_IP6, every SYN from a new /64
        (as a spoofed IPv6 flood is: 2^48 of them in the /16)."""
        if family == 6:
            return self._timed_flood6(port, seconds, rate, pool)
        code = textwrap.dedent(f"""
            import random, socket, time
            from tests.support.lab import syn_packet
            packets = [syn_packet(f"{SPOOF_NET}.{{random.randint(0, 255)}}."
                                  f"{{random.randint(1, 254)}}", {SERVER_IP!r},
                                  random.randint(1024, 65535), {port}) for _ in range({pool})]
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            start, sent = time.monotonic(), 0
            while time.monotonic() - start < {seconds}:
                for p in packets[sent % {pool}: sent % {pool} + 256]:
                    raw.sendto(p, ({SERVER_IP!r}, 0))
                sent += 256
                if {rate}:
                    time.sleep(max(0.0, start + sent / {rate} - time.monotonic()))
            print(sent, time.monotonic() - start)
        """)
        return self._client_process(code)

    def _timed_flood6(self, port: int, seconds: float, rate: float,
                      pool: int) -> subprocess.Popen[str]:
        """The IPv6 timed flood. Words 1 to 3 of each source (its /64 within the /16) are drawn
        at random, the third so that the three keep their one's-complement sum: the prepared
        packet's TCP checksum stays right without being computed again."""
        code = textwrap.dedent(f"""
            import random, socket, struct, time
            from tests.support.lab import IPV6_HDRINCL, syn_packet6
            packets = [bytearray(syn_packet6("{SPOOF_NET6}::" + f"{{random.randint(1, 65535):x}}",
                                             {SERVER_IP6!r}, random.randint(1024, 65535),
                                             {port})) for _ in range({pool})]
            raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            raw.setsockopt(socket.IPPROTO_IPV6, IPV6_HDRINCL, 1)
            start, sent, bits = time.monotonic(), 0, random.getrandbits
            while time.monotonic() - start < {seconds}:
                for p in packets[sent % {pool}: sent % {pool} + 256]:
                    a, b = bits(16), bits(16)
                    struct.pack_into("!HHH", p, 10, a, b, (-(a + b)) % 0xFFFF)
                    raw.sendto(p, ({SERVER_IP6!r}, 0))
                sent += 256
                if {rate}:
                    time.sleep(max(0.0, start + sent / {rate} - time.monotonic()))
            print(sent, time.monotonic() - start)
        """)
        return self._client_process(code)

    def connect_burst(self, port: int, established: int, attempts: int,
                      spacing: float = 0.005, hold: float = 2.0) -> None:
        """Real clients from the client namespace (``burst_code``), until they are done."""
        subprocess.run(["ip", "netns", "exec", self.client_ns, sys.executable, "-c",
                        burst_code(SERVER_IP, port, established, attempts, spacing=spacing,
                                   hold=hold)],
                       check=True, timeout=120)


    def trafgen_flood(self, port: int, seconds: float, nets: tuple[str, ...] = (),
                      cpus: int = 1) -> subprocess.Popen[str]:
        """A flood at this machine's limit: trafgen (netsniff-ng) on ``cpus`` cores writing
        SYNs straight onto the client's veth (a packet socket's ring, no qdisc), for
        ``seconds``, from random addresses of ``nets`` in turn ("10.232.0.0/16", /24s; by
        default all over SPOOF_NET/16), each SYN a random source port and sequence number.
        trafgen raises the host's socket buffer limits where it may: it runs with /proc/sys
        read-only, so it never may (tests never change the host)."""
        server = json.loads(self.in_server("ip", "-j", "link", "show").stdout)
        mac = next(link["address"] for link in server if link["ifname"] != "lo")
        client = json.loads(self.in_client("ip", "-j", "link", "show").stdout)
        dev = next(link["ifname"] for link in client if link["ifname"] != "lo")
        packets = []
        for net in nets or (f"{SPOOF_NET}.0.0/16",):
            base, length = net.split("/")
            varied = "sa[2:2]=drnd()" if length == "16" else "sa[3]=drnd()"
            assert length in ("16", "24"), net
            packets.append(f"{{ eth(da={mac}), ipv4(sa={base}, {varied}, da={SERVER_IP}, "
                           f"ttl=64, df), tcp(sp=drnd(), dp={port}, seq=drnd(), syn, "
                           "win=64240) }")
        conf = Path(tempfile.mkdtemp(prefix="swt-trafgen-")) / "syn.cfg"
        conf.write_text("\n".join(packets) + "\n")
        guarded = ("mount --bind /proc/sys /proc/sys && mount -o remount,ro,bind /proc/sys "
                   f"&& exec timeout -s INT {seconds} trafgen --dev {dev} --conf {conf} "
                   f"--cpus {cpus} --num 0 -q")
        proc = subprocess.Popen(["ip", "netns", "exec", self.client_ns, "unshare", "--mount",
                                 "--propagation", "private", "sh", "-c", guarded],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.processes.append(proc)
        return proc

    def segments_in(self) -> int:
        """The server namespace's Tcp InSegs: every TCP segment it received (in a flood
        that is all the kernel took in of it; what the veth dropped never counts)."""
        from synwatch.probes.procnet import counters_in

        return counters_in(self.in_server("cat", "/proc/net/snmp").stdout)["Tcp.InSegs"]


def flood_rate(sender: subprocess.Popen[str], timeout: float) -> tuple[int, float]:
    """What a ``timed_flood`` sent, and in how many seconds."""
    out, _ = sender.communicate(timeout=timeout)
    sent, elapsed = out.split()
    return int(sent), float(elapsed)


@contextmanager
def lab() -> Iterator[Lab]:
    tag = uuid.uuid4().hex[:6]
    pair = make_pair(tag)
    the_lab = Lab(tag, pair.server_ns, pair.client_ns)
    try:
        yield the_lab
    finally:
        for proc in the_lab.processes:
            proc.kill()
            proc.wait()
        remove_pair(pair)


class Kmsg:
    """Reads /dev/kmsg from its current end: the records printed after the test started."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)

    def records_until(self, predicate: object, timeout: float = 10) -> list[str]:
        found: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                rec = os.read(self.fd, 8192).decode("utf-8", "replace")
            except BlockingIOError:
                time.sleep(0.05)
                continue
            except BrokenPipeError:  # overwritten before we read it
                continue
            line = rec.split("\n", 1)[0]
            found.append(line)
            if callable(predicate) and predicate(line):
                return found
        return found

    def close(self) -> None:
        os.close(self.fd)


def client_outcomes(proc: subprocess.Popen[str]) -> list[tuple[float, bool]]:
    """What ``Lab.real_clients`` saw: (start time, connected) per attempt."""
    out, _ = proc.communicate(timeout=120)
    return [(float(line.split()[0]), line.split()[1] == "ok") for line in out.splitlines()]


def banned_in_nft(the_lab: Lab) -> dict[str, dict[str, Any]]:
    listed = sh("ip", "netns", "exec", the_lab.server_ns, "nft", "-j", "list", "set", "inet",
                "synwatch", "bannet4", check=False)
    if listed.returncode != 0:  # no table (yet, or flushed): nothing banned
        return {}
    out = listed.stdout
    found = {}
    for item in json.loads(out)["nftables"]:
        for e in item.get("set", {}).get("elem", []):
            block = e["elem"]["val"]["prefix"]
            found[f"{block['addr']}/{block['len']}"] = e["elem"]
    return found


def flood_from(the_lab: Lab, port: int, nets: list[str], each: int) -> None:
    sources = [f"{net.rsplit('.', 1)[0]}.{random.randint(1, 254)}"
               for net in nets for _ in range(each)]
    random.shuffle(sources)
    the_lab.flood(port, len(sources), sources)
