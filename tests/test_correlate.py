"""The correlator and the verdict rules, without a kernel: golden replays of evidence recorded in
the lab scenarios (tests/data/replays, written by test_incidents_lab.py with
SYNWATCH_SAVE_REPLAYS), constructed evidence for the edges, and the rules one by one."""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from synwatch.clock import FrozenClock
from synwatch.config import Thresholds
from synwatch.detect.correlate import Correlator
from synwatch.detect.replay import replay
from synwatch.detect.tally import Tally
from synwatch.detect.verdict import judge, suggested_backlog
from synwatch.probes.evidence import Evidence
from synwatch.probes.sampled import PortSample, SynSample
from synwatch.probes.snapshot import ListenerState, Snapshot
from synwatch.probes.sockdiag import Listener
from synwatch.records import KernelEvent, LogRecord, StoredEvent
from tests.support import DATA, NOW
from tests.support.cli import synwatch

REPLAYS = DATA / "replays"
LAB_QUIET = 3.0  # the quiet period the lab scenarios ran with
FIELDS = ("verdict", "trigger", "status", "opened_at", "closed_at", "peak_syn_recv",
          "top_prefixes", "recommendations")


def _replayed(name: str, th: Thresholds | None = None, quiet: float = LAB_QUIET) -> list[dict]:
    from synwatch.cli.views import change_view

    return [{k: change_view(c)[k] for k in FIELDS}
            for c in replay(str(REPLAYS / f"{name}.jsonl"), th or Thresholds(), quiet)]


GOLDEN = {"concentrated": "concentrated", "spoofed": "spoofed", "capacity": "capacity",
          "second-flood": "concentrated", "spoofed-sampled": "spoofed",
          "half-open": "concentrated", "not-accepting": "capacity"}


def test_an_application_that_stopped_accepting_is_said_so_not_told_to_raise_its_backlog(
        ) -> None:
    """Recorded in the lab: a listener whose application never calls accept(), its queue full
    (5 of 4) while clients keep coming for 14 s. A burst that fills it for a second or two
    (the "capacity" recording) is told to raise its backlog; this one is told that it is not
    accepting, and that a larger backlog would not help."""
    [stuck] = _replayed("not-accepting")
    [rec] = stuck["recommendations"]
    assert " is not accepting connections: its accept queue has been full (5 of 4) for " in rec
    assert "a larger backlog would not help" in rec and "raise the listen backlog" not in rec
    [burst] = _replayed("capacity")
    assert any("raise the listen backlog" in r for r in burst["recommendations"])
    assert not any("not accepting" in r for r in burst["recommendations"])


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_replay(name: str) -> None:
    want = json.loads((REPLAYS / f"{name}.expected.json").read_text())
    assert _replayed(name) == want
    assert want[-1]["verdict"] == GOLDEN[name]


def test_replay_cli_gives_the_same(tmp_path: Path) -> None:
    """A recording carries the settings it was made with (quiet_period 3 s in the lab), so the
    CLI replays it as it happened without being told; --config overrides them."""
    r = synwatch("replay", str(REPLAYS / "second-flood.jsonl"), "--format", "json")
    assert r.code == 0, r.err
    got = [{k: i[k] for k in FIELDS} for i in json.loads(r.out)]
    assert got == json.loads((REPLAYS / "second-flood.expected.json").read_text())
    table = synwatch("replay", str(REPLAYS / "capacity.jsonl"))
    assert "capacity" in table.out and "accept queue peaked at 5 of 4" in table.out
    longer = tmp_path / "c.toml"
    longer.write_text('[incident]\nquiet_period = "10m"\n')
    r = synwatch("replay", str(REPLAYS / "second-flood.jsonl"), "--format", "json",
                 "--config", str(longer))
    assert [i["status"] for i in json.loads(r.out)] == ["open"]  # one incident, not closed


def test_replay_of_a_bad_file_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "evidence"}\n')
    r = synwatch("replay", str(bad))
    assert r.code == 2 and r.err.startswith(f"synwatch: {bad}:1: not a synwatch recording")


def test_thresholds_change_the_verdict_of_the_same_evidence() -> None:
    # two /24s of about 50% each: concentrated for "4 prefixes carry 80%", not for "1 carries"
    [two] = _replayed("concentrated", Thresholds(concentrated_prefixes=1))
    assert two["verdict"] == "unknown"
    assert "neither concentrated" in two["recommendations"][0]
    [spread] = _replayed("spoofed", Thresholds(spoofed_min_prefixes=500))
    assert spread["verdict"] == "unknown"
    [cap] = _replayed("capacity", Thresholds(concentrated_share=0.0))
    assert cap["verdict"] == "capacity"  # real load is never "concentrated"


def test_a_long_quiet_period_makes_the_second_flood_part_of_the_first() -> None:
    [one] = _replayed("second-flood", quiet=60)
    assert (one["trigger"], one["status"]) == ("log", "open")
    # both floods' sources (2,000 SYNs each: which one the sample ranks first is chance)
    assert {p["prefix"] for p in one["top_prefixes"]} == {"10.232.7.0/24", "10.232.8.0/24"}


# -- constructed evidence -----------------------------------------------------------------------

PORT = 8080


def _snap(syn_recv: int = 0, accept: int = 0, backlog: int = 64, cookies: int = 0,
          qfull: int = 0, recv: int = 0, prefixes: tuple[tuple[str, int], ...] = (),
          mode: int = 1) -> Snapshot:
    counters = {"TcpExt.TCPReqQFullDoCookies": qfull, "TcpExt.SyncookiesSent": cookies,
                "TcpExt.SyncookiesRecv": recv}
    li = ListenerState(Listener(4, "0.0.0.0", PORT, backlog, accept), syn_recv, prefixes,
                       len(prefixes))
    return Snapshot("", (li,), counters, {"net.ipv4.tcp_syncookies": mode,
                                          "net.core.somaxconn": 4096})


def _event(event_id: int, trusted: bool, clock: FrozenClock, ago: float = 0,
           port: int = PORT) -> StoredEvent:
    line = f"TCP: request_sock_TCP: Possible SYN flooding on port 0.0.0.0:{port}. Sending cookies."
    rec = LogRecord(line, "kmsg", line, clock.now() - timedelta(seconds=ago), None, trusted)
    return StoredEvent(event_id, KernelEvent("syn_flood", 4, "0.0.0.0", port, "cookies", None,
                                             None, "kernel-synflood", "form-f", rec))


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


@pytest.fixture
def corr(clock: FrozenClock) -> Correlator:
    c = Correlator("h", "", Thresholds(), 10, clock)
    c.on_evidence(Evidence(clock.now(), _snap()))
    return c


def _probe(corr: Correlator, clock: FrozenClock, snap: Snapshot) -> list:
    clock.advance(1)
    return corr.on_evidence(Evidence(clock.now(), snap))


def test_untrusted_lines_open_nothing_until_the_kernel_agrees(
        corr: Correlator, clock: FrozenClock) -> None:
    assert corr.on_event(_event(1, False, clock)) == []
    assert _probe(corr, clock, _snap(syn_recv=2, qfull=5)) == []  # below open_rate
    [opened] = _probe(corr, clock, _snap(syn_recv=64, qfull=500, cookies=495,
                                         prefixes=(("10.9.9.0/24", 64),)))
    assert (opened.change, opened.trigger, opened.port) == ("opened", "counters", PORT)
    assert opened.event_ids == (1,)  # the untrusted line, corroborated and linked
    assert opened.first_evidence_at == NOW  # counters started moving in the first interval
    assert opened.detected_at == clock.now()
    assert opened.verdict == "concentrated"


def test_a_trusted_line_opens_at_its_own_time_and_a_stale_one_opens_nothing(
        corr: Correlator, clock: FrozenClock) -> None:
    assert corr.on_event(_event(1, True, clock, ago=11)) == []  # older than the quiet period
    printed = clock.now() - timedelta(seconds=0.2)
    assert corr.on_event(_event(2, True, clock, ago=0.2)) == []  # until a probe shows it here
    # the probe the service takes at once: this namespace's counters moved meanwhile
    [opened] = _probe(corr, clock, _snap(syn_recv=64, qfull=200, cookies=200))
    assert opened.trigger == "log" and opened.opened_at == printed
    assert opened.event_ids == (2,) and opened.sample is not None
    assert opened.state["tally"]["syns_overflowed"] == 200  # the probe is its evidence
    [again] = corr.on_event(_event(3, True, clock))  # a second socket of the same listener
    assert (again.change, again.serial, again.event_ids) == ("updated", opened.serial, (3,))


def test_a_line_this_namespace_shows_no_overflow_for_opens_nothing(
        corr: Correlator, clock: FrozenClock, caplog: pytest.LogCaptureFixture) -> None:
    """A user can make the kernel print a genuine line for any port from a namespace of their
    own (`unshare -rn`, a veth, raw SYNs): a port listened on here is not enough, the
    namespace's own counters or sockets must show the overflow within two probes."""
    caplog.set_level(logging.INFO, logger="synwatch.detect")
    assert corr.on_event(_event(1, True, clock)) == []
    assert _probe(corr, clock, _snap()) == [] and len(corr.held) == 1
    assert _probe(corr, clock, _snap()) == [] and not corr.held
    assert "port 8080: no overflow in the host's namespace: another namespace's line" \
        in caplog.text
    assert _probe(corr, clock, _snap(qfull=9)) == []  # later, below open_rate: not its evidence


def test_a_line_is_not_corroborated_by_another_listeners_overflow(
        corr: Correlator, clock: FrozenClock) -> None:
    """This namespace overflows on 9001 (its queue full) while a line names the idle 8080."""
    busy = _listening_on(9001, syn_recv=128)
    _probe(corr, clock, busy)
    assert corr.on_event(_event(1, True, clock)) == []
    for qfull in (50, 100):
        changes = _probe(corr, clock, replace(busy, counters={
            **busy.counters, "TcpExt.TCPReqQFullDoCookies": qfull}))
        assert all(c.port != PORT for c in changes)
    assert not corr.held


def test_a_burst_read_before_the_next_probe_is_corroborated_by_it(
        corr: Correlator, clock: FrozenClock) -> None:
    """A burst shorter than a probe interval: the probe after the line sees the queue empty
    again, but the counters moved in the interval that holds the line."""
    assert corr.on_event(_event(1, True, clock, ago=0.1)) == []
    [opened] = _probe(corr, clock, _snap(qfull=9, cookies=9))
    assert (opened.trigger, opened.port) == ("log", PORT)
    assert opened.state["tally"]["syns_overflowed"] == 9


def _listening_on(port: int, syn_recv: int = 0) -> Snapshot:
    snap = _snap()
    other = ListenerState(Listener(4, "0.0.0.0", port, 128, 0), syn_recv, (), 0)
    return replace(snap, listeners=(*snap.listeners, other))


def test_a_flood_that_overflows_on_past_the_probe_it_filled_its_queue_in_is_its_own(
        corr: Correlator, clock: FrozenClock) -> None:
    """Beside an earlier flood's residue (9001, full and still), a new flood fills 8080 in one
    probe and overflows on into the next, whose sample holds none of its SYNs: the residue
    gets nothing (the lab saw it get an incident of its own under load)."""
    for _ in range(5):  # the residue: full, not moving
        assert _probe(corr, clock, _listening_on(9001, syn_recv=128)) == []
    filling = replace(_listening_on(9001, syn_recv=128), listeners=(
        replace(_snap().listeners[0], syn_recv=64),
        _listening_on(9001, syn_recv=128).listeners[1]))
    opened = _probe(corr, clock, replace(filling, counters={
        **filling.counters, "TcpExt.TCPReqQFullDoCookies": 50}))
    later = _probe(corr, clock, replace(filling, counters={
        **filling.counters, "TcpExt.TCPReqQFullDoCookies": 100}))
    assert {c.port for c in opened + later} == {PORT}


def test_a_failed_probe_is_replayed_as_the_service_handled_it(tmp_path: Path) -> None:
    """When a probe fails the service closes what has been quiet (and lets held lines go): a
    recording says so, and its replay closes the incident at that moment too (a loaded CI
    machine once replayed an incident differently from the live one)."""
    from synwatch.detect.replay import event_line, evidence_line, probe_failed_line, settings_line

    clock = FrozenClock(NOW)
    lines = [settings_line(Thresholds(), 10), evidence_line(NOW, Evidence(NOW, _snap()))]
    t1 = NOW + timedelta(seconds=1)
    lines.append(evidence_line(t1, Evidence(t1, _snap(syn_recv=64, qfull=500, cookies=500))))
    lines.append(event_line(t1, _event(1, True, clock)))
    t2 = NOW + timedelta(seconds=2)
    lines.append(evidence_line(t2, Evidence(t2, _snap(syn_recv=64, qfull=1000, cookies=1000))))
    gone_quiet = NOW + timedelta(seconds=30)  # then the probes failed
    lines.append(probe_failed_line(gone_quiet, gone=False))
    recording = tmp_path / "r.jsonl"
    recording.write_text("".join(json.dumps(d) + "\n" for d in lines))
    [incident] = replay(str(recording), Thresholds(), 10)
    assert (incident.status, incident.change) == ("closed", "closed")
    assert incident.closed_at == gone_quiet  # when the service closed it


def test_a_line_for_a_port_nobody_here_listens_on_waits_for_the_next_probe(
        corr: Correlator, clock: FrozenClock, caplog: pytest.LogCaptureFixture) -> None:
    """The kernel's log is every namespace's: a line opens an incident only where its port
    is listened on, checked by the next probe for a listener newer than the last one."""
    caplog.set_level(logging.INFO, logger="synwatch.detect")
    assert corr.on_event(_event(1, True, clock, port=9001)) == []  # held
    assert corr.on_event(_event(2, True, clock, port=9002)) == []
    printed = clock.now()
    assert len(corr.held) == 2
    # a new listener, its queue full: 9001 is ours
    [opened] = _probe(corr, clock, _listening_on(9001, syn_recv=128))
    assert (opened.change, opened.trigger, opened.port) == ("opened", "log", 9001)
    assert opened.opened_at == printed and opened.event_ids == (1,)
    assert not corr.held and "event 2: nothing listens on port 9002" in caplog.text
    assert all(c.port != 9002 for c in _probe(corr, clock, _listening_on(9001)))


def test_held_lines_wait_for_a_probe_when_none_can_check_them(
        corr: Correlator, clock: FrozenClock) -> None:
    """Probes failing: a line opens nothing on its own word (it may be any namespace's); the
    first probe that works covers its interval, and a line older than the quiet period by
    then stays an event."""
    assert corr.on_event(_event(1, True, clock, port=9001)) == []
    assert corr.release_held() == [] and len(corr.held) == 1
    [opened] = _probe(corr, clock, _listening_on(9001, syn_recv=128))
    assert (opened.change, opened.trigger, opened.port, opened.event_ids) == (
        "opened", "log", 9001, (1,))
    assert corr.on_event(_event(2, True, clock, port=9002)) == []
    clock.advance(11)
    assert corr.release_held() == [] and not corr.held


def test_quiet_period_closes_and_counters_keep_it_open(corr: Correlator,
                                                       clock: FrozenClock) -> None:
    corr.on_event(_event(1, True, clock))
    for i in range(1, 15):  # counters keep moving for 14 s: stays open
        *_, c = _probe(corr, clock, _snap(syn_recv=64, qfull=100 * i, cookies=100 * i,
                                          prefixes=(("10.1.1.0/24", 64),)))
        assert c.status == "open"
    for _ in range(9):
        [c] = _probe(corr, clock, _snap(syn_recv=64, qfull=1400, cookies=1400))
        assert c.status == "open"  # a full queue without new overflows is residue, not activity
    [closed] = _probe(corr, clock, _snap(qfull=1400, cookies=1400))
    assert closed.change == "closed" and closed.closed_at == clock.now()
    assert closed.sample is None and corr.open == {}


def test_a_closed_floods_request_sockets_open_no_half_open_incident_until_they_drain(
        corr: Correlator, clock: FrozenClock) -> None:
    """A flood's request sockets outlive it by a minute (tcp_synack_retries=5): its queue
    stays full past the quiet period that closes its incident, and that is no slow flood. A
    build-up after they drained is one."""
    corr.on_event(_event(1, True, clock))
    for i in range(1, 6):  # the flood: its queue full, the counters moving
        _probe(corr, clock, _snap(syn_recv=1024, backlog=1024, qfull=1000 * i,
                                  cookies=1000 * i, prefixes=(("10.1.1.0/24", 1024),)))
    changes: list = []
    for _ in range(40):  # over: the queue stays full for longer than quiet + half_open_for
        changes += _probe(corr, clock, _snap(syn_recv=1024, backlog=1024, qfull=5000,
                                             cookies=5000))
    assert [c.change for c in changes if c.change != "updated"] == ["closed"]
    assert corr.open == {}
    _probe(corr, clock, _snap(backlog=1024, qfull=5000, cookies=5000))  # drained
    opened = []
    for _ in range(int(Thresholds().half_open_for) + 2):  # a slow flood parks it half full
        opened += [c for c in _probe(corr, clock, _snap(syn_recv=600, backlog=1024,
                                                        qfull=5000, cookies=5000))
                   if c.change == "opened"]
    assert [c.trigger for c in opened] == ["half_open"]


def test_a_slow_flood_after_a_fast_one_is_a_half_open_incident_without_a_drain(
        corr: Correlator, clock: FrozenClock) -> None:
    """The residue rule holds only while no new SYN comes: a fast flood that turns slow, its
    queue never drained, keeps it half full with new requests (the queue grows again), and
    that build-up opens its half_open incident; so does one after the residue's retries."""
    corr.on_event(_event(1, True, clock))
    for i in range(1, 4):
        _probe(corr, clock, _snap(syn_recv=1024, backlog=1024, qfull=1000 * i,
                                  cookies=1000 * i))
    changes: list = []
    for _ in range(15):  # quiet: closes with its queue full
        changes += _probe(corr, clock, _snap(syn_recv=1024, backlog=1024, qfull=3000,
                                             cookies=3000))
    assert [c.change for c in changes if c.change != "updated"] == ["closed"]
    opened = []
    for n in range(int(Thresholds().half_open_for) + 3):  # new SYNs: SYN-RECV rises, no overflow
        opened += [c for c in _probe(corr, clock, _snap(syn_recv=600 + n, backlog=1024,
                                                        qfull=3000, cookies=3000))
                   if c.change == "opened"]
    assert [c.trigger for c in opened] == ["half_open"]


def test_the_counters_that_count_a_burst_a_probe_late_are_still_its_listeners(
        clock: FrozenClock) -> None:
    """The packet socket sees a burst's SYNs before TCP has counted them all: the sample
    names the new flood's port in one probe, the counters go on moving into the next, whose
    sample holds none. A queue full of an earlier flood's request sockets beside it gets no
    incident from that."""
    residue, new = 8080, 9090

    def two(qfull: int, new_recv: int) -> Snapshot:
        states = tuple(ListenerState(Listener(4, "0.0.0.0", port, 16, 0), recv, (), 0)
                       for port, recv in ((residue, 17), (new, new_recv)))
        return Snapshot("", states, {"TcpExt.TCPReqQFullDoCookies": qfull,
                                     "TcpExt.SyncookiesSent": qfull},
                        {"net.ipv4.tcp_syncookies": 1, "net.core.somaxconn": 4096})

    corr = Correlator("h", "", Thresholds(), 10, clock)
    corr.on_evidence(Evidence(clock.now(), two(2000, 0)))
    assert _probe(corr, clock, two(2000, 0)) == []  # the residue: full, still
    burst = SynSample(1, 1.0, (PortSample(new, 400, 1600, (("10.232.10.0/24", 1600, 400),),
                                          1, 0, 0),))
    clock.advance(1)
    first = corr.on_evidence(Evidence(clock.now(), two(3100, 17), sampled=burst))
    assert [(c.change, c.port) for c in first] == [("opened", new)]
    late = _probe(corr, clock, two(3900, 17))  # counted now, sampled before
    assert {c.port for c in late} == {new}, late
    assert [i.tally.port for i in corr.open.values()] == [new]


def test_counters_with_no_full_queue_open_one_unattributed_incident(
        corr: Correlator, clock: FrozenClock) -> None:
    # tcp_syncookies=2: every SYN gets a cookie, no request socket, no line
    [opened] = _probe(corr, clock, _snap(qfull=300, cookies=300))
    assert (opened.port, opened.address, opened.trigger) == (None, None, "counters")
    assert _probe(corr, clock, _snap(qfull=600, cookies=600))[0].change == "updated"


def test_with_cookies_for_every_syn_only_unvalidated_cookies_open_an_incident(
        corr: Correlator, clock: FrozenClock) -> None:
    """tcp_syncookies=2 counts every SYN in TCPReqQFullDoCookies: a busy healthy server (500
    handshakes a second, every cookie back) opens nothing; cookies that never come back do."""
    sent = 0
    for _ in range(5):
        sent += 500
        assert _probe(corr, clock, _snap(qfull=sent, cookies=sent, recv=sent, mode=2)) == []
    [opened] = _probe(corr, clock, _snap(qfull=sent + 2000, cookies=sent + 2000, recv=sent + 10,
                                         mode=2))
    assert (opened.change, opened.trigger) == ("opened", "counters")
    assert any("1990 SYN cookies were sent and never came back" in r for r in opened.reasons)


def test_accounting_set_attributes_when_queues_stay_empty(corr: Correlator,
                                                          clock: FrozenClock) -> None:
    snap = _snap(qfull=0)
    clock.advance(1)
    corr.on_evidence(Evidence(clock.now(), snap, {(PORT, "10.5.5.0/24"): 10}))
    clock.advance(1)
    [opened] = corr.on_evidence(Evidence(clock.now(), _snap(qfull=400, cookies=400),
                                         {(PORT, "10.5.5.0/24"): 410, (PORT, "10.6.0.0/24"): 5}))
    assert opened.port == PORT
    assert opened.top_prefixes[0][:2] == ("10.5.5.0/24", 400)


def test_resume_after_restart_keeps_the_tally(corr: Correlator, clock: FrozenClock) -> None:
    corr.on_event(_event(1, True, clock))
    *_, c = _probe(corr, clock, _snap(syn_recv=64, qfull=900, cookies=900,
                                      prefixes=(("10.1.1.0/24", 64),)))
    fresh = Correlator("h", "", Thresholds(), 10, clock)
    serial = fresh.resume(replace(c, incident_id=7))
    fresh.on_evidence(Evidence(clock.now(), _snap(syn_recv=64, qfull=900, cookies=900)))
    [after] = _probe(fresh, clock, _snap(syn_recv=64, qfull=1900, cookies=1900,
                                         prefixes=(("10.1.1.0/24", 64),)))
    assert (after.serial, after.verdict) == (serial, "concentrated")
    assert after.state["tally"]["syns_overflowed"] == 1900


def test_what_overflowed_while_stopped_is_the_resumed_incidents_within_the_quiet_period(
        corr: Correlator, clock: FrozenClock) -> None:
    """The counters of the last probe before a stop are saved with the incident: the first
    probe after the restart measures the downtime against them, if it was shorter than the
    quiet period (longer, the incident is over and what came later is not its evidence)."""
    corr.on_event(_event(1, True, clock))
    *_, c = _probe(corr, clock, _snap(syn_recv=64, qfull=900, cookies=900,
                                      prefixes=(("10.1.1.0/24", 64),)))
    saved_at = clock.now()
    for downtime, absorbed in ((5, 3900), (30, 900)):
        clock = FrozenClock(saved_at)
        fresh = Correlator("h", "", Thresholds(), 10, clock)
        fresh.resume(replace(c, incident_id=7))
        clock.advance(downtime)
        changes = fresh.on_evidence(Evidence(clock.now(), _snap(syn_recv=64, qfull=3900,
                                                                cookies=3900)))
        [after] = [x for x in changes if x.incident_id is None and x.serial == 1]
        assert after.state["tally"]["syns_overflowed"] == absorbed, downtime


def test_expire_closes_without_probes(corr: Correlator, clock: FrozenClock) -> None:
    corr.on_event(_event(1, True, clock))
    [opened] = _probe(corr, clock, _snap(syn_recv=64, qfull=100, cookies=100))
    assert opened.trigger == "log"
    clock.advance(9)
    assert corr.expire(clock.now()) == []
    clock.advance(1)
    assert [c.change for c in corr.expire(clock.now())] == ["closed"]


def test_counter_reset_is_not_a_flood(corr: Correlator, clock: FrozenClock) -> None:
    _probe(corr, clock, _snap(qfull=10))
    assert _probe(corr, clock, _snap(qfull=0)) == []  # namespace recreated: counters restart


# -- the rules ----------------------------------------------------------------------------------

def _tally(**kw: object) -> Tally:
    base: dict[str, object] = {"family": 4, "address": "0.0.0.0", "port": 80, "backlog": 128,
                               "sysctls": {"net.ipv4.tcp_syncookies": 1,
                                           "net.core.somaxconn": 4096}}
    base.update(kw)
    return Tally(**base)  # type: ignore[arg-type]


def test_completed_handshakes_are_capacity_even_from_few_prefixes() -> None:
    j = judge(_tally(syns_overflowed=1000, cookies_sent=1000, cookies_recv=700,
                     peak_syn_recv=128, peak_overflow_rate=900, syn_recv_sum=128,
                     prefixes={"192.0.2.0/24": 128}, prefix_count=1), Thresholds())
    assert j.verdict == "capacity"
    assert "70% of the overflowing SYNs completed a handshake" in j.recommendations[0]
    assert "from 128 to 2048" in j.recommendations[1]  # 128 + 900/s, rounded up to 2^k


def test_somaxconn_clamp_cookies_off_and_listen0_are_recommended() -> None:
    j = judge(_tally(backlog=0, syns_overflowed=50, syns_dropped=50, passive_opens=0,
                     syn_recv_sum=0, peak_overflow_rate=500, sysctls={"net.ipv4.tcp_syncookies": 0,
                                              "net.core.somaxconn": 128}), Thresholds())
    text = "\n".join(j.recommendations)
    assert j.verdict == "unknown"
    assert "listens with backlog 0 (listen(fd, 0))" in text
    assert "give listen() a backlog of 512" in text
    assert "net.core.somaxconn is 128 and clamps" in text
    assert "sysctl -w net.core.somaxconn=512" in text
    assert "net.ipv4.tcp_syncookies is 0" in text and "(50 SYNs were dropped)" in text


def test_no_overflow_is_unknown_whatever_the_sources() -> None:
    j = judge(_tally(syn_recv_sum=10, prefixes={"192.0.2.0/24": 10}), Thresholds())
    assert j.verdict == "unknown" and "no SYN overflowed" in j.recommendations[0]


def test_suggested_backlog_is_a_bounded_power_of_two() -> None:
    assert suggested_backlog(_tally(backlog=4)) == 128
    assert suggested_backlog(_tally(backlog=511, peak_syn_recv=512)) == 1024
    assert suggested_backlog(_tally(backlog=60000, peak_overflow_rate=1e9)) == 65535


def test_prefix_counts_stay_bounded_under_a_flood_from_everywhere(
        corr: Correlator, clock: FrozenClock) -> None:
    from synwatch.detect.delta import MAX_PREFIXES

    corr.on_event(_event(1, True, clock))
    qfull = 0
    for i in range(80):
        qfull += 1000
        many = tuple((f"10.{i}.{j}.0/24", 1) for j in range(64))
        *_, c = _probe(corr, clock, _snap(syn_recv=64, qfull=qfull, cookies=qfull,
                                          prefixes=many))
        assert len(c.state["tally"]["prefixes"]) <= MAX_PREFIXES
    assert c.verdict == "spoofed"
    assert c.state["tally"]["prefix_count"] == MAX_PREFIXES  # the widest it has seen


# -- statistics ---------------------------------------------------------------------------------

def test_wilson_bounds_are_honest_for_small_samples() -> None:
    from synwatch.detect.stats import wilson

    low, high = wilson(1.0, 16)
    assert 0.80 < low < 0.81 and high == 1.0  # 16 of 16: at least 80.6 %
    low, high = wilson(0.25, 16)
    assert high < 0.5  # 4 of 16 can never be "80 % from four prefixes"
    assert wilson(0.5, 0) == (0.0, 1.0)
    low, high = wilson(0.5, 10_000)
    assert high - low < 0.02


def test_chao1_sees_the_prefixes_a_sample_missed() -> None:
    from synwatch.detect.stats import chao1

    assert chao1(16, 16, 0) == 16 + 120  # all different: far more out there
    assert chao1(4, 0, 0) == 4  # every prefix seen repeatedly: that is all of them
    assert chao1(10, 2, 4) == 10 + 1


def test_aggregate_joins_complete_blocks_only_and_never_too_wide() -> None:
    from synwatch.detect.stats import aggregate

    quad = [f"10.99.{n}.0/24" for n in (32, 33, 34, 35)]
    assert aggregate(quad) == ["10.99.32.0/22"]
    assert aggregate(quad[:3]) == ["10.99.32.0/23", "10.99.34.0/24"]  # nothing unseen covered
    assert aggregate([f"10.7.{n}.0/24" for n in range(256)]) == ["10.7.0.0/16"]
    assert aggregate([f"10.{a}.{b}.0/24" for a in (6, 7) for b in range(256)], 16) == [
        "10.6.0.0/16", "10.7.0.0/16"]  # a /15 is split back at the widest allowed
    assert aggregate(["2001:db8:0:0::/64", "2001:db8:0:1::/64"]) == ["2001:db8::/63"]


def test_sixteen_sockets_from_sixteen_networks_are_already_spoofed() -> None:
    """The socket table's sample is small, but sixteen different /24s in sixteen request sockets
    with no handshake completing cannot be a few networks."""
    prefixes = {f"198.51.{n}.0/24": 1 for n in range(16)}
    j = judge(_tally(backlog=16, syns_overflowed=6000, cookies_sent=6000, peak_syn_recv=16,
                     peak_overflow_rate=3000, syn_recv_sum=16, prefixes=prefixes,
                     prefix_count=16, socket_n=16, socket_distinct=16, socket_singletons=16),
              Thresholds())
    assert j.verdict == "spoofed", j
    assert "about 136 prefixes" in j.recommendations[0]
    assert any("request sockets: 16 request sockets" in r for r in j.reasons)


def test_a_few_sockets_from_one_network_are_not_enough_to_ban() -> None:
    j = judge(_tally(backlog=5, syns_overflowed=600, cookies_sent=600, peak_syn_recv=5,
                     peak_overflow_rate=300, syn_recv_sum=5, prefixes={"198.51.7.0/24": 5},
                     prefix_count=1, socket_n=5, socket_distinct=1), Thresholds())
    assert j.verdict == "unknown"  # 5 of 5 is at least 57 %: not the 80 % a ban needs
    assert "at least 57% at 95% confidence from 5 samples" in j.recommendations[0]


def test_the_packet_sample_outranks_the_sockets_and_says_so() -> None:
    sampled = {"198.51.7.0/24": 900, "198.51.8.0/24": 80, "203.0.113.0/24": 20}
    j = judge(_tally(backlog=16, syns_overflowed=1000, cookies_sent=1000, peak_syn_recv=16,
                     syn_recv_sum=16, prefixes={"203.0.113.0/24": 16}, prefix_count=1,
                     sampled=sampled, sampled_seen={"198.51.7.0/24": 90, "198.51.8.0/24": 8,
                                                    "203.0.113.0/24": 2},
                     sampled_n=100, sampled_syns=1000, one_in=10), Thresholds())
    assert j.verdict == "concentrated"
    assert [p for p, *_ in j.top_prefixes] == list(sampled)
    assert any("packet sample: 100 SYNs sampled, 1 in 10, ~1000 SYNs" in r for r in j.reasons)


def test_half_open_build_up_is_judged_without_an_overflow() -> None:
    base = {"half_open": True, "backlog": 511, "peak_syn_recv": 200, "syn_recv_sum": 200,
            "socket_n": 200}
    quad = {f"10.99.{n}.0/24": 50 for n in (32, 33, 34, 35)}
    j = judge(_tally(**base, prefixes=quad, prefix_count=4, socket_distinct=4), Thresholds())
    assert j.verdict == "concentrated"
    assert "block 10.99.32.0/22 ([actions.ban]" in j.recommendations[0]
    assert "10.99.32.0/22: 4 flooding /24s fill it" in j.recommendations[1]
    assert "harmless at this rate so far: 200 request sockets, 39% of the queue" in \
        j.recommendations[-1]
    assert any("200 request sockets stayed half-open" in r for r in j.reasons)
    spread = {f"10.{n // 250}.{n % 250}.0/24": 1 for n in range(200)}
    j = judge(_tally(**base, prefixes=spread, prefix_count=200, socket_distinct=200,
                     socket_singletons=200), Thresholds())
    assert j.verdict == "spoofed"
    assert "200 SYNs never completed" in j.recommendations[1]
    real = judge(_tally(**base, passive_opens=5000, prefixes=spread, prefix_count=200),
                 Thresholds())
    assert real.verdict == "unknown"  # handshakes complete: not forged


def _listener(port: int, syn_recv: int, backlog: int = 511,
              prefixes: tuple[tuple[str, int], ...] = ()) -> ListenerState:
    return ListenerState(Listener(4, "0.0.0.0", port, backlog, 0), syn_recv, prefixes,
                         len(prefixes))


def test_half_open_opens_after_the_build_up_lasts_and_not_for_completing_clients(
        clock: FrozenClock) -> None:
    th = Thresholds(half_open_for=5)
    corr = Correlator("h", "", th, 10, clock)
    quad = tuple((f"10.99.{n}.0/24", 40) for n in (32, 33, 34, 35))
    passive = 0
    opened = []
    for _ in range(12):
        snap = Snapshot("", (_listener(80, 160, prefixes=quad), _listener(443, 200)),
                        {"Tcp.PassiveOpens": passive}, {"net.ipv4.tcp_syncookies": 1})
        passive += 300  # port 443's clients complete 300 handshakes a second
        got = corr.on_evidence(Evidence(clock.now(), snap))
        opened += [c for c in got if c.change == "opened"]
        clock.advance(1)
    # 443 is high too, but the namespace completes handshakes far faster than requests pile up
    assert opened == []
    corr = Correlator("h", "", th, 10, clock)
    start = clock.now()
    for second in range(8):
        snap = Snapshot("", (_listener(80, 160 if second else 10, prefixes=quad),),
                        {"Tcp.PassiveOpens": 3}, {"net.ipv4.tcp_syncookies": 1})
        opened += [c for c in corr.on_evidence(Evidence(clock.now(), snap))
                   if c.change == "opened"]
        clock.advance(1)
    [inc] = opened
    assert (inc.trigger, inc.port, inc.verdict) == ("half_open", 80, "concentrated")
    assert inc.first_evidence_at == start + timedelta(seconds=1)
    assert inc.opened_at == start + timedelta(seconds=6)


def test_a_burst_between_two_probes_is_the_log_lines_evidence(
        corr: Correlator, clock: FrozenClock) -> None:
    """The kernel prints its line when the overflow begins; the probe after a one-second burst
    sees the counters already still. The interval it happened in is its evidence."""
    _probe(corr, clock, _snap(syn_recv=0, qfull=0))
    _probe(corr, clock, _snap(syn_recv=0, qfull=9, cookies=3000, recv=2900))  # below open_rate
    [opened] = corr.on_event(_event(1, True, clock, ago=0.5))
    assert opened.trigger == "log"
    assert opened.state["tally"]["syns_overflowed"] == 9


def test_a_flood_that_changes_character_gets_a_new_phase_and_its_verdict(
        clock: FrozenClock) -> None:
    """Spoofed noise first, then a flood from one /24 within the quiet period: one incident,
    a second phase judged on its own evidence, so the bannable part is banned."""
    corr = Correlator("h", "", Thresholds(verdict_window=3), 10, clock)
    corr.on_evidence(Evidence(clock.now(), _snap()))
    qfull, changes = 0, []
    spread = tuple((f"10.{n // 200}.{n % 200}.0/24", 1) for n in range(65))
    for i in range(14):
        qfull += 1000
        prefixes = spread if i < 6 else (("10.98.5.0/24", 64),)
        changes += _probe(corr, clock, _snap(syn_recv=65 if i < 6 else 64, qfull=qfull,
                                             cookies=qfull, prefixes=prefixes))
    assert changes[0].verdict == "spoofed"
    assert changes[-1].verdict == "concentrated"
    assert {c.serial for c in changes} == {changes[0].serial}, "one incident"
    assert changes[-1].top_prefixes[0][0] == "10.98.5.0/24"
    assert changes[-1].peak_syn_recv == 65  # the first phase's: the incident's peak
    phases = changes[-1].state["phases"]
    assert [p["verdict"] for p in phases] == ["spoofed", "concentrated"]
    assert phases[0]["at"] == changes[0].opened_at.isoformat()
    # the verdict flips once, not back and forth every window
    flips = [b for a, b in itertools.pairwise(changes) if a.verdict != b.verdict]
    assert len(flips) == 1


def test_without_cookies_the_listener_that_dropped_gets_the_incident(
        clock: FrozenClock) -> None:
    """tcp_syncookies=0: both queues are full (one of an earlier flood's residue), the
    namespace's TCPReqQFullDrop moves, and only the listener whose own drops rose is flooded."""
    corr = Correlator("h", "", Thresholds(), 10, clock)

    def snap(dropped: int, drops_b: int) -> Snapshot:
        residue = ListenerState(Listener(4, "0.0.0.0", 80, 16, 0, drops=7), 16, (), 0)
        fresh = ListenerState(Listener(4, "0.0.0.0", 443, 16, 0, drops=drops_b), 16,
                              (("10.98.5.0/24", 16),), 1)
        return Snapshot("", (residue, fresh), {"TcpExt.TCPReqQFullDrop": dropped},
                        {"net.ipv4.tcp_syncookies": 0})

    corr.on_evidence(Evidence(clock.now(), snap(100, 50)))
    clock.advance(1)
    opened = corr.on_evidence(Evidence(clock.now(), snap(600, 550)))
    assert [(c.change, c.port) for c in opened] == [("opened", 443)]


def test_a_queue_that_just_filled_is_the_flooded_one_when_the_sample_lags(
        clock: FrozenClock) -> None:
    """A probe taken right after a log line can come before the sampler has read the burst:
    the queue that filled since the last probe is the new flood's, not the residue's."""
    from synwatch.probes.sampled import SynSample

    corr = Correlator("h", "", Thresholds(), 10, clock)

    def snap(fresh_syn_recv: int, overflowed: int) -> Snapshot:
        residue = ListenerState(Listener(4, "0.0.0.0", 80, 16, 0), 17, (), 0)
        fresh = ListenerState(Listener(4, "0.0.0.0", 443, 16, 0), fresh_syn_recv,
                              (("10.98.5.0/24", fresh_syn_recv),), 1)
        return Snapshot("", (residue, fresh), {"TcpExt.TCPReqQFullDoCookies": overflowed},
                        {"net.ipv4.tcp_syncookies": 1})

    nothing_yet = SynSample(one_in=1, seconds=0.02, ports=())
    corr.on_evidence(Evidence(clock.now(), snap(0, 1000), sampled=nothing_yet))
    clock.advance(0.5)
    opened = corr.on_evidence(Evidence(clock.now(), snap(17, 1600), sampled=nothing_yet))
    assert [(c.change, c.port) for c in opened] == [("opened", 443)]


def test_a_filling_conntrack_table_is_evidence_and_a_recommendation() -> None:
    """A spoofed flood on a host that tracks connections: the incident says how full the
    table got and how many new flows it dropped, and what to do about it."""
    from synwatch.detect.tally import Tally
    from synwatch.detect.verdict import judge

    t = Tally(family=4, address="0.0.0.0", port=443, backlog=511, syns_overflowed=50_000,
              cookies_sent=50_000, conntrack_max=262_144, conntrack_peak=262_144,
              conntrack_dropped=12_400)
    j = judge(t, Thresholds())
    assert any("262144 of 262144 entries (100%), 12400 new flows dropped" in r
               for r in j.reasons), j.reasons
    assert any("connection-tracking table filled" in r and "synproxy" in r
               for r in j.recommendations), j.recommendations
    quiet = judge(Tally(family=4, address="0.0.0.0", port=443, backlog=511,
                        syns_overflowed=500, conntrack_max=262_144, conntrack_peak=900),
                  Thresholds())
    assert not any("connection" in r for r in quiet.reasons + quiet.recommendations)


def test_an_opening_carries_its_listeners_build_up(corr: Correlator,
                                                   clock: FrozenClock) -> None:
    """The probes before a flood (quiet ones included: the history's timeline, and the
    picture, start before the opening), once, with the opening alone."""
    for n in (1, 2, 3):
        assert _probe(corr, clock, _snap(syn_recv=n)) == []
    [opened] = _probe(corr, clock, _snap(syn_recv=64, qfull=500, cookies=500))
    assert opened.change == "opened"
    assert [(p.syn_recv, p.backlog) for p in opened.earlier] == [
        (0, None), (1, 64), (2, 64), (3, 64)]
    assert all(p.at < opened.sample.at for p in opened.earlier)  # type: ignore[union-attr]
    [updated] = _probe(corr, clock, _snap(syn_recv=64, qfull=1000, cookies=1000))
    assert updated.change == "updated" and updated.earlier == ()
