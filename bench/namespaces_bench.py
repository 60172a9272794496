"""What watching every network namespace costs (root): 200 namespaces on one host, each with a
listener and a process in it (as a container has), idle; synwatch watching our own namespace
only (watch.netns = "", the default) against every one of them (watch.netns = "*").

The listeners are made by one process that enters each namespace in turn; a `sleep` in each is
its process (what synwatch names it by, and reads its counters through). Then a spoofed flood
in one of the 200: how long until its incident opens, by its kernel line (the log) and by its
counters alone (tcp_syncookies=2: no line, no request socket).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.footprint_bench import SETTLE, cpu_seconds, rss_mib, switches
from tests.support.lab import lab, lab_port

COUNT = int(os.environ.get("SYNWATCH_BENCH_NAMESPACES", "200"))
IDLE = int(os.environ.get("SYNWATCH_BENCH_IDLE", "60"))
HOLDER = textwrap.dedent("""
    import ctypes, os, socket, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    held = []
    for name in sys.argv[1:]:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        assert libc.setns(fd, 0x40000000) == 0
        s = socket.socket()
        s.bind(("0.0.0.0", 8080))
        s.listen(511)
        held.append(s)
        os.close(fd)
        assert libc.setns(home, 0x40000000) == 0
    print("listening", flush=True)
    time.sleep(86400)
""")


def make(names: list[str]) -> list[subprocess.Popen[bytes]]:
    procs = []
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True)
        procs.append(subprocess.Popen(["ip", "netns", "exec", name, "sleep", "86400"]))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *names], stdout=subprocess.PIPE)
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == b"listening"
    return [*procs, holder]  # type: ignore[list-item]


def measure(tmp: Path, watch: str) -> tuple[float, float, float, float]:
    """Idle RSS (max), CPU % of a core, wakeups/s, and the seconds to start (ready)."""
    config = tmp / f"w{abs(hash(watch))}.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp}/h.db"\n[watch]\nnetns = {watch}\n'
                      "[actions]\ndry_run = true\n")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "synwatch", "run", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "synwatch running" in line:
            break
    ready = time.monotonic() - started
    try:
        time.sleep(SETTLE)
        cpu0, sw0, t0 = cpu_seconds(proc.pid), switches(proc.pid), time.monotonic()
        rss = []
        while time.monotonic() - t0 < IDLE:
            time.sleep(1)
            rss.append(rss_mib(proc.pid))
        dt = time.monotonic() - t0
        return (max(rss), 100 * (cpu_seconds(proc.pid) - cpu0) / dt,
                (switches(proc.pid) - sw0) / dt, ready)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def latency(tmp: Path, names: list[str]) -> list[tuple[str, float]]:
    """A flood in a lab namespace among the 200: seconds from its first SYN to its incident."""
    out = []
    for how in ("log", "counters"):
        with lab() as the_lab:
            port = lab_port()
            if how == "counters":
                the_lab.sysctl("net.ipv4.tcp_syncookies", 2)
            the_lab.listen(port, backlog=64)
            config = tmp / f"lat-{how}.toml"
            db = tmp / f"lat-{how}.db"
            config.write_text(f'[storage]\nurl = "sqlite:///{db}"\n[watch]\nnetns = "*"\n'
                              "[sources]\njournald = false\nkmsg = true\n"
                              "[actions]\ndry_run = true\n")
            proc = subprocess.Popen([sys.executable, "-m", "synwatch", "run", "--config",
                                     str(config)], stderr=subprocess.DEVNULL)
            time.sleep(SETTLE)
            sent = time.time()
            flood = the_lab.start_flood(port, 20000, rate=2000)
            opened = None
            while time.time() - sent < 60 and opened is None:
                time.sleep(0.1)
                r = subprocess.run([sys.executable, "-m", "synwatch", "incidents", "list",
                                    "--port", str(port), "--format", "json", "--config",
                                    str(config)], capture_output=True, text=True, check=False)
                found = json.loads(r.stdout or "[]")
                if found:
                    opened = found[0]
            flood.kill()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            out.append((how, (time.time() - sent) if opened is None else
                        (datetime_of(opened["detected_at"]) - sent)))
    return out


def datetime_of(text: str) -> float:
    from datetime import datetime  # noqa: PLC0415

    return datetime.fromisoformat(text).timestamp()


def main() -> None:
    tag = uuid.uuid4().hex[:4]
    names = [f"swb-{tag}-{i:03d}" for i in range(COUNT)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs = make(names)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "synwatch", "incidents", "list", "--config",
                            str(_first(Path(tmp)))], check=True, capture_output=True)
            one = measure(Path(tmp), '""')
            every = measure(Path(tmp), '"*"')
            delays = latency(Path(tmp), names)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)
    print(f"idle, {IDLE} s after {SETTLE} s to settle, {COUNT} namespaces with a listener and "
          "a process each:")
    print(f"{'watch.netns':<34}  {'RSS MiB':>8}  {'CPU %':>6}  {'wakeups/s':>9}  "
          f"{'start s':>7}")
    for label, (rss, cpu, wakeups, ready) in (('"" (our own: the default)', one),
                                              (f'"*" ({COUNT + 1} namespaces)', every)):
        print(f"{label:<34}  {rss:8.1f}  {cpu:6.2f}  {wakeups:9.1f}  {ready:7.2f}")
    print(f"cost of the {COUNT} more: {every[1] - one[1]:+.2f} % of a core, "
          f"{every[0] - one[0]:+.1f} MiB (goal: under 0.5 % and 10 MiB)")
    print(f"\na flood in one of {COUNT + 2} namespaces (watch.netns = \"*\"), first SYN to "
          "incident:")
    for how, seconds in delays:
        print(f"  opened by its {how:<9} {seconds:6.2f} s")


def _first(tmp: Path) -> Path:
    config = tmp / "first.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp}/h.db"\n')
    return config


if __name__ == "__main__":
    main()
