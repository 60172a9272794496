"""Real clients during a spoofed flood on a host that tracks connections (root, lab namespaces):
no protection (tcp_syncookies=0), SYN cookies only, and SYNPROXY as synwatch's action sets it
up. For each: how many of a loop of real connections succeed and how long they take to
connect, and how the conntrack table fills over the flood.

The server namespace has a `ct state` rule (conntrack on, as with ufw, firewalld, Docker); the
forged sources are all over SPOOF_NET/16 and routed back through the client namespace, as on
the internet. nf_conntrack_max is the host's and is never lowered here, so the table's fill is
the figure that shows what a smaller table (or a longer flood) would run into.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synwatch.actions.synproxy import client_mss, listener_wscale, render_on
from synwatch.probes.snapshot import take
from synwatch.system.runner import execute
from tests.support.lab import SERVER_IP, SPOOF_NET, lab, lab_port

SECONDS = 20
RATE = 20_000
CLIENTS = 200
REPO = Path(__file__).resolve().parent.parent

CLIENT = textwrap.dedent("""
    import socket, time
    for _ in range({count}):
        start = time.monotonic()
        try:
            socket.create_connection(({dst!r}, {port}), timeout=3).close()
            print("ok", round((time.monotonic() - start) * 1000, 2), flush=True)
        except OSError:
            print("failed", flush=True)
        time.sleep(0.05)
""")


def run(mode: str) -> tuple[str, int, float, list[int]]:
    with lab() as the_lab:
        the_lab.track_connections()
        port = lab_port()
        the_lab.serve(port, backlog=128)
        the_lab.sysctl("net.ipv4.tcp_syncookies", 0 if mode == "no protection" else 1)
        if mode == "SYNPROXY":
            the_lab.sysctl("net.netfilter.nf_conntrack_tcp_loose", 0)
            mss = client_mss(the_lab.server_ns, 4, f"{SPOOF_NET}.1.1")
            wscale = listener_wscale(the_lab.server_ns, "0.0.0.0", port, 4)
            execute([render_on(port, mss, wscale)], the_lab.server_ns)
        # 65,536 forged source/port pairs: the table stops growing once it holds them all
        flood = the_lab.timed_flood(port, SECONDS, RATE, pool=65536)
        fill: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(2):
                table = take(the_lab.server_ns).conntrack
                fill.append(table.count if table else 0)

        sampler = threading.Thread(target=sample)
        sampler.start()
        time.sleep(2)  # the queue is full by now
        out = subprocess.run(["ip", "netns", "exec", the_lab.client_ns, sys.executable, "-c",
                              CLIENT.format(count=CLIENTS, dst=SERVER_IP, port=port)],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        flood.wait()
        done.set()
        sampler.join()
    ok = [float(line.split()[1]) for line in out if line.startswith("ok")]
    return mode, len(ok), statistics.median(ok) if ok else float("nan"), fill


def main() -> None:
    rows = [run(mode) for mode in ("no protection", "SYN cookies only", "SYNPROXY")]
    print(f"real clients during a {SECONDS} s spoofed flood at {RATE:,} SYN/s, a `ct state` "
          f"rule in the server namespace, {CLIENTS} connections one after the other:")
    print(f"{'protection':<18} {'connected':>10} {'median connect':>15}  "
          "conntrack entries every 2 s")
    for mode, ok, median, fill in rows:
        print(f"{mode:<18} {ok:>6}/{CLIENTS} {median:>12.1f} ms  "
              + " ".join(f"{n:,}" for n in fill))


if __name__ == "__main__":
    main()
