"""Counter and sysctl parsing against /proc trees recorded from real kernels (tests/data/proc:
this kernel's host namespace, a lab namespace after floods, a 3.x-era kernel's files), without
root. Each tree's expected.json was read by a separate word-by-word parser (record.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synwatch.detect import rules
from synwatch.probes.conntrack import Conntrack, read_conntrack
from synwatch.probes.procnet import COUNTERS, SYSCTLS, read_counters, read_sysctls

TREES = sorted(p for p in (Path(__file__).parent / "data" / "proc").iterdir() if p.is_dir())


@pytest.mark.parametrize("tree", TREES, ids=[t.name for t in TREES])
def test_counters_and_sysctls_of_a_recorded_kernel(tree: Path) -> None:
    expected = json.loads((tree / "expected.json").read_text())
    counters = read_counters(tree, net="net").values
    assert counters == expected["counters"]
    assert set(counters) <= set(COUNTERS)
    assert read_sysctls(tree) == {name: expected["sysctls"][name] for name in SYSCTLS}


def test_the_trees_cover_what_parsing_must_handle() -> None:
    """A kernel without a counter (TCPSynRetrans came in 3.x's successors), overflow counters
    that moved, a /proc without sysctls, and cookies mode 2."""
    seen = {t.name: json.loads((t / "expected.json").read_text()) for t in TREES}
    assert any("TcpExt.TCPSynRetrans" not in e["counters"] for e in seen.values())
    assert any(e["counters"].get("TcpExt.TCPReqQFullDrop", 0) > 0 for e in seen.values())
    assert any(e["counters"].get("TcpExt.TCPReqQFullDoCookies", 0) > 0 for e in seen.values())
    assert any(e["sysctls"]["net.ipv4.tcp_syncookies"] is None for e in seen.values())
    assert any(e["sysctls"]["net.ipv4.tcp_syncookies"] == 2 for e in seen.values())


def test_a_truncated_or_garbled_file_loses_only_what_is_garbled(tmp_path: Path) -> None:
    [flood] = [t for t in TREES if t.name.endswith("netns-flood")]
    (tmp_path / "net").mkdir()
    netstat = (flood / "net" / "netstat").read_text().splitlines()
    header, values = netstat[0], netstat[1].split()
    values[1] = "x"  # SyncookiesSent garbled
    (tmp_path / "net" / "netstat").write_text(f"{header}\n{' '.join(values)}\n")
    # snmp missing: its counters are absent, not zero
    counters = read_counters(tmp_path, net="net").values
    assert "TcpExt.SyncookiesSent" not in counters and "Tcp.PassiveOpens" not in counters
    assert counters["TcpExt.TCPReqQFullDrop"] > 0


def test_conntrack_of_a_recorded_kernel() -> None:
    """Where connection tracking was loaded the tree has its files; elsewhere none."""
    seen = 0
    for tree in TREES:
        expected = json.loads((tree / "expected.json").read_text()).get("conntrack")
        table = read_conntrack(tree, net="net")
        if expected is None:
            assert table is None
            continue
        seen += 1
        assert table is not None
        assert (table.count, table.max, table.drop, table.early_drop, table.insert_failed) == (
            expected["count"], expected["max"], expected["drop"], expected["early_drop"],
            expected["insert_failed"])
    assert seen >= 1


def test_a_full_table_is_an_error_and_a_filling_one_a_warning() -> None:
    """The 'table full' path on the recorded statistics with their drop column raised, as a
    full table raises it (the lab cannot fill the host-wide table: nf_conntrack_max is global)."""
    [tree] = [t for t in TREES if t.name.endswith("conntrack")]
    recorded = read_conntrack(tree, net="net")
    assert recorded is not None and recorded.count > 1000
    assert rules.conntrack(recorded) is None  # a flood's thousands in a table of 262144
    full = Conntrack(recorded.max, recorded.max, recorded.drop + 12_400)
    finding = rules.conntrack(full, dropped_now=12_400)
    assert finding is not None and finding.severity == "bad"
    assert "12400 new flows dropped" in finding.text and "SYNPROXY" in finding.text
    nearly = rules.conntrack(Conntrack(int(recorded.max * 0.95), recorded.max))
    assert nearly is not None and nearly.severity == "warn"
