"""How fast a fleet ban travels (root): from the moment node A records a fleet ban to the
element in node B's nftables, and the same for an unban, with a real `synwatch run` as node B
acting on a network namespace of its own.

- PostgreSQL: B is woken by LISTEN/NOTIFY;
- one SQLite file shared by two nodes on one machine: no notifications, B finds the ban at its
  periodic look (every FLEET_EVERY seconds), the fallback a PostgreSQL fleet also has.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synwatch.actions.banfleet import FLEET_EVERY
from synwatch.records import Ban
from synwatch.store import History
from tests.support.pgcluster import Cluster

TRIALS = int(os.environ.get("SYNWATCH_BENCH_TRIALS", "20"))


def banned(netns: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "set", "inet",
                          "synwatch", "bannet4"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return set()
    found = set()
    for item in json.loads(out.stdout)["nftables"]:
        for e in item.get("set", {}).get("elem", []):
            val = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
            if isinstance(val, dict) and "prefix" in val:
                found.add(f"{val['prefix']['addr']}/{val['prefix']['len']}")
    return found


def until(check: object, timeout: float = 30) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if check():  # type: ignore[operator]
            return time.monotonic() - began
        time.sleep(0.005)
    raise SystemExit("fleet_bench: timed out")


def trials(url: str, tmp: Path, label: str) -> tuple[list[float], list[float]]:
    netns = f"swb-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    config = tmp / f"{label}.toml"
    config.write_text(f'[storage]\nurl = "{url}"\nhost = "node-b"\nstate_dir = "{tmp}/{label}"\n'
                      '[sources]\njournald = false\nkmsg = false\n'
                      f'[watch]\nnetns = "{netns}"\n'
                      '[incident]\naccounting = false\nsampler = false\n'
                      '[actions]\ndry_run = false\n[actions.ban]\nscope = "fleet"\n')
    log = (tmp / f"{label}.log").open("w")
    node_b = subprocess.Popen([sys.executable, "-m", "synwatch", "run", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=log)
    node_a = History.open(url, host="node-a")
    bans, unbans = [], []
    try:
        until(lambda: "synwatch running" in (tmp / f"{label}.log").read_text())
        time.sleep(1)
        for i in range(TRIALS):
            prefix = f"10.99.{i}.0/24"
            now = datetime.now(timezone.utc)
            began = time.monotonic()
            [ban_id] = node_a.add_bans([Ban(prefix=prefix, backend="nftables", netns="",
                                            incident_id=None, created_at=now,
                                            expires_at=now + timedelta(hours=1),
                                            scope="fleet")])
            until(lambda p=prefix: p in banned(netns))  # type: ignore[misc]
            bans.append(time.monotonic() - began)
            began = time.monotonic()
            node_a.mark_removed([ban_id], datetime.now(timezone.utc), everywhere=True)
            until(lambda p=prefix: p not in banned(netns))  # type: ignore[misc]
            unbans.append(time.monotonic() - began)
    finally:
        node_b.terminate()
        node_b.wait(timeout=20)
        node_a.close()
        subprocess.run(["ip", "netns", "del", netns], check=False)
    return bans, unbans


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("fleet_bench: run as root (namespaces, nftables, PostgreSQL)")
    pg = Cluster().init()
    tmp = Path(tempfile.mkdtemp(prefix="synwatch-fleet-"))
    try:
        print(f"Fleet ban from node A to node B's nftables ({TRIALS} bans, then their unbans)")
        print(f"{'shared history':<34} {'ban median':>11} {'ban p95':>9} {'unban median':>13}")
        for label, url in (("PostgreSQL (LISTEN/NOTIFY)", pg.new_database()),
                           (f"SQLite file (look every {FLEET_EVERY:.0f} s)",
                            f"sqlite:///{tmp}/shared.db")):
            bans, unbans = trials(url, tmp, label.split()[0].lower())
            p95 = sorted(bans)[max(0, int(len(bans) * 0.95) - 1)]
            print(f"{label:<34} {statistics.median(bans):>9.2f} s {p95:>7.2f} s "
                  f"{statistics.median(unbans):>11.2f} s")
    finally:
        pg.destroy()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()
