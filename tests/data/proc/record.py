"""Records the /proc files synwatch's counter and sysctl parsing reads into a tree here, so the
parsing is tested without root against real kernels' text (as prometheus client_python and
node_exporter keep /proc fixtures).

    sudo .venv/bin/python -m tests.data.proc.record NAME [NETNS]

NAME is the folder to write (e.g. linux-6.1-lab-flood); NETNS an `ip netns` name to record
inside. It writes net/netstat, net/snmp, the sysctls of ``procnet.SYSCTLS`` under sys/, and
expected.json: every counter and sysctl as this kernel states it, read by a parser written
separately from synwatch's (a word-by-word walk of header and value lines), so the test compares
two readings of the same text.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

from synwatch.probes.procnet import COUNTERS, SYSCTLS
from synwatch.system.netns import in_netns

HERE = Path(__file__).resolve().parent


def independent_counters(netstat: str, snmp: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for text in (netstat, snmp):
        words = [line.split() for line in text.splitlines()]
        for i in range(0, len(words) - 1, 2):
            names, values = words[i], words[i + 1]
            section = names[0].rstrip(":")
            for k in range(1, len(names)):
                if f"{section}.{names[k]}" in COUNTERS:
                    found[f"{section}.{names[k]}"] = int(values[k])
    return found


def independent_conntrack(files: dict[str, str]) -> dict[str, int] | None:
    """count, max and the drop counters summed over the CPUs' hex rows."""
    if "sys/net/netfilter/nf_conntrack_count" not in files:
        return None
    rows = [line.split() for line in files.get("net/stat/nf_conntrack", "").splitlines()]
    sums = {}
    for column in ("drop", "early_drop", "insert_failed"):
        k = rows[0].index(column) if rows else -1
        sums[column] = sum(int(r[k], 16) for r in rows[1:]) if k >= 0 else 0
    return {"count": int(files["sys/net/netfilter/nf_conntrack_count"]),
            "max": int(files["sys/net/netfilter/nf_conntrack_max"]), **sums}


def record(name: str, netns: str = "") -> Path:
    def read() -> dict[str, str]:
        files = {f"net/{n}": Path(f"/proc/thread-self/net/{n}").read_text()
                 for n in ("netstat", "snmp")}
        for sysctl in SYSCTLS:
            rel = "sys/" + sysctl.replace(".", "/")
            files[rel] = Path(f"/proc/{rel}").read_text()
        for rel in ("sys/net/netfilter/nf_conntrack_count", "sys/net/netfilter/nf_conntrack_max"):
            if Path(f"/proc/{rel}").exists():  # connection tracking loaded
                files[rel] = Path(f"/proc/{rel}").read_text()
        if Path("/proc/thread-self/net/stat/nf_conntrack").exists():
            files["net/stat/nf_conntrack"] = Path(
                "/proc/thread-self/net/stat/nf_conntrack").read_text()
        return files

    files = in_netns(netns, read)
    out = HERE / name
    for rel, text in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    expected = {"kernel": platform.release(),
                "counters": independent_counters(files["net/netstat"], files["net/snmp"]),
                "sysctls": {s: int(files["sys/" + s.replace(".", "/")].split()[0])
                            for s in SYSCTLS},
                "conntrack": independent_conntrack(files)}
    (out / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    return out


if __name__ == "__main__":
    print(record(*sys.argv[1:3]))
