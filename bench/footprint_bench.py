"""synwatch's footprint beside fail2ban's (root): idle RSS, idle CPU and wakeups, then synwatch
during a long spoofed flood at the highest rate the lab sustains (CPU per 10 s window, RSS over
time: memory must be flat after the first minute).

Idle: `synwatch run` on a configuration like the shipped default (dry run, sources detected,
probes every second) and `fail2ban-server` with Debian's default configuration (the sshd jail),
each left to settle, then sampled once a second. Wakeups are context switches (voluntary and
not, all threads) per second: a busy poll shows there first.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.lab import flood_rate, lab, lab_port

IDLE = int(os.environ.get("SYNWATCH_BENCH_IDLE", "60"))
FLOOD = int(os.environ.get("SYNWATCH_BENCH_FLOOD", "180"))
SETTLE = 10
TICKS = os.sysconf("SC_CLK_TCK")

def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if "ctxt_switches:" in line:
                total += int(line.split()[1])
    return total


def idle(name: str, pid: int) -> tuple[str, float, float, float]:
    time.sleep(SETTLE)
    cpu0, sw0, t0 = cpu_seconds(pid), switches(pid), time.monotonic()
    rss = []
    while time.monotonic() - t0 < IDLE:
        time.sleep(1)
        rss.append(rss_mib(pid))
    dt = time.monotonic() - t0
    return (name, max(rss), 100 * (cpu_seconds(pid) - cpu0) / dt, (switches(pid) - sw0) / dt)


def synwatch_idle(tmp: Path) -> tuple[str, float, float, float]:
    config = tmp / "synwatch.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp}/h.db"\n[actions]\ndry_run = true\n')
    # the history exists, as on any start but the first (the first migrates it)
    subprocess.run([sys.executable, "-m", "synwatch", "incidents", "list", "--config",
                    str(config)], check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "synwatch", "run", "--config", str(config)],
                            stderr=subprocess.DEVNULL)
    try:
        return idle("synwatch run (dry run, sources detected)", proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def fail2ban_idle(tmp: Path) -> tuple[str, float, float, float] | None:
    if not shutil.which("fail2ban-server"):
        return None
    # Debian's configuration as it is, with the sshd jail pointed at a log of its own (a
    # machine without /var/log/auth.log has nothing for it to read, and it would not start)
    conf = tmp / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    (tmp / "auth.log").write_text("")
    (conf / "jail.d" / "bench.local").write_text(
        f"[sshd]\nenabled = true\nbackend = auto\nlogpath = {tmp / 'auth.log'}\n")
    proc = subprocess.Popen(["fail2ban-server", "-f", "-x", "-c", str(conf),
                             "-s", str(tmp / "f2b.sock"), "-p", str(tmp / "f2b.pid"),
                             "--logtarget", "STDERR"], stderr=subprocess.DEVNULL)
    try:
        return idle("fail2ban-server (Debian's default: sshd jail)", proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def under_flood(tmp: Path) -> None:
    with lab() as the_lab:
        port = lab_port()
        the_lab.listen(port, backlog=1024)
        config = tmp / "flood.toml"
        config.write_text(f'[storage]\nurl = "sqlite:///{tmp}/flood.db"\n'
                          '[sources]\njournald = false\nkmsg = true\n'
                          f'[watch]\nnetns = "{the_lab.server_ns}"\n[actions]\ndry_run = true\n')
        proc = subprocess.Popen([sys.executable, "-m", "synwatch", "run", "--config",
                                 str(config)], stderr=subprocess.DEVNULL)
        time.sleep(SETTLE)
        sender = the_lab.timed_flood(port, FLOOD)
        rows = []
        start = time.monotonic()
        cpu0 = cpu_seconds(proc.pid)
        while sender.poll() is None:
            time.sleep(10)
            now, cpu = time.monotonic(), cpu_seconds(proc.pid)
            rows.append((now - start, 100 * (cpu - cpu0) / 10, rss_mib(proc.pid)))
            cpu0 = cpu
        sent, elapsed = flood_rate(sender, 60)
        rate = sent / elapsed
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    print(f"\nsynwatch during a {FLOOD} s spoofed flood, {rate:,.0f} SYN/s (the lab's maximum, "
          "sources all over a /16), dry run, probes every second:")
    print(f"{'at':>6}  {'CPU % of a core':>16}  {'RSS MiB':>8}")
    for at, cpu, rss in rows:
        print(f"{at:6.0f}  {cpu:16.1f}  {rss:8.1f}")
    late = [r for r in rows if r[0] >= 60]
    if late:
        print(f"max CPU {max(r[1] for r in rows):.1f} %, RSS from 60 s on "
              f"{min(r[2] for r in late):.1f}-{max(r[2] for r in late):.1f} MiB")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [synwatch_idle(Path(tmp)), fail2ban_idle(Path(tmp))]
        print(f"idle, {IDLE} s after {SETTLE} s to settle:")
        print(f"{'process':<48}  {'RSS MiB':>8}  {'CPU %':>6}  {'wakeups/s':>9}")
        for row in rows:
            if row is not None:
                name, rss, cpu, wakeups = row
                assert rss > 0, f"{name} did not keep running"
                print(f"{name:<48}  {rss:8.1f}  {cpu:6.2f}  {wakeups:9.1f}")
        under_flood(Path(tmp))

if __name__ == "__main__":
    main()
