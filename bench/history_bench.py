"""The history at scale, on SQLite and on a real PostgreSQL server (root: the server runs as the
postgres user, in a temporary directory, as in the tests).

1. Ingest: events/s through the service's history (synwatch/store History: sqlite3 on SQLite,
   psycopg on PostgreSQL), in batches of 50 with their source position as the service writes them, one
   node, then four nodes writing at once.
2. Reading: the CLI as an admin runs it (a new process each time, so imports count), on an empty
   store and at 1M events / 100k incidents of four hosts spread over 120 days: median wall time
   of 5 runs and the largest RSS.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import insert

from synwatch.records import NewEvent
from synwatch.store import History
from synwatch.store.migrate import engine
from synwatch.store.models import EventRow, IncidentRow
from tests.support.pgcluster import Cluster

EVENTS = int(os.environ.get("SYNWATCH_BENCH_EVENTS", "1000000"))
INCIDENTS = EVENTS // 10
HOSTS = ("web1", "web2", "web3", "web4")
NOW = datetime.now(timezone.utc)
RUNS = 5


def _event(i: int) -> NewEvent:
    return NewEvent(time=NOW, source="journald", trusted=True, kind="syn_flood", family=4,
                    address="0.0.0.0", port=443, mode="cookies", source_ip=None,
                    source_port=None, host=None, pattern="kernel-synflood/form-f",
                    message=f"TCP: request_sock_TCP: Possible SYN flooding on port 0.0.0.0:{i}.",
                    dedup_key=f"s=bench;i={i}")


def ingest(url: str, writers: int, per_writer: int = 5000) -> float:
    """Events a second, all writers together."""
    History.open(url).close()
    start = threading.Barrier(writers + 1)
    done: list[float] = []

    def node(name: str) -> None:
        # as the service writes: sqlite3 for a file, psycopg for a server
        store = History.open(url, host=name, bounded=True)
        batch = [_event(i) for i in range(per_writer)]
        start.wait()
        for i in range(0, per_writer, 50):
            store.insert_events(batch[i:i + 50], NOW, ("journald", {"cursor": str(i)}))
        done.append(time.monotonic())
        store.close()

    threads = [threading.Thread(target=node, args=(f"ingest{w}-{random.random()}",))
               for w in range(writers)]
    for t in threads:
        t.start()
    start.wait()
    began = time.monotonic()
    for t in threads:
        t.join()
    return writers * per_writer / (max(done) - began)


def fill(url: str) -> None:
    """EVENTS events and INCIDENTS incidents of four hosts over 120 days, written in bulk."""
    History.open(url).close()
    made = engine(url)
    rng = random.Random(1)
    with made.begin() as conn:
        for start in range(0, INCIDENTS, 20000):
            conn.execute(insert(IncidentRow), [{
                "host": HOSTS[i % 4], "netns": "", "address": "0.0.0.0", "port": 443, "family": 4,
                "status": "closed", "verdict": rng.choice(("capacity", "concentrated", "spoofed")),
                "trigger": "log", "opened_at": NOW - timedelta(seconds=rng.uniform(0, 120 * 86400)),
                "closed_at": NOW, "peak_syn_recv": 100, "top_prefixes": [], "recommendations": [],
                "evidence": {}} for i in range(start, min(start + 20000, INCIDENTS))])
        for start in range(0, EVENTS, 50000):
            conn.execute(insert(EventRow), [{
                "time": NOW - timedelta(seconds=rng.uniform(0, 120 * 86400)), "recorded_at": NOW,
                "source": "journald", "trusted": True, "historical": False, "kind": "syn_flood", "family": 4,
                "address": "0.0.0.0", "port": 443, "mode": "cookies", "host": HOSTS[i % 4],
                "message": "TCP: request_sock_TCP: Possible SYN flooding on port 0.0.0.0:443.",
                "pattern": "kernel-synflood/form-f", "dedup_key": f"k{i}"}
                for i in range(start, min(start + 50000, EVENTS))])
    if made.dialect.name == "postgresql":
        with made.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
    made.dispose()


def cli(config: Path, *args: str) -> tuple[float, float]:
    """Median seconds of RUNS runs and the largest RSS (MiB) of `synwatch ARGS`."""
    times, rss = [], 0.0
    for _ in range(RUNS):
        began = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", PEAK, *args, "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              check=False)
        times.append(time.monotonic() - began)
        if proc.returncode != 0:
            raise SystemExit(f"synwatch {' '.join(args)} failed: {proc.stderr!r}")
        rss = max(rss, int(proc.stderr.split("VmHWM:")[1].split()[0]) / 1024)
    return statistics.median(times), rss


# `python -m synwatch ARGS` that prints its own peak RSS at exit (VmHWM of its own address
# space; the rusage of a child counts the parent's pages it was forked with)
PEAK = ("import atexit, sys, runpy\n"
        "atexit.register(lambda: print([l for l in open('/proc/self/status')"
        " if l.startswith('VmHWM')][0], file=sys.stderr))\n"
        "sys.argv[0] = 'synwatch'\n"
        "runpy.run_module('synwatch', run_name='__main__', alter_sys=True)\n")


QUERIES = (("incidents list --since 1d", ("incidents", "list", "--since", "1d")),
           ("incidents list --limit 100 --all-hosts",
            ("incidents", "list", "--limit", "100", "--all-hosts")),
           ("events list --limit 100", ("events", "list", "--limit", "100")),
           ("events list --since 1d", ("events", "list", "--since", "1d")))


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("history_bench: run as root (the PostgreSQL server runs as postgres)")
    pg = Cluster().init()
    tmp = Path(tempfile.mkdtemp(prefix="synwatch-hist-"))
    try:
        urls = {"SQLite": lambda name: f"sqlite:///{tmp}/{name}.db",
                "PostgreSQL": lambda name: pg.new_database()}
        print("History ingest (the service's store, batches of 50 with their position), "
              "events/s")
        print(f"{'store':<12} {'one node':>10} {'4 nodes at once':>16}")
        for name, url in urls.items():
            one, four = ingest(url("ingest1"), 1), ingest(url("ingest4"), 4)
            print(f"{name:<12} {one:>10,.0f} {four:>16,.0f}")
        print()
        print(f"CLI on the history (median of {RUNS} runs, new process each; max RSS)")
        print(f"{'query':<40} {'store':<11} {'empty':>12} "
              f"{f'{EVENTS // 1000}k events':>22}")
        for name, url in urls.items():
            empty, full = tmp / f"empty-{name}.toml", tmp / f"full-{name}.toml"
            empty_url, full_url = url("empty"), url("full")
            History.open(empty_url).close()
            began = time.monotonic()
            fill(full_url)
            filled = time.monotonic() - began
            for path, u in ((empty, empty_url), (full, full_url)):
                path.write_text(f'[storage]\nurl = "{u}"\nhost = "web1"\n'
                                f'state_dir = "{tmp}"\n')
            for label, args in QUERIES:
                e_s, e_mb = cli(empty, *args, "--format", "json")
                f_s, f_mb = cli(full, *args, "--format", "json")
                print(f"{label:<40} {name:<11} {e_s:>6.2f} s {e_mb:>3.0f} MB "
                      f"{f_s:>12.2f} s {f_mb:>4.0f} MB")
            print(f"  ({name}: {EVENTS:,} events and {INCIDENTS:,} incidents written in "
                  f"{filled:.0f} s)")
    finally:
        pg.destroy()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()
