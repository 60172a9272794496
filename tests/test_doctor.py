"""`synwatch doctor`: the rules on constructed snapshots, and the command in a lab namespace with
a history that remembers a peak above a listener's backlog."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synwatch.detect.doctor import PortHistory, examine
from synwatch.probes.snapshot import ListenerState, Snapshot
from synwatch.probes.sockdiag import Listener
from synwatch.records import IncidentChange
from synwatch.store import History
from tests.support import NOW
from tests.support.cli import synwatch
from tests.support.lab import lab, lab_port


def _snap(*listeners: tuple[int, int, int], counters: dict[str, int] | None = None,
          **sysctls: int) -> Snapshot:
    """listeners as (port, backlog, syn_recv)."""
    base: dict[str, int | None] = {"net.ipv4.tcp_syncookies": 1, "net.core.somaxconn": 4096,
                                   "net.ipv4.tcp_synack_retries": 5,
                                   "net.ipv4.tcp_abort_on_overflow": 0}
    base.update({k.replace("__", "."): v for k, v in sysctls.items()})
    return Snapshot("", tuple(ListenerState(Listener(4, "0.0.0.0", p, b, 0), n, (), 0)
                              for p, b, n in listeners), counters or {}, base)


def test_a_healthy_namespace_is_ok() -> None:
    snap = _snap((443, 511, 0))
    assert [(f.severity, f.subject) for f in examine(snap, snap, 1, {})] == [("ok", "all")]


def test_each_rule() -> None:
    before = _snap((80, 0, 0), (81, 5, 0), (82, 128, 0),
                   counters={"TcpExt.TCPReqQFullDoCookies": 100, "TcpExt.ListenOverflows": 7},
                   net__ipv4__tcp_syncookies=0, net__core__somaxconn=128)
    after = _snap((80, 0, 0), (81, 5, 5), (82, 128, 0),
                  counters={"TcpExt.TCPReqQFullDoCookies": 300, "TcpExt.ListenOverflows": 7},
                  net__ipv4__tcp_syncookies=0, net__core__somaxconn=128)
    history = {82: PortHistory(82, 3, 400, 2, 17)}
    found = {(f.severity, f.subject, f.text) for f in examine(before, after, 2, history)}
    texts = "\n".join(f"{s} {w}: {t}" for s, w, t in sorted(found))
    assert "bad net.ipv4.tcp_syncookies: is 0" in texts
    assert "warn net.core.somaxconn: is 128" in texts
    assert "bad 0.0.0.0:80: listens with backlog 0 (listen(fd, 0))" in texts
    assert "warn 0.0.0.0:81: backlog 5 is small" in texts and "use 128" in texts
    assert "bad 0.0.0.0:81: SYN queue full now (5 of 5)" in texts
    assert "warn 0.0.0.0:82: backlog 128 is net.core.somaxconn" in texts
    assert ("warn 0.0.0.0:82: backlog 128 is below the peak of real load seen in 2 capacity "
            "incidents (400 request sockets, last incident 17); use 512") in texts
    assert "warn 0.0.0.0:82: 2 capacity incidents" in texts
    assert "bad counters: 100 SYNs/s are finding a full SYN queue right now" in texts
    assert "warn counters: accept queues overflowed 7 times since boot" in texts
    assert next(iter(examine(before, after, 2, history))).severity == "bad"  # worst first


def test_an_application_that_stopped_accepting_is_not_told_to_raise_its_backlog() -> None:
    snap = _snap((82, 128, 0))
    found = examine(snap, snap, 1, {82: PortHistory(82, 3, 0, 0, 17, not_accepting=3)})
    texts = [f.text for f in found if f.subject == "0.0.0.0:82"]
    assert any(t.startswith("3 incidents where its application stopped accepting") and
               "a larger backlog does not help" in t for t in texts), texts
    assert not any("raise the backlog" in t or "below the peak" in t for t in texts), texts


@pytest.mark.needs_root
def test_doctor_in_a_namespace_uses_the_history(tmp_path: Path) -> None:
    port = lab_port()
    config = tmp_path / "c.toml"
    with lab() as the_lab:
        config.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n'
                          f'[watch]\nnetns = "{the_lab.server_ns}"\n')
        store = History.open(f"sqlite:///{tmp_path}/h.db")
        store.save_incident(IncidentChange(
            change="opened", serial=1, incident_id=None, host="h", netns=the_lab.server_ns,
            address="0.0.0.0", port=port, family=4, status="closed", verdict="capacity",
            trigger="counters", opened_at=NOW, closed_at=NOW, first_evidence_at=NOW,
            detected_at=NOW, peak_syn_recv=300, top_prefixes=(), recommendations=(),
            reasons=(), state={}))
        store.close()
        the_lab.listen(port, backlog=64)
        the_lab.sysctl("net.ipv4.tcp_syncookies", 0)
        r = synwatch("doctor", "--format", "json", "--seconds", "0.2", "--config", str(config))
    assert r.code == 0, r.err
    found = {(f["severity"], f["subject"], f["text"].split(":")[0]) for f in json.loads(r.out)}
    assert ("bad", "net.ipv4.tcp_syncookies", "is 0") in found
    assert ("warn", f"0.0.0.0:{port}", "backlog 64 is small (Python's socketserver uses 5, "
            "mio/tokio 128, nginx 511)") in found
    texts = [f["text"] for f in json.loads(r.out) if f["subject"] == f"0.0.0.0:{port}"]
    assert any("below the peak of real load seen in 1 capacity incidents (300 request sockets"
               in t for t in texts)
