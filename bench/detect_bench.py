"""Detection latency on the real kernel (root): `synwatch run` on a lab namespace.

log path:      the kernel line stored by journald (the entry's __REALTIME_TIMESTAMP) ->
               the incident committed (first seen by a reader polling the store every 2 ms),
               for a listener the last probe saw (the usual case: it listened before the
               flood) and for one newer than it (the line waits for a probe taken at once,
               which tells a listener here from another namespace's line);
counters path: the first SYN of a flood the kernel does not log (a second flood on the same
               socket) -> the incident committed; the goal is under two probe intervals.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.journald import Journald
from tests.support.lab import SPOOF_NET, Lab, lab

RUNS = 10
PROBE = 1.0


def _committed(db: Path, port: int, after: int, timeout: float = 10) -> tuple[float, int]:
    """Wall time at which an incident on ``port`` with id > ``after`` became visible."""
    deadline = time.monotonic() + timeout
    con = sqlite3.connect(db, timeout=5)
    try:
        while time.monotonic() < deadline:
            row = con.execute("SELECT id FROM incidents WHERE port = ? AND id > ?",
                              (port, after)).fetchone()
            if row:
                return time.time(), row[0]
            time.sleep(0.002)
    finally:
        con.close()
    raise SystemExit(f"no incident on port {port} within {timeout}s")


def _journal_time(port: int, since: float, timeout: float = 5) -> float:
    """When journald stored the line for ``port`` printed after ``since``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["journalctl", "-k", "-o", "json", "-n", "200", "--no-pager"],
                             capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            entry = json.loads(line)
            stored = int(entry["__REALTIME_TIMESTAMP"]) / 1e6
            if f":{port}. " in entry.get("MESSAGE", "") and stored >= since:
                return stored
        time.sleep(0.05)
    raise SystemExit(f"journald has no line for port {port}")


def _service(the_lab: Lab, tmp: Path) -> subprocess.Popen[bytes]:
    config = tmp / "synwatch.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp}/h.db"\n'
                      '[sources]\njournald = true\nkmsg = false\n'
                      f'[watch]\nnetns = "{the_lab.server_ns}"\n'
                      f'[incident]\nquiet_period = "2s"\nprobe_interval = "{PROBE}s"\n'
                      # detection only: a ban would drop the second flood the counters must see
                      '[actions]\ndry_run = true\n')
    log = (tmp / "service.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "synwatch", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 20
    while "synwatch running" not in (tmp / "service.log").read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit((tmp / "service.log").read_text())
        time.sleep(0.05)
    time.sleep(1.5)  # the journal source has caught up with the boot's old lines
    return proc


def main() -> None:
    if os.geteuid() != 0:
        print("detection benchmark: skipped (needs root for namespaces)")
        return
    journald = Journald()
    if not journald.alive():
        journald.start()
    log_ms: list[float] = []
    new_listener_ms: list[float] = []
    counter_ms: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as tmpdir, lab() as the_lab:
            tmp = Path(tmpdir)
            the_lab.sysctl("net.ipv4.tcp_synack_retries", 1)
            proc = _service(the_lab, tmp)
            db = tmp / "h.db"
            try:
                last = 0
                for i in range(RUNS):
                    port = 30000 + i
                    the_lab.listen(port, backlog=16)
                    time.sleep(PROBE * 1.5)  # a probe has seen the listener
                    sources = [f"{SPOOF_NET}.{i}.{n % 250 + 1}" for n in range(400)]
                    started = time.time()
                    the_lab.flood(port, len(sources), sources)
                    seen, last = _committed(db, port, last)
                    log_ms.append((seen - _journal_time(port, started)) * 1000)
                    # wait for it to close, then a second flood the kernel does not log
                    time.sleep(4.5)
                    started = time.time()
                    the_lab.flood(port, len(sources), sources)
                    seen, last = _committed(db, port, last)
                    counter_ms.append((seen - started) * 1000)
                    time.sleep(3.5)
                    fresh = 31000 + i  # flooded the moment it listens
                    the_lab.listen(fresh, backlog=16)
                    started = time.time()
                    the_lab.flood(fresh, len(sources), sources)
                    seen, last = _committed(db, fresh, last)
                    new_listener_ms.append((seen - _journal_time(fresh, started)) * 1000)
                    time.sleep(3.5)  # its request sockets expire before the next flood
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)

    finally:
        journald.stop_if_ours()
    print(f"detection latency, {RUNS} floods each (probe interval {PROBE:g} s)")
    print(f"{'path':<58}{'median':>10}{'max':>10}")
    for name, ms in (("journald stored the line -> incident committed", log_ms),
                     ("  the same, listener newer than the last probe", new_listener_ms),
                     ("counters start moving -> incident committed", counter_ms)):
        print(f"{name:<58}{statistics.median(ms):>8.0f}ms{max(ms):>8.0f}ms")
    print(f"at {datetime.now().isoformat(timespec='seconds')}")


if __name__ == "__main__":
    main()
