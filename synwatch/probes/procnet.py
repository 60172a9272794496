"""TcpExt / Tcp counters and the sysctls that decide how a listener overflows.

Paths are relative to a proc root (a parameter, so tests can hand in a fixed tree). In a network
namespace, read through /proc/thread-self/net and /proc/sys from a thread inside it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

COUNTERS = (
    "TcpExt.SyncookiesSent", "TcpExt.SyncookiesRecv", "TcpExt.SyncookiesFailed",
    "TcpExt.TCPReqQFullDoCookies", "TcpExt.TCPReqQFullDrop", "TcpExt.ListenOverflows",
    "TcpExt.ListenDrops", "TcpExt.TCPSynRetrans", "Tcp.PassiveOpens", "Tcp.AttemptFails",
    "Tcp.InSegs",  # every TCP segment received: still, no SYN came in (snapshot.take)
)
_SECTIONS = frozenset(name.partition(".")[0] for name in COUNTERS)
SYSCTLS = (
    "net.ipv4.tcp_syncookies", "net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.tcp_synack_retries", "net.ipv4.tcp_abort_on_overflow",
)


@dataclass(frozen=True, slots=True)
class KernelCounters:
    values: dict[str, int]  # "TcpExt.SyncookiesSent" -> value; absent on kernels without it


def read_counters(proc: Path = Path("/proc"), net: str = "thread-self/net") -> KernelCounters:
    values: dict[str, int] = {}
    for name in ("netstat", "snmp"):
        text = proc_text(f"{proc}/{net}/{name}")
        if text is not None:
            values.update(counters_in(text))
    return KernelCounters(values)


def counters_in(text: str) -> dict[str, int]:
    """COUNTERS in /proc/net/netstat or snmp text (pairs of header and value lines per
    section): only their sections' lines are split, with the columns worked out once per
    header (a parse of every section of both files was 0.65 ms a probe, most of an idle
    service's CPU after the socket dumps). A garbled value is left out, not zero."""
    values: dict[str, int] = {}
    lines = text.splitlines()
    for header, row in zip(lines[::2], lines[1::2], strict=False):
        section = header.partition(":")[0]
        if section not in _SECTIONS or not row.startswith(f"{section}:"):
            continue
        numbers = row.split()
        for key, at in _wanted(header):
            if at < len(numbers):
                try:
                    values[key] = int(numbers[at])
                except ValueError:
                    continue
    return values


@functools.lru_cache(maxsize=16)
def _wanted(header: str) -> tuple[tuple[str, int], ...]:
    """The COUNTERS of a header line and their columns (the section name is column 0)."""
    names = header.split()
    section = names[0].rstrip(":") if names else ""
    return tuple((f"{section}.{n}", i) for i, n in enumerate(names)
                 if i and f"{section}.{n}" in COUNTERS)


def proc_text(path: str) -> str | None:
    """A small /proc file at one read (os.read: a pathlib read_text costs five times more)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):  # one read holds it; the empty one says so
            chunks.append(chunk)
        return b"".join(chunks).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def read_sysctls(proc: Path = Path("/proc")) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for name in SYSCTLS:
        text = proc_text(f"{proc}/sys/{name.replace('.', '/')}")
        try:
            out[name] = int(text.split()[0]) if text is not None else None
        except (ValueError, IndexError):
            out[name] = None
    return out


# What moves when a listener is flooded or requests go unanswered (the SYN-ACK retransmits of a
# half-open build-up): a namespace whose counters stay still needs no socket dump.
STIRRING = ("TCPReqQFullDoCookies", "TCPReqQFullDrop", "ListenOverflows", "ListenDrops",
            "SyncookiesSent", "TCPSynRetrans", "SyncookiesRecv", "SyncookiesFailed")
# every TcpExt counter of COUNTERS is one: a reading of them and of SEGMENTS is a probe's
# baseline (synwatch/daemon/watched.py)
SEGMENTS = ("InSegs", "PassiveOpens", "AttemptFails")


def stirring(path: Path) -> tuple[int, ...] | None:
    """The STIRRING TcpExt counters of the namespace whose netstat file ``path`` is (a
    /proc/PID/net/netstat needs no entering), or None when it cannot be read. Only the TcpExt
    pair of lines is parsed: a few microseconds, against a whole read_counters()."""
    text = proc_text(str(path))
    if text is None:
        return None
    header, _, rest = text.partition("\n")
    values, _, _ = rest.partition("\n")
    if not header.startswith("TcpExt:") or not values.startswith("TcpExt:"):
        return None
    numbers = values.split()
    try:
        return tuple(int(numbers[i]) if 0 <= i < len(numbers) else 0 for i in _columns(header))
    except ValueError:  # not the kernel's numbers: nothing is known
        return None


@functools.lru_cache(maxsize=8)
def _columns(header: str) -> tuple[int, ...]:
    """Where the STIRRING counters are in a TcpExt header line (-1: not on this kernel); one
    kernel has one header, so this is worked out once."""
    names = header.split()
    return tuple(names.index(n) if n in names else -1 for n in STIRRING)


def segments_in(path: Path) -> tuple[int, ...] | None:
    """The SEGMENTS Tcp counters of the namespace whose snmp file ``path`` is; InSegs first,
    every TCP segment it received. Still, nothing can have overflowed there (no SYN came in),
    and its netstat, three times the cost to read, is not read (RFC 1213 tcpInSegs)."""
    text = proc_text(str(path))
    if text is None:
        return None
    start = text.find("\nTcp:")
    parts = text[start + 1:].split("\n", 2) if start >= 0 else []
    if len(parts) < 2:
        return None
    numbers = parts[1].split()
    at = _segments_columns(parts[0])
    if not at or max(at) >= len(numbers):
        return None
    try:
        return tuple(int(numbers[i]) for i in at)
    except ValueError:  # not the kernel's numbers: nothing is known
        return None


@functools.lru_cache(maxsize=8)
def _segments_columns(header: str) -> tuple[int, ...]:
    names = header.split()
    return tuple(names.index(n) for n in SEGMENTS) if all(n in names for n in SEGMENTS) else ()
