"""Connection tracking under a spoofed flood, on the real kernel: a server namespace that
tracks connections (a `ct state` rule, as ufw, firewalld and Docker have) gets one entry per
forged source, and synwatch's snapshot and metrics count them. nf_conntrack_max is global
(read-only inside a namespace), so the test measures the fill and never lowers the maximum."""

from __future__ import annotations

import json

import pytest

from synwatch.probes.snapshot import take
from tests.support.cli import synwatch
from tests.support.lab import SPOOF_NET, Lab, lab_port

pytestmark = pytest.mark.needs_root
FORGED = 5000


def test_a_spoofed_flood_fills_the_namespaces_conntrack_table(tracked: Lab) -> None:
    port = lab_port()
    tracked.listen(port, backlog=512)
    before = take(tracked.server_ns).conntrack
    assert before is not None, "a ct rule loads connection tracking in the namespace"
    sources = [f"{SPOOF_NET}.{i // 250 % 250}.{i % 250 + 1}" for i in range(FORGED)]
    tracked.flood(port, FORGED, sources)
    after = take(tracked.server_ns).conntrack
    assert after is not None and after.max == before.max  # the host's, untouched
    added = after.count - before.count
    print(f"\nconntrack: {FORGED} forged SYNs added {added} entries "
          f"({after.count} of {after.max})")
    assert added >= FORGED * 0.9, (before, after)
    shown = json.loads(synwatch("snapshot", "--netns", tracked.server_ns, "--format",
                                "json").out)["conntrack"]
    assert shown["count"] >= after.count - 10 and shown["max"] == after.max
    assert shown["fill"] == pytest.approx(shown["count"] / shown["max"], abs=0.001)
