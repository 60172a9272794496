"""Probes on the real kernel, inside a lab namespace: listeners and their queues, SYN-RECV
sources by prefix (v4-mapped counted as IPv4), counters, sysctls; and the diagnosis rules."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from synwatch.cli.snapshotview import snapshot_view as as_json
from synwatch.detect.rules import diagnose
from synwatch.probes import sockdiag
from synwatch.probes.procnet import STIRRING
from synwatch.probes.snapshot import STILL, ListenerState, Snapshot, nothing_came_in, take
from synwatch.probes.sockdiag import Listener
from tests.support.cli import synwatch
from tests.support.lab import Lab, lab, lab_port


@pytest.fixture
def the_lab() -> Iterator[Lab]:
    with lab() as made:
        yield made


def _listener(snap: Snapshot, port: int) -> ListenerState:
    return next(st for st in snap.listeners if st.listener.port == port)


@pytest.mark.needs_root
def test_syn_recv_sources_by_prefix_in_a_namespace(the_lab: Lab) -> None:
    port = lab_port()
    the_lab.listen(port, backlog=128)
    sources = [f"10.232.1.{i}" for i in range(1, 41)] + [f"10.232.2.{i}" for i in range(1, 21)]
    the_lab.flood(port, len(sources), sources)
    time.sleep(0.3)
    snap = take(the_lab.server_ns)
    st = _listener(snap, port)
    assert (st.listener.family, st.listener.address, st.listener.backlog) == (4, "0.0.0.0", 128)
    assert st.syn_recv == 60
    assert st.top_prefixes == (("10.232.1.0/24", 40), ("10.232.2.0/24", 20))
    assert snap.sysctls["net.ipv4.tcp_syncookies"] == 1
    # our own namespace does not see the lab's sockets
    assert all(s.listener.port != port for s in take("").listeners)
    view = json.loads(synwatch("snapshot", "--netns", the_lab.server_ns, "--format", "json").out)
    row = next(li for li in view["listeners"] if li["port"] == port)
    assert row == {"address": "0.0.0.0", "port": port, "family": 4, "backlog": 128,
                   "accept_queue": 0, "drops": 0, "syn_recv": 60,
                   "top_prefixes": [{"prefix": "10.232.1.0/24", "count": 40, "share": 0.667},
                                    {"prefix": "10.232.2.0/24", "count": 20, "share": 0.333}]}
    assert set(view) == {"netns", "listeners", "counters", "sysctls", "conntrack", "diagnosis"}


@pytest.mark.needs_root
def test_peers_that_completed_handshakes_are_read_per_listener_port(the_lab: Lab) -> None:
    """ESTABLISHED and TIME-WAIT sockets of a listener's port, by peer: the clients that
    completed handshakes (and nothing for a port not asked for, nor a flood's forged sources,
    which never complete one)."""
    port = lab_port()
    the_lab.listen(port, backlog=128)  # never accepts: the connections stay ESTABLISHED
    clients = [f"10.232.40.{i}" for i in range(1, 6)]
    the_lab.held_clients(port, clients, each=4)
    the_lab.flood(port, 200, [f"10.232.41.{i % 200 + 1}" for i in range(200)])
    snap = take(the_lab.server_ns, peers_for=frozenset({port}))
    assert dict(_listener(snap, port).peers) == {f"{c}/32": 4 for c in clients}
    assert _listener(take(the_lab.server_ns), port).peers == ()  # only for ports asked for


@pytest.mark.needs_root
def test_overflow_shows_in_queues_counters_and_diagnosis(the_lab: Lab) -> None:
    port = lab_port()
    the_lab.listen(port, backlog=8)
    the_lab.flood(port, 200)
    time.sleep(0.3)
    snap = take(the_lab.server_ns)
    st = _listener(snap, port)
    assert st.listener.backlog == 8 and 8 <= st.syn_recv <= 9  # 6.13+: full when > backlog
    assert snap.counters["TcpExt.TCPReqQFullDoCookies"] >= 150
    assert snap.counters["TcpExt.SyncookiesSent"] >= 150
    diagnosis = diagnose(snap)
    assert f"0.0.0.0:{port}: SYN queue full now ({st.syn_recv} of 8)" in diagnosis
    assert any(d.startswith("since boot, ") and "SYNs found a full SYN queue" in d
               for d in diagnosis)


@pytest.mark.needs_root
def test_drops_are_counted_on_the_listener_that_dropped(the_lab: Lab) -> None:
    """The namespace's ListenDrops, per listener: the one whose accept queue overflowed."""
    full, quiet = lab_port(), lab_port()
    the_lab.listen(full, backlog=2)  # never accepts
    the_lab.listen(quiet, backlog=2)
    before = take(the_lab.server_ns)
    the_lab.connect_burst(full, established=3, attempts=20, hold=1.0)
    after = take(the_lab.server_ns)
    dropped = (after.counters["TcpExt.ListenDrops"]
               - before.counters.get("TcpExt.ListenDrops", 0))
    assert dropped > 0
    assert _listener(after, full).listener.drops - _listener(before, full).listener.drops \
        == dropped
    assert _listener(after, quiet).listener.drops == 0


@pytest.mark.needs_root
def test_dual_stack_listener_counts_ipv4_sources_as_ipv4(the_lab: Lab) -> None:
    port = lab_port()
    the_lab.listen(port, backlog=128, address="::")
    the_lab.flood(port, 10, [f"10.232.9.{i}" for i in range(1, 11)])
    time.sleep(0.3)
    st = _listener(take(the_lab.server_ns), port)
    assert (st.listener.family, st.listener.address) == (6, "::")
    assert st.top_prefixes == (("10.232.9.0/24", 10),)


@pytest.mark.needs_root
def test_syncookies_off_is_diagnosed(the_lab: Lab) -> None:
    the_lab.sysctl("net.ipv4.tcp_syncookies", 0)
    snap = take(the_lab.server_ns)
    assert snap.sysctls["net.ipv4.tcp_syncookies"] == 0
    assert diagnose(snap)[0].startswith("net.ipv4.tcp_syncookies is 0")


@pytest.mark.needs_root
def test_a_namespace_nothing_came_into_is_not_dumped_and_any_syn_dumps_it(
        the_lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request socket needs a SYN that came in: while Tcp InSegs stands still, the last
    look's empty SYN-RECV dump stands (and, unless reread, its listeners); a SYN dumps again,
    and so does every look while requests linger (they expire with no segment in)."""
    dumps: list[int] = []
    real = sockdiag.syn_recv

    def counted(v4_len: int = 24, v6_len: int = 64) -> sockdiag.SynRecvSummary:
        dumps.append(1)
        return real(v4_len, v6_len)

    monkeypatch.setattr(sockdiag, "syn_recv", counted)
    port, later = lab_port(), lab_port()
    the_lab.listen(port, backlog=128)
    first = take(the_lab.server_ns)
    assert (first.syn_recv_total, len(dumps)) == (0, 1)
    still = take(the_lab.server_ns, previous=first, reread=False)
    assert (still.listeners, still.counters, len(dumps)) == (first.listeners, first.counters, 1)
    the_lab.listen(later, backlog=8)  # no segment: seen at the next reread, not dumped for
    reread = take(the_lab.server_ns, previous=still)
    assert {st.listener.port for st in reread.listeners} == {port, later}
    assert (reread.syn_recv_total, len(dumps)) == (0, 1)
    the_lab.flood(port, 5, [f"10.232.12.{i}" for i in range(1, 6)])
    flooded = take(the_lab.server_ns, previous=reread, reread=False)
    assert _listener(flooded, port).syn_recv == 5 and len(dumps) == 2
    assert flooded.counters["Tcp.InSegs"] > reread.counters["Tcp.InSegs"]
    lingering = take(the_lab.server_ns, previous=flooded, reread=False)
    assert _listener(lingering, port).syn_recv == 5 and len(dumps) == 3


def test_only_an_empty_dump_with_nothing_in_since_stands() -> None:
    counters = {"Tcp.InSegs": 10, **{f"TcpExt.{n}": 1 for n in STIRRING}}
    empty = Snapshot("", (), counters, {}, None, 0)
    assert nothing_came_in(empty, dict(counters))
    assert not nothing_came_in(None, counters)
    assert not nothing_came_in(replace(empty, syn_recv_total=None), counters), "a baseline"
    assert not nothing_came_in(replace(empty, syn_recv_total=3), counters), "requests linger"
    for moved in STILL:
        assert not nothing_came_in(empty, {**counters, moved: counters[moved] + 1}), moved
    assert not nothing_came_in(empty, {k: v for k, v in counters.items() if k != "Tcp.InSegs"})


def _snap(listener: Listener, syn_recv: int = 0, **sysctls: int) -> Snapshot:
    base = {"net.ipv4.tcp_syncookies": 1, "net.core.somaxconn": 4096}
    base.update({f"net.core.{k}" if k == "somaxconn" else f"net.ipv4.{k}": v
                 for k, v in sysctls.items()})
    return Snapshot("", (ListenerState(listener, syn_recv, (), 0),), {}, base)  # type: ignore[arg-type]


def test_diagnosis_rules() -> None:
    assert diagnose(_snap(Listener(4, "0.0.0.0", 80, 0, 0))) == [
        "0.0.0.0:80: listens with backlog 0 (listen(fd, 0)): on kernels 4.4 to 6.12 its SYN "
        "queue is full from the first SYN; use 128"]
    assert diagnose(_snap(Listener(6, "::", 443, 128, 128), somaxconn=128)) == [
        "net.core.somaxconn is 128 and clamps every listen() backlog (the default has been "
        "4096 since 5.4): `sysctl -w net.core.somaxconn=4096` (and in /etc/sysctl.d/)",
        "[::]:443: backlog 128 is net.core.somaxconn: the application asked for more and was "
        "clamped",
        "[::]:443: accept queue full now (128 of 128): the application is not accepting"]
    assert diagnose(_snap(Listener(4, "0.0.0.0", 80, 511, 0), tcp_syncookies=2))[0].startswith(
        "net.ipv4.tcp_syncookies is 2")
    assert diagnose(_snap(Listener(4, "0.0.0.0", 80, 511, 0))) == ["nothing overflowing"]
    assert diagnose(_snap(Listener(4, "0.0.0.0", 80, 511, 0), syn_recv=200)) == [
        "0.0.0.0:80: 200 requests half-open now (39% of the SYN queue): if they stay and do "
        "not complete, a slow SYN flood (`synwatch run` opens a half_open incident)"]
    view = as_json(_snap(Listener(4, "0.0.0.0", 80, 511, 3), syn_recv=0))
    assert view["listeners"][0]["accept_queue"] == 3


def test_snapshot_doctor_and_verdict_share_one_rule_table() -> None:
    """The same namespace judged three ways says the same about somaxconn and cookies."""
    from synwatch.config import Thresholds
    from synwatch.detect.doctor import examine
    from synwatch.detect.tally import Tally
    from synwatch.detect.verdict import judge

    snap = _snap(Listener(4, "0.0.0.0", 80, 1024, 0), somaxconn=1024, tcp_syncookies=0)
    said = "\n".join(diagnose(snap))
    doctor = "\n".join(f.sentence for f in examine(snap, snap, 1, {}))
    tally = Tally(family=4, address="0.0.0.0", port=80, backlog=1024, syns_overflowed=9000,
                  syns_dropped=9000, peak_syn_recv=1024, peak_overflow_rate=9000,
                  sysctls=dict(snap.sysctls))
    recs = "\n".join(judge(tally, Thresholds()).recommendations)
    for text in (said, doctor, recs):
        assert "net.core.somaxconn is 1024 and clamps every listen() backlog" in text, text
        assert "net.ipv4.tcp_syncookies is 0: a full SYN queue drops every new client" in text


def test_missing_namespace_is_one_line() -> None:
    res = synwatch("snapshot", "--netns", "synwatch-no-such-ns")
    assert res.code == 1
    assert res.err == ("synwatch: netns synwatch-no-such-ns: cannot open "
                       "/run/netns/synwatch-no-such-ns: No such file or directory\n")


def _diag_message(sport: int, dst: str, mark: bool) -> bytes:
    import socket
    import struct

    body = struct.pack("=BBBBHH16s16sI8sIIIII", socket.AF_INET, 3, 1, 0,
                       socket.htons(sport), socket.htons(40000), socket.inet_aton("10.0.0.1"),
                       socket.inet_aton(dst), 0, b"", 0, 0, 0, 0, 0)
    attrs = struct.pack("=HHI", 8, 15, 7) if mark else b""
    return struct.pack("=IHHII", 16 + len(body) + len(attrs), 20, 2, 1, 0) + body + attrs


def test_fast_and_walked_chunks_give_the_same_keys() -> None:
    from synwatch.probes.sockdiag import _chunk_keys

    rows = [(443, f"198.51.{i % 3}.{i}") for i in range(1, 40)]
    for mark in (False, True):  # 88-byte messages, and 96 with the mark root gets
        uniform = b"".join(_diag_message(p, d, mark) for p, d in rows)
        keys = _chunk_keys(uniform, 3)
        assert keys == [(p.to_bytes(2, "big") + bytes(map(int, d.split(".")[:3]))).hex()
                        for p, d in rows]
    mixed = b"".join(_diag_message(p, d, i % 2 == 0) for i, (p, d) in enumerate(rows))
    assert _chunk_keys(mixed, 3) == keys  # walked, same answer


def test_skmeminfo_drops_reads_the_attribute_and_survives_any_bytes() -> None:
    import struct

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from synwatch.probes.sockdiag import INET_DIAG_SKMEMINFO, skmeminfo_drops

    meminfo = struct.pack("=9I", 0, 1, 2, 3, 4, 5, 6, 7, 34)
    other = struct.pack("=HH", 8, 1) + b"\0" * 4
    attrs = other + struct.pack("=HH", 4 + len(meminfo), INET_DIAG_SKMEMINFO) + meminfo
    assert skmeminfo_drops(attrs, 0, len(attrs)) == 34
    assert skmeminfo_drops(attrs[:-4], 0, len(attrs) - 4) == 0  # cut short: not trusted
    assert skmeminfo_drops(other, 0, len(other)) == 0

    @settings(max_examples=2000, deadline=None)
    @given(st.binary(max_size=128), st.integers(0, 140), st.integers(0, 140))
    def any_bytes(data: bytes, start: int, end: int) -> None:
        assert skmeminfo_drops(data, start, min(end, len(data))) >= 0

    any_bytes()
