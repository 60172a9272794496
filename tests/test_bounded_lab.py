"""Bounded resources of `synwatch run`: probes of a named namespace start no thread, the
sampler's and the incident's tables stay bounded under an IPv6 flood from everywhere, a recording
line stays small, and systemd's watchdog is fed only while the loop probes."""

from __future__ import annotations

import json
import logging
import tracemalloc
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from synwatch.clock import FrozenClock
from synwatch.config import load_config
from synwatch.daemon.service import Service as RunningService
from synwatch.detect.delta import MAX_PREFIXES, ProbeDelta
from synwatch.detect.replay import evidence_line
from synwatch.detect.tally import Tally
from synwatch.probes.evidence import Evidence
from synwatch.probes.sampled import KEPT, KEPT_ADDRESSES, MAX_ADDRESSES, Interval
from synwatch.probes.snapshot import Snapshot
from synwatch.probes.synsample import PREFIX_CACHE, SynSampler
from tests.support.harness import NotifySocket, Service
from tests.support.lab import Lab, lab
from tests.support.wait import eventually


@pytest.fixture
def the_lab() -> Iterator[Lab]:
    with lab() as made:
        yield made


def _tasks(pid: int) -> set[int]:
    return {int(t) for t in (t.name for t in Path(f"/proc/{pid}/task").iterdir())}


def _in_ns(pid: int, inode: int) -> set[int]:
    found = set()
    for tid in _tasks(pid):
        try:
            if Path(f"/proc/{pid}/task/{tid}/ns/net").stat().st_ino == inode:
                found.add(tid)
        except FileNotFoundError:
            continue
    return found


@pytest.mark.needs_root
def test_probes_of_a_named_namespace_start_no_thread(the_lab: Lab, tmp_path: Path) -> None:
    """Each probe ran on a thread of its own: under systemd's TasksMax a busy service could not
    start one and stopped. Now a worker entered the namespace once and serves every probe."""
    service = Service(the_lab, tmp_path)
    try:
        pid = service.proc.pid
        watched = Path(f"/run/netns/{the_lab.server_ns}").stat().st_ino
        service.wait_probes(3)
        before = _tasks(pid)
        workers = _in_ns(pid, watched)
        assert workers, "a thread of the service lives in the watched namespace"
        seen = set(before)
        want = service.probes() + 10
        def looked() -> bool:  # 10 probes, the tasks looked at all the while
            seen.update(_tasks(pid))
            return service.probes() >= want

        eventually(looked, "10 probes", 30, every=0.01)
        assert seen == before, "no thread came or went over 10 probes"
        assert _in_ns(pid, watched) == workers, "the same worker served them all"
    finally:
        service.stop()


def _sample_interval(ports: int = 1) -> Interval:
    """A sampler interval fed a flood from everywhere in fd32::/16: every SYN a new /64."""
    interval = Interval()
    for i in range(40_000):
        source = bytes.fromhex("fd32") + i.to_bytes(6, "big") + bytes(8)
        prefix = f"fd32:{i >> 32 & 0xFFFF:x}:{i >> 16 & 0xFFFF:x}:{i & 0xFFFF:x}::/64"
        interval.add(20000 + i % ports, prefix, 7, source)
        interval.add_completed(20000 + i % ports, source + b"", prefix, 1)
    return interval


def test_sampler_tables_bounded_under_an_ipv6_flood() -> None:
    interval = _sample_interval()
    counts = interval.ports[20000]
    assert len(counts) <= MAX_PREFIXES + 1
    assert len(interval.addresses[20000]) <= MAX_ADDRESSES + 1
    completed = interval.completed.get(20000, {})
    wide = interval.completed_wide.get(20000, {})
    assert len(completed) + len(wide) <= MAX_ADDRESSES + MAX_PREFIXES
    got = interval.summary(7).port(20000)
    assert got is not None
    assert len(got.prefixes) <= KEPT
    assert len(got.addresses) <= KEPT_ADDRESSES
    assert got.distinct >= 40_000 * 0.99, "what the bounds drop is still counted"
    # the prefix cache: a flood from everywhere never repeats a /64 (it held 65,536 of them,
    # 16 MiB, the IPv6 flood's growth); now a few MiB at most whatever the flood
    sampler = object.__new__(SynSampler)
    sampler.v4_len, sampler.v6_len, sampler._prefixes = 24, 64, {}
    tracemalloc.start()
    try:
        for i in range(50_000):
            sampler._prefix(6, bytes.fromhex("fd32") + i.to_bytes(6, "big") + bytes(8))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(sampler._prefixes) <= PREFIX_CACHE
    assert peak < 4 << 20, f"{peak / (1 << 20):.1f} MiB"


def test_recorded_line_is_bounded() -> None:
    """A recording line of a flood from everywhere: the sample's KEPT entries, not the
    interval's whole tables (a line per probe of megabytes stalled the probes)."""
    interval = _sample_interval()
    sampled = interval.summary(7)
    snap = Snapshot("ns", (), {}, {})
    now = datetime.now(timezone.utc)
    line = json.dumps(evidence_line(now, Evidence(
        now, snap, {(20000, f"fd32:{i:x}::/64"): 1 for i in range(65536)}, sampled)))
    assert len(line) < 512 * 1024, len(line)  # 2.5 MB before: 65,536 accounting elements


def test_tally_bounded_under_an_ipv6_flood() -> None:
    tally = Tally(family=6, address="::", port=20000)
    snap = Snapshot("ns", (), {}, {})
    for _ in range(5):
        sampled = _sample_interval().summary(7)
        probe = ProbeDelta(snap, dict.fromkeys(("syns_overflowed", "syns_dropped",
                                                "cookies_sent", "cookies_recv",
                                                "passive_opens", "listen_overflows"), 0),
                           dict.fromkeys(("syns_overflowed", "listen_overflows"), 0.0),
                           {(20000, f"fd32:{i:x}::/64"): 1 for i in range(20_000)}, sampled,
                           {}, frozenset())
        tally.absorb(None, probe, active=True)
        for table in (tally.sampled, tally.sampled_seen, tally.sampled_addr, tally.accounted,
                      tally.completed, tally.prefixes, tally.connected):
            assert len(table) <= MAX_PREFIXES


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    ns.sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(ns.path))
    yield ns
    ns.sock.close()


def _datagrams(ns: NotifySocket) -> list[str]:
    """What was sent so far (sd_notify sends synchronously: nothing more is on its way)."""
    out = []
    while True:
        try:
            out.append(ns.sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_watchdog_fed_only_while_probing(tmp_path: Path, notify: NotifySocket,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="synwatch")
    config = tmp_path / "synwatch.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n'
                      '[sources]\njournald = false\nkmsg = false\nfiles = []\n'
                      '[incident]\nprobe_interval = "0.1s"\nsampler = false\n'
                      '[actions]\ndry_run = true\n')
    clock = FrozenClock(datetime.now(timezone.utc))  # the loop's time, moved by the test
    service = RunningService(load_config(str(config)), str(config), clock=clock)
    service._start()
    try:
        ping = 0.05
        service._probe(service.watch.all()[0])
        service.watchdog.tick(ping)
        assert _datagrams(notify) == ["WATCHDOG=1"]
        clock.advance(ping)
        service.watchdog.tick(ping)
        assert _datagrams(notify) == ["WATCHDOG=1"], "fed while the last probe is recent"
        # the loop turns, but no probe step ends: past a probe interval and a ping interval
        # the watchdog goes unfed, however often the loop asks
        clock.advance(0.1 + ping)
        for _ in range(3):
            service.watchdog.tick(ping)
            clock.advance(ping)
        assert _datagrams(notify) == [], "no WATCHDOG=1 once the probes stopped"
        assert "systemd's watchdog is no longer fed" in caplog.text
        service._probe(service.watch.all()[0])  # probing again: fed again at once
        service.watchdog.tick(ping)
        assert _datagrams(notify) == ["WATCHDOG=1"]
        assert "fed again" in caplog.text
    finally:
        assert service.supervisor is not None
        for responder in service.watch.responders():
            responder.stop()
        service.supervisor.stop()
        assert service.store is not None
        service.store.close()
