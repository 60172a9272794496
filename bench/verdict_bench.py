"""Verdicts side by side on the same recorded floods: the rules before issue #10 (fixed counts
on request sockets; the code of commit BASE, run from a git worktree), today's statistics on
the request sockets alone (what `ss` shows an admin), and today's statistics with the packet
sample.

Offline and deterministic: each golden recording in tests/data/replays (written by the lab tests
on a real kernel) is replayed; for today's rules also with the sampler's counts stripped from
every probe. For the sampled run it prints the probe at which the final verdict was first
reached, counted from the first probe that saw the flood (the goal: the first probe after 1,000
SYNs), and the SYNs that had overflowed by then.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synwatch.clock import FrozenClock
from synwatch.config import Thresholds
from synwatch.detect.correlate import Correlator
from synwatch.detect.replay import ProbeFailed, read
from synwatch.probes.evidence import Evidence

REPO = Path(__file__).resolve().parent.parent
REPLAYS = REPO / "tests" / "data" / "replays"
BASE = "984f8a6"  # the last commit before the SYN sampler and statistical verdicts
QUIET = 3.0  # what the lab scenarios ran with (half-open: 60 s)


def _strip(path: Path, out: Path) -> None:
    lines = []
    for raw in path.read_text().splitlines():
        d = json.loads(raw)
        if d["type"] == "evidence":
            d["sampled"] = None
        lines.append(json.dumps(d))
    out.write_text("\n".join(lines) + "\n")


def _run(path: Path, quiet: float) -> tuple[str, int | None, int]:
    """(final verdict, probes from the flood's first evidence to that verdict, SYNs by then)."""
    clock: FrozenClock | None = None
    corr: Correlator | None = None
    final, first_probe, reached = "none", None, None
    probes, syns_seen = 0, 0
    verdicts: list[tuple[int, str, int]] = []
    for now, item in read(str(path)):
        if clock is None:
            clock = FrozenClock(now)
            corr = Correlator("bench", "", Thresholds(), quiet, clock)
        clock.advance((now - clock.now()).total_seconds())
        assert corr is not None
        if isinstance(item, Evidence):
            changes = corr.on_evidence(item)
            c = item.snapshot.counters
            syns_seen = max(syns_seen, c.get("TcpExt.TCPReqQFullDoCookies", 0)
                            + c.get("TcpExt.TCPReqQFullDrop", 0))
            if corr.open or changes:
                probes += 1
                if first_probe is None:
                    first_probe = probes
        elif isinstance(item, ProbeFailed):
            changes, _ = corr.on_probe_failed(now, gone=item.gone)
        else:
            changes = corr.on_event(item)
        for ch in changes:
            verdicts.append((probes, ch.verdict, syns_seen))
    if verdicts:
        final = verdicts[-1][1]
        reached = next(p for p, v, _ in verdicts if v == final)
    if reached is None or first_probe is None:
        return final, None, 0
    at = next(s for p, v, s in verdicts if v == final)
    return final, reached - first_probe + 1, at


def _before(worktree: Path, path: Path, quiet: float, tmp: Path) -> str:
    """The final verdict the code of BASE gives the same recording."""
    config = tmp / "base.toml"
    config.write_text(f'[incident]\nquiet_period = "{quiet}s"\n')
    r = subprocess.run([sys.executable, "-m", "synwatch", "replay", str(path), "--format",
                        "json", "--config", str(config)], cwd=worktree, capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        return "(error)"
    found = json.loads(r.stdout)
    return str(found[-1]["verdict"]) if found else "none"


def main() -> None:
    names = sorted(p.stem for p in REPLAYS.glob("*.jsonl"))
    print("verdicts on the recorded lab floods (tests/data/replays), replayed offline")
    print(f"{'recording':<17}{'before #10':>14}{'sockets only':>14}{'with sample':>14}"
          f"{'probes':>8}{'SYNs by then':>14}")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        worktree = tmp / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q",
                        str(worktree), BASE], check=True)
        try:
            for name in names:
                path = REPLAYS / f"{name}.jsonl"
                quiet = 60.0 if name == "half-open" else QUIET
                stripped = tmp / f"{name}.jsonl"
                _strip(path, stripped)
                before = _before(worktree, stripped, quiet, tmp)
                old, _, _ = _run(stripped, quiet)
                new, new_at, syns = _run(path, quiet)
                print(f"{name:<17}{before:>14}{old:>14}{new:>14}{new_at or '-':>8}{syns:>14}")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(worktree)], check=False)


if __name__ == "__main__":
    main()
