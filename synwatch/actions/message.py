"""The text of an incident notification: what happened, the verdict and why, what was done, and
what to change. Pure, so the tests read the exact words."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from synwatch.durations import format_duration
from synwatch.records import ActionRun, IncidentChange, endpoint

HEADLINES = {"opened": "SYN flood", "update": "update", "closed": "over"}
TRIGGERS = {"log": "the kernel log", "counters": "the kernel counters",
            "half_open": "request sockets left half-open (no overflow, no log line)"}


def compose(kind: str, c: IncidentChange, runs: Sequence[ActionRun],
            now: datetime) -> tuple[str, str]:
    """(title, body) for an ``opened``, ``update`` or ``closed`` message."""
    # a container's namespace by its name ("docker:web1"), an `ip netns` one as such
    where = (f"{c.host} ({c.netns})" if ":" in c.netns else
             f"{c.host}{f' (netns {c.netns})' if c.netns else ''}")
    listener = endpoint(c.address, c.port) if c.port is not None else "an unknown listener"
    title = (f"synwatch: {HEADLINES[kind]} on {where} {listener}: {c.verdict} "
             f"(incident {c.incident_id})")
    lines = []
    end = c.closed_at or now
    lasted = format_duration(max(0.0, (end - c.opened_at).total_seconds()))
    if kind == "closed":
        lines.append(f"The incident lasted {lasted} (opened {c.opened_at.isoformat()}, "
                     f"closed {end.isoformat()}).")
    else:
        lines.append(f"Open since {c.opened_at.isoformat()} ({lasted}), found from "
                     f"{TRIGGERS[c.trigger]}.")
    lines.append(f"Verdict: {c.verdict}." + (f" {'; '.join(c.reasons)}." if c.reasons else ""))
    lines.append(f"Peak SYN-RECV: {c.peak_syn_recv}.")
    if c.top_prefixes:
        lines.append("Top sources: " + ", ".join(f"{p} ({share:.0%})"
                                                 for p, _n, share, _k in c.top_prefixes[:5]) + ".")
    done = [r for r in runs if r.action != "notify"]
    if done:
        lines.append("")
        lines.append("Done:")
        lines += [f"- {r.action} {r.target}: {r.status}{f' ({r.detail})' if r.detail else ''}"
                  for r in done]
    if c.recommendations:
        lines.append("")
        lines.append("Recommended:")
        lines += [f"- {r}" for r in c.recommendations]
    return title, "\n".join(lines)
