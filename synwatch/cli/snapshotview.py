"""`synwatch snapshot --format json` (docs/cli.md): a probe's kernel state with the rules'
diagnosis. Apart from the history's views (synwatch/cli/views.py), which the lists import:
the probes and the rules are not theirs to load."""

from __future__ import annotations

from typing import Any

from synwatch.detect.rules import diagnose
from synwatch.probes.snapshot import Snapshot


def snapshot_view(snap: Snapshot) -> dict[str, Any]:
    """`synwatch snapshot --format json` (docs/cli.md), with the rules' diagnosis."""
    listeners = []
    for st in snap.listeners:
        li = st.listener
        listeners.append({
            "address": li.address, "port": li.port, "family": li.family,
            "backlog": li.backlog, "accept_queue": li.accept_queue, "drops": li.drops,
            "syn_recv": st.syn_recv,
            "top_prefixes": [{"prefix": p, "count": n,
                              "share": round(n / st.syn_recv, 3) if st.syn_recv else 0.0}
                             for p, n in st.top_prefixes],
        })
    ct = snap.conntrack
    conntrack = None if ct is None else {
        "count": ct.count, "max": ct.max, "fill": round(ct.fill, 3), "drop": ct.drop,
        "early_drop": ct.early_drop, "insert_failed": ct.insert_failed}
    return {"netns": snap.netns, "listeners": listeners, "counters": snap.counters,
            "sysctls": snap.sysctls, "conntrack": conntrack, "diagnosis": diagnose(snap)}
