"""TcpExt / Tcp counters and the sysctls that decide how a listener overflows.

Paths are relative to a proc root (a parameter, so tests can hand in a fixed tree). In a network
namespace, read through /proc/thread-self/net and /proc/sys from a thread inside it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

COUNTERS = (
    "TcpExt.SyncookiesSent", "TcpExt.SyncookiesRecv", "TcpExt.SyncookiesFailed",
    "TcpExt.TCPReqQFullDoCookies", "TcpExt.TCPReqQFullDrop", "TcpExt.ListenOverflows",
    "TcpExt.ListenDrops", "TcpExt.TCPSynRetrans", "Tcp.PassiveOpens", "Tcp.AttemptFails",
)
SYSCTLS = (
    "net.ipv4.tcp_syncookies", "net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.tcp_synack_retries", "net.ipv4.tcp_abort_on_overflow",
)


@dataclass(frozen=True, slots=True)
class KernelCounters:
    values: dict[str, int]  # "TcpExt.SyncookiesSent" -> value; absent on kernels without it


def parse_snmp_style(text: str) -> dict[str, int]:
    """/proc/net/netstat and /proc/net/snmp: pairs of header and value lines per section."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        h_section, _, h_names = header.partition(":")
        v_section, _, v_values = values.partition(":")
        if h_section != v_section:
            continue
        for name, value in zip(h_names.split(), v_values.split(), strict=False):
            try:
                out[f"{h_section}.{name}"] = int(value)
            except ValueError:
                continue
    return out


def read_counters(proc: Path = Path("/proc"), net: str = "thread-self/net") -> KernelCounters:
    values: dict[str, int] = {}
    for name in ("netstat", "snmp"):
        try:
            values.update(parse_snmp_style((proc / net / name).read_text()))
        except OSError:
            continue
    return KernelCounters({k: v for k, v in values.items() if k in COUNTERS})


def read_sysctls(proc: Path = Path("/proc")) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for name in SYSCTLS:
        try:
            out[name] = int((proc / "sys" / name.replace(".", "/")).read_text().split()[0])
        except (OSError, ValueError, IndexError):
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
    try:
        text = path.read_text()
    except OSError:
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
    try:
        text = path.read_text()
    except OSError:
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
