"""synwatch's memory and probe schedule under a spoofed flood from everywhere (root): IPv4 from
all over a /16 (256 /24s), IPv6 from all over a /16 (every SYN a new /64), and IPv6 again under
`--record`. RSS every 5 s, threads, and under --record the longest gap between two probes and
the longest line of the recording.

Each row is a fresh `synwatch run` watching a lab namespace with the SYN sampler and the nftables
accounting set on (dry run), probes every second. Memory must be flat after the first half.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.lab import flood_rate, lab, lab_port  # noqa: E402

FLOOD = int(os.environ.get("SYNWATCH_BENCH_FLOOD", "75"))
SETTLE = 5
EVERY = 5


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def threads(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/task").iterdir())


def gaps(recording: Path) -> tuple[int, float, int]:
    """Probes recorded, the longest gap between two of them (s), the longest line (bytes)."""
    times, longest = [], 0
    with recording.open(encoding="utf-8") as f:
        for line in f:
            longest = max(longest, len(line))
            if '"type":"evidence"' in line[:40]:
                times.append(datetime.fromisoformat(json.loads(line)["now"]))
    worst = max(((b - a).total_seconds() for a, b in itertools.pairwise(times)),
                default=0.0)
    return len(times), worst, longest


def row(tmp: Path, family: int, record: bool) -> dict[str, object]:
    with lab() as the_lab:
        port = lab_port()
        the_lab.listen(port, backlog=1024, address="::")
        config = tmp / f"m{family}{record}.toml"
        config.write_text(f'[storage]\nurl = "sqlite:///{tmp}/m{family}{record}.db"\n'
                          '[sources]\njournald = false\nkmsg = false\n'
                          f'[watch]\nnetns = "{the_lab.server_ns}"\n'
                          '[incident]\naccounting = true\n[actions]\ndry_run = true\n')
        recording = tmp / f"m{family}{record}.jsonl"
        argv = [sys.executable, "-m", "synwatch", "run", "--config", str(config)]
        proc = subprocess.Popen([*argv, *(["--record", str(recording)] if record else [])],
                                cwd=ROOT, stderr=subprocess.DEVNULL)
        try:
            time.sleep(SETTLE)
            start_rss, start_threads = rss_mib(proc.pid), threads(proc.pid)
            sender = the_lab.timed_flood(port, FLOOD, family=family)
            series, most_threads = [], start_threads
            start = time.monotonic()
            while sender.poll() is None:
                time.sleep(EVERY)
                series.append((round(time.monotonic() - start), rss_mib(proc.pid)))
                most_threads = max(most_threads, threads(proc.pid))
            sent, elapsed = flood_rate(sender, 60)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        probes, worst, longest = gaps(recording) if record else (0, 0.0, 0)
        return {"name": f"IPv{family} flood over a /16{', --record' if record else ''}",
                "rate": sent / elapsed, "start": start_rss, "series": series,
                "threads": (start_threads, most_threads), "probes": probes, "gap": worst,
                "line": longest, "size": recording.stat().st_size if record else 0}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row(Path(tmp), 4, False), row(Path(tmp), 6, False), row(Path(tmp), 6, True)]
    print(f"synwatch under a {FLOOD} s spoofed flood (dry run, sampler and accounting set on, "
          "probes every second); RSS in MiB:")
    print(f"{'flood':<32} {'SYN/s':>8} {'start':>6} {'half':>6} {'end':>6} {'max':>6} "
          f"{'threads':>8} {'max gap s':>9} {'longest line':>12}")
    for r in rows:
        series = r["series"]
        assert isinstance(series, list)
        assert series
        half = series[len(series) // 2][1]
        threads_seen = r["threads"]
        assert isinstance(threads_seen, tuple)
        gap = f"{r['gap']:.1f}" if r["probes"] else "-"
        line = f"{r['line']:,}" if r["probes"] else "-"
        print(f"{r['name']:<32} {r['rate']:8,.0f} {r['start']:6.1f} {half:6.1f} "
              f"{series[-1][1]:6.1f} {max(s[1] for s in series):6.1f} "
              f"{threads_seen[0]:>3}-{threads_seen[1]:<4} {gap:>9} {line:>12}")
    for r in rows:
        print(f"{r['name']}: " + " ".join(f"{at}s:{rss:.1f}" for at, rss in r["series"]))


if __name__ == "__main__":
    main()
