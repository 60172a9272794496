"""Simulated fleet nodes for bench/fleet_bench.py: many in one process, each the real node code of
the fleet path (a Responder with the ban action at scope "fleet" on its own History through the
pooler, its heartbeat every HEARTBEAT_EVERY seconds), looping as the service's loop does. A few
act on an nftables set in a network namespace of their own; the others on a recording firewall
that keeps the elements the same commands would have put in a set. Each element a node adds is
reported with the time it was added, for the propagation figures.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synwatch import __version__
from synwatch.actions import banfleet
from synwatch.actions.ban import BanAction
from synwatch.actions.firewall import Firewall
from synwatch.actions.responder import Responder
from synwatch.config import parse_config
from synwatch.daemon.housekeeping import HEARTBEAT_EVERY
from synwatch.errors import StoreError
from synwatch.store import History
from synwatch.system.runner import Command

ELEMENT = re.compile(r"^(add|delete) element \S+ \S+ \S+ \{ (\S+)(?: timeout (\d+)s)?")


class Clock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True)
class Recording(Firewall):
    """The nftables preset's commands, kept instead of run: what the set would hold."""

    held: dict[str, float | None] = field(default_factory=dict)

    def apply(self, commands: Sequence[Command]) -> None:
        for c in commands:
            for line in (c.stdin or "").splitlines():
                m = ELEMENT.match(line)
                if m is None:
                    continue
                if m[1] == "delete":
                    self.held.pop(m[2], None)
                else:
                    self.held[m[2]] = time.monotonic() + int(m[3]) if m[3] else None

    def listed(self) -> dict[str, int | None]:
        now = time.monotonic()
        return {p: None if t is None else int(t - now) for p, t in self.held.items()
                if t is None or t > now}


def _watching(firewall: Firewall, host: str, report: Queue[Any]) -> Firewall:
    """``firewall``, reporting each element it adds (host, prefix, wall time)."""
    parent = type(firewall)

    class Reporting(parent):  # type: ignore[valid-type,misc]
        def apply(self, commands: Sequence[Command]) -> None:
            super().apply(commands)
            added = [m[2] for c in commands for line in (c.stdin or "").splitlines()
                     if (m := ELEMENT.match(line)) and m[1] == "add" and m[3]]
            if added:
                report.put((host, added, time.time()))

    fields = {f: getattr(firewall, f) for f in firewall.__dataclass_fields__}
    return Reporting(**fields)  # type: ignore[no-any-return]


def node(url: str, host: str, netns: str, report: Queue[Any]) -> tuple[Responder, History]:
    config = parse_config(f'[storage]\nurl = "{url}"\nhost = "{host}"\n'
                          f'[watch]\nnetns = "{netns}"\n'
                          '[actions]\ndry_run = false\n'
                          '[actions.syncookies]\nenabled = false\n'
                          '[actions.ban]\nscope = "fleet"\nbackend = "nftables"\n', "bench")
    for attempt in range(10):  # a fleet starting at once: a node retries, as the service
        try:                   # does from its spool
            store = History.open(url, host=host, migrate=False, bounded=True)
            break
        except StoreError:
            if attempt == 9:
                raise
            time.sleep(1)
    responder = Responder(config, store, Clock())
    ban = next(a for a in responder.actions if isinstance(a, BanAction))
    firewall = ban.firewall if netns else Recording(ban.firewall.preset, "", ban.firewall.v4_len,
                                                    ban.firewall.v6_len, ban.firewall.values,
                                                    ban.firewall.destinations)
    ban.firewall = _watching(firewall, host, report)
    return responder, store


def run(url: str, hosts: list[tuple[str, str]], report: Queue[Any], ready: Any,
        stop: str) -> None:
    """The nodes ``hosts`` ((name, namespace or "")) until the file ``stop`` is there (a
    multiprocessing Event deadlocks its setter once a waiter is killed), each ticked as the
    service's loop ticks its responder: once a second, and when an action of it is due.
    SYNWATCH_FLEET_POLL: the nodes' look at the fleet's changes this often instead (the
    bench's "without polling" row)."""
    # a real fleet's database and pooler run on machines of their own: the simulated nodes
    # yield the CPU to them here rather than starve them
    os.nice(10)
    if "SYNWATCH_FLEET_POLL" in os.environ:
        banfleet.FLEET_POLL = float(os.environ["SYNWATCH_FLEET_POLL"])
    nodes = []
    for host, netns in hosts:
        responder, store = node(url, host, netns, report)
        responder.start()
        nodes.append((responder, store))
    started = datetime.now(timezone.utc)
    beat = [time.monotonic() + random.uniform(0, HEARTBEAT_EVERY) for _ in nodes]
    # each node's own loop turn: once a second (at a phase of its own), and when its
    # responder has work due; the process wakes for the soonest of its nodes
    turns = [(time.monotonic() + random.uniform(0, 1), i) for i in range(len(nodes))]
    heapq.heapify(turns)
    ready.put(len(nodes))
    stopped = Path(stop)
    while not stopped.exists():
        mono = time.monotonic()
        while turns[0][0] <= mono:
            _, i = heapq.heappop(turns)
            responder, store = nodes[i]
            if mono >= beat[i]:
                beat[i] = mono + HEARTBEAT_EVERY
                with contextlib.suppress(StoreError):  # as the service's: again at the next
                    store.heartbeat(os.getpid(), started, datetime.now(timezone.utc),
                                    __version__)
            responder.tick()
            heapq.heappush(turns, (min(mono + 1.0, responder.next_due()), i))
        time.sleep(max(0.002, min(1.0, turns[0][0] - time.monotonic())))
    for responder, store in nodes:
        responder.stop(wait=1.0)
        store.close()
