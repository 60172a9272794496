"""The fan-out the fleet did not take, measured beside the one it did: Debian's nats-server
carrying each fleet change to N simulated nodes, on this machine, sized as bench/fleet_bench.py
(100 to 1,000 nodes, 50 to a process at nice 10, 10 waves, 30 s idle).

The server is Debian's `nats-server` binary, started here in a temporary directory on free ports
with a configuration of its own (never the Debian service). Each simulated node is one NATS
connection subscribed to the fleet's subject, as a node of a fleet on a bus would hold; the
bench's own connection publishes one change (a JSON object the size of a fleet change row), waits
until every node got it, and 0.5 s later publishes the next. Delivery is the time from just
before the publish to the node's callback (time.time(), one machine).

Figures, for each fleet size: the client connections the server held (its /varz monitoring
endpoint), delivery p50/p99/max over every node and message, the CPU of the server and of the
nodes (all their processes) idle and during the waves, the server's RSS.

What the bus does not do: each node still writes its copy of a ban to PostgreSQL (the history),
and a node back from a bus outage still reads what it missed from the history. The bus replaces
only the once-a-second look at the fleet's changes, whose cost bench/fleet_bench.py measures.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fleet_bench import percentile
from bench.footprint_bench import TICKS, cpu_seconds, rss_mib

SIZES = [int(n) for n in os.environ.get("SYNWATCH_BUS_SIZES", "100,250,500,1000").split(",")]
PER_PROCESS = 50  # nodes per process, as bench/fleet_nodes.py runs them
MESSAGES = int(os.environ.get("SYNWATCH_BUS_MESSAGES", "10"))  # waves per size
IDLE = float(os.environ.get("SYNWATCH_BUS_IDLE", "30"))  # seconds of the idle measurement
SUBJECT = "synwatch.fleet.changes"
WAIT = 60.0  # seconds a wave may take before its missing deliveries are counted
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

T = TypeVar("T")


def die_with_parent() -> None:
    """SIGTERM when the bench's process ends, however it ends (a SIGKILL runs no finally):
    https://man7.org/linux/man-pages/man2/prctl.2.html (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def change_row(seq: int) -> bytes:
    """One fleet change as a bus would carry it: the columns of a fleet ban row
    (synwatch.records.Ban and its bans.fleet_seq), about 300 bytes of JSON."""
    now = datetime.now(timezone.utc)
    return json.dumps({
        "fleet_seq": seq, "id": 100_000 + seq, "host": "web0042",
        "prefix": f"10.{seq // 256}.{seq % 256}.0/24", "backend": "nftables", "netns": "",
        "incident_id": 50_000 + seq, "scope": "fleet", "origin_id": None, "times_banned": 1,
        "created_at": now.isoformat(), "expires_at": (now + timedelta(hours=1)).isoformat(),
        "removed_at": None, "change": "banned",
    }).encode()


@dataclass(frozen=True)
class Bus:
    """A nats-server of the bench's own."""

    proc: subprocess.Popen[bytes]
    url: str
    monitor: str  # http://127.0.0.1:PORT, the monitoring endpoint

    def varz(self) -> dict[str, Any]:
        """https://docs.nats.io/running-a-nats-service/nats_admin/monitoring#general-information-varz"""
        with urllib.request.urlopen(f"{self.monitor}/varz", timeout=5) as answer:
            data: dict[str, Any] = json.load(answer)
            return data


@contextmanager
def nats_server() -> Iterator[Bus]:
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not Path(binary).exists():
        raise SystemExit("bus_bench: no nats-server (scripts/bootstrap bench installs Debian's)")
    with tempfile.TemporaryDirectory(prefix="synwatch-bus-") as tmp:
        port, http_port = free_port(), free_port()
        conf = Path(tmp) / "nats.conf"
        # Debian's /etc/nats-server.conf sets only host and port; everything else is the
        # server's default, as a fleet's would be (ping_interval 2 min, max_connections 64K):
        # https://docs.nats.io/running-a-nats-service/configuration
        conf.write_text(f"host: 127.0.0.1\nport: {port}\n"
                        f"http: 127.0.0.1:{http_port}\n"  # the monitoring endpoint
                        f'log_file: "{tmp}/nats.log"\npid_file: "{tmp}/nats.pid"\n')
        proc = subprocess.Popen([binary, "-c", str(conf)], cwd=tmp,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=die_with_parent)  # noqa: PLW1509 (no thread runs yet)
        try:
            bus = Bus(proc, f"nats://127.0.0.1:{port}", f"http://127.0.0.1:{http_port}")
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = Path(tmp, "nats.log")
                    raise RuntimeError("nats-server did not start: "
                                       + (log.read_text()[-2000:] if log.exists() else "no log"))
                try:
                    bus.varz()
                    break
                except OSError:
                    time.sleep(0.1)
            yield bus
        finally:
            proc.terminate()  # SIGTERM: the server closes its connections and exits
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def received(name: str, report: Queue[Any]) -> Callable[[Msg], Awaitable[None]]:
    async def on_change(msg: Msg) -> None:
        at = time.time()
        change = json.loads(msg.data)  # a node reads the change before it copies the ban
        report.put((name, change["fleet_seq"], at))

    return on_change


async def subscribed(url: str, names: list[str], report: Queue[Any], ready: Queue[Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # the bench ends us with SIGTERM
        loop.add_signal_handler(sig, stop.set)
    connections: list[Client] = []
    try:
        for name in names:
            nc = await nats.connect(url, name=name, connect_timeout=10)
            await nc.subscribe(SUBJECT, cb=received(name, report))
            connections.append(nc)
        for nc in connections:  # the server has every subscription before the first wave
            await nc.flush()
        ready.put(len(connections))
        await stop.wait()  # nothing else wakes the nodes: their idle cost is the client's own
    finally:
        for nc in connections:
            await nc.close()


def subscribers(url: str, names: list[str], report: Queue[Any], ready: Queue[Any]) -> None:
    """The nodes ``names`` in one process, each one connection and one subscription, until
    SIGTERM. At nice 10, as bench/fleet_nodes.py's: the server comes first on this machine."""
    die_with_parent()
    os.nice(10)
    asyncio.run(subscribed(url, names, report, ready))


class Publisher:
    """The bench's connection, on an event loop in a thread of its own, so that the bench's
    waves block on the report queue as bench/fleet_bench.py's do."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client: Client = self._run(nats.connect(url, name="publisher", connect_timeout=10))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    async def _publish(self, payload: bytes) -> float:
        at = time.time()
        await self.client.publish(SUBJECT, payload)
        await self.client.flush()  # PING/PONG: the server has processed the PUB
        return at

    def publish(self, payload: bytes) -> float:
        """Publishes ``payload``; returns the wall time just before."""
        return self._run(self._publish(payload))

    def close(self) -> None:
        try:
            self._run(self.client.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def started(procs: list[BaseProcess], ready: Queue[Any]) -> None:
    """Starts one process after another, each once the last has its nodes subscribed."""
    for p in procs:
        p.start()
        deadline = time.monotonic() + 600
        while True:
            try:
                ready.get(timeout=1)
                break
            except queue.Empty:
                if not p.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"a subscriber process did not start (exit {p.exitcode})") \
                        from None


def measure(size: int, bus: Bus) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    report: Queue[Any] = ctx.Queue()
    ready: Queue[Any] = ctx.Queue()
    names = [f"node{i:04d}" for i in range(size)]
    procs: list[BaseProcess] = [
        ctx.Process(target=subscribers, args=(bus.url, names[i:i + PER_PROCESS], report, ready),
                    daemon=True)
        for i in range(0, size, PER_PROCESS)]
    publisher: Publisher | None = None
    try:
        began = time.monotonic()
        started(procs, ready)
        start_s = time.monotonic() - began
        publisher = Publisher(bus.url)
        time.sleep(5)  # settled
        node_pids = [p.pid for p in procs if p.pid is not None]
        server = bus.proc.pid
        # connections at the start and the end of the window, not each second: a /varz
        # request costs the server more CPU than its idle clients do
        connections = int(bus.varz()["connections"])
        rss = rss_mib(server)
        before = (cpu_seconds(server), cpu(node_pids))
        t0 = time.monotonic()
        while time.monotonic() - t0 < IDLE:
            time.sleep(1)
            rss = max(rss, rss_mib(server))
        spent = time.monotonic() - t0
        idle = ((cpu_seconds(server) - before[0]) / spent, (cpu(node_pids) - before[1]) / spent)
        tick = 1 / TICKS / spent  # the CPU times' resolution, as a share of the window
        connections = max(connections, int(bus.varz()["connections"]))

        latencies: list[float] = []
        missing = 0
        before = (cpu_seconds(server), cpu(node_pids))
        t0 = time.monotonic()
        for seq in range(1, MESSAGES + 1):
            published = publisher.publish(change_row(seq))
            got: set[str] = set()
            deadline = time.monotonic() + WAIT
            while len(got) < size and time.monotonic() < deadline:
                try:
                    name, got_seq, at = report.get(timeout=1)
                except queue.Empty:
                    continue
                if got_seq == seq and name not in got:
                    got.add(name)
                    latencies.append(at - published)
            missing += size - len(got)  # not within WAIT: counted, and said
            time.sleep(0.5)
        spent = time.monotonic() - t0
        busy = ((cpu_seconds(server) - before[0]) / spent, (cpu(node_pids) - before[1]) / spent)
        rss = max(rss, rss_mib(server))
        varz = bus.varz()
    finally:
        if publisher is not None:
            publisher.close()
        report.cancel_join_thread()
        for p in procs:
            if p.pid is not None and p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()
    return {"size": size, "start_s": start_s, "connections": connections,
            "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
            "max": max(latencies, default=0.0), "idle": idle, "tick": tick, "busy": busy, "rss": rss,
            "missing": missing, "slow_consumers": int(varz.get("slow_consumers", 0))}


def percent(share: float, tick: float, width: int, digits: int) -> str:
    """``share`` of a core in %; none measured is less than one clock tick over the window."""
    text = f"{share * 100:.{digits}f}%" if share > 0 else f"<{tick * 100:.{digits}f}%"
    return text.rjust(width)


def row(r: dict[str, Any]) -> None:
    size, idle, busy, tick = r["size"], r["idle"], r["busy"], r["tick"]
    notes = [f"all subscribed in {r['start_s']:.0f} s"]
    if r["missing"]:
        notes.append(f"{r['missing']} deliveries not made within {WAIT:.0f} s")
    if r["slow_consumers"]:
        notes.append(f"{r['slow_consumers']} slow consumers (the server dropped them)")
    print(f"{size:>5} {r['connections']:>12} {r['p50'] * 1000:>6.1f} ms {r['p99'] * 1000:>6.1f} ms "
          f"{r['max'] * 1000:>6.1f} ms {percent(idle[0], tick, 10, 2)} {percent(idle[1], tick, 8, 2)} "
          f"{percent(idle[1] / size, tick / size, 9, 5)} {busy[0] * 100:>10.1f}% "
          f"{busy[1] * 100:>7.1f}% "
          f"{r['rss']:>7.1f}   ({'; '.join(notes)})", flush=True)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally clauses clean up
    with nats_server() as bus:
        version = bus.varz().get("version", "?")
        print(f"A fleet's changes on Debian's nats-server {version} (its own on a free port, "
              f"default settings), one subject, {PER_PROCESS} nodes per process at nice 10, each "
              f"one connection and one subscription (nats-py), and one publisher; {MESSAGES} "
              f"changes of {len(change_row(1))} bytes per size; idle measured over {IDLE:.0f} s; "
              f"CPU in % of a core (\"<\": under one clock tick, 1/{TICKS} s, over the window); "
              "delivery = publish to the node's callback")
        print(f"{'nodes':>5} {'server conns':>12} {'p50':>9} {'p99':>9} {'max':>9} "
              f"{'idle: nats':>10} {'nodes':>8} {'per node':>9} {'waves: nats':>11} "
              f"{'nodes':>8} {'RSS MiB':>7}")
        for size in SIZES:
            row(measure(size, bus))
    print("Server connections: the nodes' and the publisher's. What the bus does not do: each "
          "node still writes its copy of a ban to PostgreSQL (the history), and a node back from "
          "a bus outage still reads what it missed from the history. The bus replaces only the "
          "once-a-second look at the fleet's changes, whose cost bench/fleet_bench.py measures.")


if __name__ == "__main__":
    main()
