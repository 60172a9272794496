"""`make bench` for probes: a synwatch snapshot (SYN-RECV aggregated by listener and /24) vs
`ss -tan state syn-recv` alone, with 60,000 request sockets in a lab namespace (needs root).

The server keeps every request socket: syncookies off, huge backlogs, long SYN-ACK retries, and
a queue on its veth so retransmit bursts are not dropped (docs/dependencies.md).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synwatch.probes.snapshot import take
from tests.support.lab import lab

N = 60_000


def best(fn, runs: int = 5) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    if os.geteuid() != 0:
        print("probe benchmark: needs root (network namespaces)", file=sys.stderr)
        return 1
    with lab() as the_lab:
        for name, value in (("net.ipv4.tcp_syncookies", 0), ("net.ipv4.tcp_max_syn_backlog", 262144),
                            ("net.core.somaxconn", 262144), ("net.ipv4.tcp_synack_retries", 8)):
            the_lab.sysctl(name, value)
        port = 8443
        the_lab.listen(port, backlog=262144)
        rng = random.Random(3)
        sources = [f"10.232.{rng.randint(0, 255)}.{rng.randint(1, 254)}" for _ in range(N)]
        the_lab.flood(port, N, sources)
        time.sleep(2)
        snap = take(the_lab.server_ns)
        count = next(s.syn_recv for s in snap.listeners if s.listener.port == port)
        ours = best(lambda: take(the_lab.server_ns))
        ss = best(lambda: subprocess.run(["ip", "netns", "exec", the_lab.server_ns, "ss", "-tanH",
                                          "state", "syn-recv"], capture_output=True, check=True))
        tracemalloc.start()
        take(the_lab.server_ns)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        print(f"SYN-RECV sockets: {count:,} (sent {N:,} SYNs)")
        print(f"{'synwatch snapshot (all listeners, by /24)':<46}{ours * 1000:8.1f} ms  "
              f"peak {peak:.1f} MiB")
        print(f"{'ss -tanH state syn-recv (list only)':<46}{ss * 1000:8.1f} ms")
        print(f"snapshot / ss: {ours / ss:.2f}x the time (goal: < 1x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
