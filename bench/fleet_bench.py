"""A fleet of up to 1,000 nodes on one PostgreSQL, on this machine (root): how many server
connections it takes, how fast a fleet ban reaches every node's firewall, and what it costs the
database and each node.

The nodes are bench/fleet_nodes.py's: the real node code of the fleet path (the ban action at
scope "fleet" on a History of its own, its heartbeat, its loop), 50 to a process (at nice 10:
the database and the pooler, which a real fleet runs on machines of their own, come first on
this one), through one pgbouncer in transaction mode (tests/support/pgbouncer.py, the
essentials of docs/fleet.md's) in front of one PostgreSQL (tests/support/pgcluster.py). The
first few act on an nftables set in a network namespace of their own, the others on a recording
firewall. One more node (this script) decides a fleet ban, waits until every node holds it,
and 0.5 s later decides the next; the time from just before it writes the ban to the element
in each node's firewall is the propagation.

Figures, for each fleet size: the server connections PostgreSQL held (at most, sampled each
second), ban propagation p50/p99/max over every node and ban, the CPU of PostgreSQL, of the
pooler and of the nodes while idle (per node: the node's own, and the database's share), and
while the bans travel.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fleet_nodes
from synwatch.records import Ban
from synwatch.store import History
from tests.support.pgbouncer import Pooler
from tests.support.pgcluster import Cluster

SIZES = [int(n) for n in os.environ.get("SYNWATCH_FLEET_SIZES", "100,250,500,1000").split(",")]
PER_PROCESS = int(os.environ.get("SYNWATCH_FLEET_PER_PROCESS", "50"))  # nodes per process
SAMPLE = 5  # nodes on a real nftables set, in a namespace of their own
BANS = int(os.environ.get("SYNWATCH_FLEET_BANS", "10"))  # fleet bans per size
IDLE = float(os.environ.get("SYNWATCH_FLEET_IDLE", "30"))  # seconds of the idle measurement
POOL = 20  # the pooler's server connections (default_pool_size)
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    return total


def children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def postgres_pids(pg: Cluster) -> list[int]:
    """The postmaster and its children (backends, background workers) as of now."""
    master = int((pg.data / "postmaster.pid").read_text().split()[0])
    return [master, *children(master)]


def server_connections(pg: Cluster, db: str) -> int:
    with pg.connect() as conn:
        [(n,)] = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                              [db]).fetchall()
        return int(n)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def measure(size: int, pg: Cluster, pooler: Pooler, bans: int = BANS) -> dict[str, Any]:
    db = pg.new_database_name()
    url = pooler.url(db)
    origin = History.open(url, host="origin")  # migrates the new database once
    pooler_pid = int(pooler.pidfile.read_text().split()[0])
    namespaces = [f"swf-{uuid.uuid4().hex[:6]}" for _ in range(min(SAMPLE, size))]
    for ns in namespaces:
        subprocess.run(["ip", "netns", "add", ns], check=True)
    hosts = [(f"node{i:04d}", namespaces[i] if i < len(namespaces) else "") for i in range(size)]
    ctx = multiprocessing.get_context("spawn")
    report: Any = ctx.Queue()
    ready: Any = ctx.Queue()
    stop = f"/tmp/synwatch-fleet-stop-{uuid.uuid4().hex[:8]}"
    procs = [ctx.Process(target=fleet_nodes.run, args=(url, hosts[i:i + PER_PROCESS], report,
                                                       ready, stop), daemon=True)
             for i in range(0, size, PER_PROCESS)]
    most = 0
    try:
        began = time.monotonic()
        for p in procs:  # one process's nodes after another's: a rolling start
            p.start()
            ready.get(timeout=600)
        start_s = time.monotonic() - began
        time.sleep(5)  # every node past its first look
        node_pids = [p.pid for p in procs if p.pid is not None]

        def window(seconds: float) -> tuple[float, float, float]:
            nonlocal most
            pids = postgres_pids(pg)
            before = (cpu_seconds(pids), cpu_seconds([pooler_pid]), cpu_seconds(node_pids))
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                most = max(most, server_connections(pg, db))
                time.sleep(1)
            after = (cpu_seconds(pids + [p for p in postgres_pids(pg) if p not in pids]),
                     cpu_seconds([pooler_pid]), cpu_seconds(node_pids))
            return tuple((a - b) / seconds for a, b in zip(after, before, strict=True))  # type: ignore[return-value]

        idle = window(IDLE)
        while True:  # what was reported before the bans
            try:
                report.get_nowait()
            except queue.Empty:
                break
        latencies: list[float] = [0.0] if not bans else []
        missing = 0
        pids = postgres_pids(pg)
        cpu_before = (cpu_seconds(pids), cpu_seconds([pooler_pid]), cpu_seconds(node_pids))
        ban_began = time.monotonic()
        for b in range(bans):
            prefix = f"10.{200 + SIZES.index(size)}.{b}.0/24"
            now = datetime.now(timezone.utc)
            decided = time.time()
            origin.add_bans([Ban(prefix=prefix, backend="nftables", netns="", incident_id=None,
                                 created_at=now, expires_at=now + timedelta(hours=1),
                                 scope="fleet")])
            holding: set[str] = set()
            deadline = time.monotonic() + 60
            while len(holding) < size and time.monotonic() < deadline:
                try:
                    host, added, at = report.get(timeout=1)
                except queue.Empty:
                    continue
                if prefix in added and host not in holding:
                    holding.add(host)
                    latencies.append(at - decided)
                most = max(most, server_connections(pg, db)) if len(holding) % 100 == 0 \
                    else most
            missing += size - len(holding)  # not within a minute: counted, and said
            time.sleep(0.5)
        spent = max(1e-3, time.monotonic() - ban_began)
        pids += [p for p in postgres_pids(pg) if p not in pids]
        busy = tuple((a - b) / spent for a, b in zip(
            (cpu_seconds(pids), cpu_seconds([pooler_pid]), cpu_seconds(node_pids)), cpu_before,
            strict=True))
    finally:
        Path(stop).touch()
        report.cancel_join_thread()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        origin.close()
        Path(stop).unlink()
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    return {"size": size, "start_s": start_s, "connections": most,
            "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
            "max": max(latencies), "idle": idle, "busy": busy, "missing": missing}


def row(r: dict[str, Any]) -> None:
    size, idle, busy = r["size"], r["idle"], r["busy"]
    print(f"{size:>5} {r['connections']:>12} {r['p50']:>6.2f} s {r['p99']:>4.2f} s "
          f"{r['max']:>4.2f} s {idle[0] * 100:>8.1f}% {idle[1] * 100:>6.1f}% "
          f"{idle[2] * 100:>6.1f}% {idle[0] * 100 / size:>7.3f}% "
          f"{idle[2] * 100 / size:>5.3f}% {busy[0] * 100:>8.1f}% {busy[1] * 100:>6.1f}% "
          f"{busy[2] * 100:>6.1f}%   (all started in {r['start_s']:.0f} s"
          + (f"; {r['missing']} copies not made within a minute" if r["missing"] else "")
          + ")", flush=True)


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("fleet_bench: run as root (namespaces, nftables, PostgreSQL)")
    pg = Cluster().init()
    pooler = Pooler(pg, pool_size=POOL).start()
    print(f"A fleet on one PostgreSQL through pgbouncer (transaction mode, {POOL} server "
          f"connections), {PER_PROCESS} nodes per process, {SAMPLE} of them on nftables; "
          f"{BANS} fleet bans per size; idle measured over {IDLE:.0f} s; CPU in % of a core")
    print(f"{'nodes':>5} {'server conns':>12} {'ban p50':>8} {'p99':>6} {'max':>6} "
          f"{'idle: db':>9} {'pooler':>7} {'nodes':>7} {'db/node':>8} {'node':>6} "
          f"{'bans: db':>9} {'pooler':>7} {'nodes':>7}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally clauses clean up
    try:
        for size in SIZES:
            row(measure(size, pg, pooler))
        # the same largest fleet, its nodes looking at the fleet's changes once an hour: what
        # the heartbeats and reconciles cost alone, and so what the once-a-second look costs
        os.environ["SYNWATCH_FLEET_POLL"] = "3600"
        print(f"the same {SIZES[-1]} nodes without the look at the fleet's changes (no bans):")
        row(measure(SIZES[-1], pg, pooler, bans=0))
    finally:
        pooler.destroy()
        pg.destroy()


if __name__ == "__main__":
    main()
