"""Connection tracking, per network namespace: how full the table is and what it dropped.

A spoofed SYN flood on a host that tracks connections (ufw, firewalld, Docker, any `ct state`
rule) makes one entry per forged source; once ``nf_conntrack_count`` reaches
``nf_conntrack_max`` every new flow is dropped, legitimate and outgoing ones included, and the
kernel only says "table full, dropping packet" (docs/kernel.md §7). The table's count is the
namespace's; its maximum is the host's (read-only inside a namespace). The statistics are one
row per CPU in hex, summed here (net/netfilter/nf_conntrack_standalone.c, ct_cpu_seq_show).
Read from a thread inside the namespace, like procnet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from synwatch.probes.procnet import proc_text

STATS = ("drop", "early_drop", "insert_failed")


@dataclass(frozen=True, slots=True)
class Conntrack:
    count: int
    max: int
    drop: int = 0  # new flows dropped because the table was full (and nothing to evict)
    early_drop: int = 0  # unreplied entries evicted to make room
    insert_failed: int = 0

    @property
    def fill(self) -> float:
        return self.count / self.max if self.max > 0 else 0.0


def parse_stat(text: str) -> dict[str, int]:
    """``/proc/net/stat/nf_conntrack``: a header of names, then one row of hex per CPU."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines:
        return {}
    names, totals = lines[0], dict.fromkeys(lines[0], 0)
    for row in lines[1:]:
        for name, value in zip(names, row, strict=False):
            try:
                totals[name] += int(value, 16)
            except ValueError:
                continue
    return totals


def read_conntrack(proc: Path = Path("/proc"), net: str = "thread-self/net") -> Conntrack | None:
    """None where there is no connection tracking (the module is not loaded)."""
    base = f"{proc}/sys/net/netfilter"
    count_text, limit_text = proc_text(f"{base}/nf_conntrack_count"), proc_text(
        f"{base}/nf_conntrack_max")
    if count_text is None or limit_text is None:
        return None
    try:
        count, limit = int(count_text.split()[0]), int(limit_text.split()[0])
    except (ValueError, IndexError):
        return None
    stat = proc_text(f"{proc}/{net}/stat/nf_conntrack")
    stats = parse_stat(stat) if stat is not None else {}
    return Conntrack(count, limit, *(stats.get(name, 0) for name in STATS))
