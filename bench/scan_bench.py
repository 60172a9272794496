"""`make bench` for scanning: synwatch scan vs grep vs fail2ban-regex on one generated syslog.

Generates (once) a 1M-line traditional syslog with about 0.1 % kernel SYN-flood lines, a few
application lines quoting the kernel text, and ordinary noise; then times each tool on it, best
of three runs, with the peak memory of the child process.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
LINES = 1_000_000

NOISE = [
    "{ts} web01 sshd[{pid}]: Accepted publickey for deploy from 192.0.2.{a} port {port} ssh2: ED25519 SHA256:{h}",
    "{ts} web01 CRON[{pid}]: (root) CMD (command -v debian-sa1 > /dev/null && debian-sa1 1 1)",
    "{ts} web01 systemd[1]: Started session-{pid}.scope - Session {pid} of User deploy.",
    "{ts} web01 nginx[{pid}]: 198.51.100.{a} - - \"GET /index.html HTTP/1.1\" 200 {port} \"-\" \"Mozilla/5.0\"",
    "{ts} web01 kernel: [{up}] IPv6: ADDRCONF(NETDEV_CHANGE): eth{a}: link becomes ready",
    "{ts} web01 postfix/smtpd[{pid}]: connect from unknown[203.0.113.{a}]",
]
FLOODS = [
    "{ts} web01 kernel: [{up}] TCP: request_sock_TCP: Possible SYN flooding on port {port}. Sending cookies.  Check SNMP counters.",
    "{ts} web01 kernel: TCP: request_sock_TCP: Possible SYN flooding on port 0.0.0.0:{port}. Sending cookies.",
    "{ts} web01 kernel: TCP: request_sock_TCPv6: Possible SYN flooding on port [::]:{port}. Dropping request.",
    "{ts} web01 kernel: [{up}] TCP: drop open request from 203.0.113.{a}/{port}",
]
QUOTE = "{ts} web01 synmon[{pid}]: WARN kernel reported: TCP: request_sock_TCP: Possible SYN flooding on port {port}. Sending cookies."


def generate(path: Path) -> int:
    rng = random.Random(7)
    floods = 0
    with path.open("w") as f:
        for i in range(LINES):
            ts = f"Nov {1 + i * 20 // LINES:2d} {i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}"
            fields = {"ts": ts, "pid": rng.randint(100, 99999), "a": rng.randint(1, 254),
                      "port": rng.randint(1, 65535), "h": f"{rng.getrandbits(64):016x}",
                      "up": f"{i / 10:12.6f}"}
            r = rng.random()
            if r < 0.001:
                floods += 1
                f.write(rng.choice(FLOODS).format(**fields) + "\n")
            elif r < 0.0011:
                f.write(QUOTE.format(**fields) + "\n")
            else:
                f.write(rng.choice(NOISE).format(**fields) + "\n")
    return floods


def run(argv: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS in MiB, stdout) of the best of three runs."""
    best: tuple[float, int, str] | None = None
    for _ in range(3):
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        out = proc.stdout.read().decode() if proc.stdout else ""
        _, _, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        if best is None or elapsed < best[0]:
            best = (elapsed, usage.ru_maxrss // 1024, out)
    assert best is not None
    return best


def main() -> int:
    OUT.mkdir(exist_ok=True)
    log = OUT / "syslog-1M.log"
    if not log.exists():
        print(f"generating {log} ...", file=sys.stderr)
        floods = generate(log)
        (OUT / "syslog-1M.floods").write_text(str(floods))
    floods = int((OUT / "syslog-1M.floods").read_text())
    size_mb = log.stat().st_size / 1e6
    synwatch = str(Path(sys.executable).parent / "synwatch")
    tools = [
        ("synwatch scan --count", [synwatch, "scan", "--count", str(log)]),
        ("grep -c -E", ["grep", "-c", "-E", "SYN flooding|drop open request", str(log)]),
        ("synwatch scan --format json", [synwatch, "scan", "--format", "json", str(log)]),
    ]
    if shutil.which("fail2ban-regex"):
        tools.append(("fail2ban-regex", ["fail2ban-regex", str(log),
                                         str(HERE / "fail2ban-synflood.conf")]))
    print(f"input: {LINES:,} lines, {size_mb:.0f} MB, {floods} kernel SYN-flood lines "
          f"(+ ~{LINES // 10000} application lines quoting them)\n")
    print(f"{'tool':<30}{'seconds':>9}{'lines/s':>14}{'max RSS':>10}  matches")
    results = {}
    for name, argv in tools:
        seconds, rss, out = run(argv)
        if name.startswith("fail2ban"):
            matches = next((ln.split(",")[2].split()[0] for ln in out.splitlines()
                            if ln.startswith("Lines:")), "?")
        elif "json" in name:
            matches = str(out.count("\n"))
        else:
            matches = out.strip()
        results[name] = seconds
        print(f"{name:<30}{seconds:>9.3f}{LINES / seconds:>14,.0f}{rss:>7} MiB  {matches}")
    grep, ours = results["grep -c -E"], results["synwatch scan --count"]
    print(f"\nsynwatch scan --count / grep: {ours / grep:.2f}x the time (goal: <= 3x)")
    if "fail2ban-regex" in results:
        print(f"fail2ban-regex / synwatch scan --count: {results['fail2ban-regex'] / ours:.0f}x "
              "faster (goal: >= 20x)")
    print("grep counts the application lines that quote the kernel; synwatch does not.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
