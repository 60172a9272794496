"""Records of the history as the JSON shapes the CLI prints (docs/cli.md)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from synwatch.records import ActionRun, Ban, Incident, IncidentChange, RecordedEvent, StoredPoint

if TYPE_CHECKING:
    from synwatch.cli.trial import Judged


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def event_view(e: RecordedEvent) -> dict[str, Any]:
    return {
        "id": e.id, "time": iso(e.time), "source": e.source, "trusted": e.trusted,
        "kind": e.kind, "family": e.family, "address": e.address, "port": e.port,
        "mode": e.mode, "source_ip": e.source_ip, "incident_id": e.incident_id,
    }


def action_view(run: ActionRun) -> dict[str, Any]:
    return {"action": run.action, "target": run.target, "status": run.status, "at": iso(run.at)}


def incident_view(i: Incident, runs: list[ActionRun]) -> dict[str, Any]:
    return {
        "id": i.id, "host": i.host, "netns": i.netns, "address": i.address, "port": i.port,
        "family": i.family, "status": i.status, "verdict": i.verdict, "trigger": i.trigger,
        "opened_at": iso(i.opened_at), "closed_at": iso(i.closed_at),
        "first_evidence_at": iso(i.first_evidence_at), "detected_at": iso(i.detected_at),
        "peak_syn_recv": i.peak_syn_recv,
        "top_prefixes": [{"prefix": p["prefix"], "count": p["count"], "share": p["share"],
                          "completed": p.get("completed", 0)} for p in i.top_prefixes],
        "recommendations": list(i.recommendations),
        "actions": [action_view(r) for r in runs],
    }


def ban_view(b: Ban, now: datetime, enforced: bool = False) -> dict[str, Any]:
    """``enforced``: the last check found it in the kernel as the history has it."""
    return {
        "host": b.host, "prefix": b.prefix, "backend": b.backend, "scope": b.scope,
        "incident_id": b.incident_id,
        "created_at": iso(b.created_at), "expires_at": iso(b.expires_at),
        "active": b.removed_at is None and b.expires_at > now, "enforced": enforced,
    }


def sample_view(x: StoredPoint) -> dict[str, Any]:
    return {"at": iso(x.at), "syn_recv": x.syn_recv, "accept_queue": x.accept_queue,
            "backlog": x.backlog, "rates": dict(x.rates),
            "top_prefixes": [{"prefix": p, "count": n} for p, n in x.top_prefixes]}


def change_view(c: IncidentChange) -> dict[str, Any]:
    """An incident as the correlator left it (replays): the contract shape plus evidence."""
    return {
        "id": c.incident_id, "host": c.host, "netns": c.netns, "address": c.address,
        "port": c.port, "family": c.family, "status": c.status, "verdict": c.verdict,
        "trigger": c.trigger, "opened_at": iso(c.opened_at), "closed_at": iso(c.closed_at),
        "first_evidence_at": iso(c.first_evidence_at), "detected_at": iso(c.detected_at),
        "peak_syn_recv": c.peak_syn_recv,
        "top_prefixes": [{"prefix": p, "count": n, "share": s, "completed": k}
                         for p, n, s, k in c.top_prefixes],
        "recommendations": list(c.recommendations), "actions": [],
        "phases": list(c.state.get("phases", [])), "evidence": list(c.reasons),
    }


def judged_view(j: Judged) -> dict[str, Any]:
    """`synwatch try --format json`: one flood and what the service made of it."""
    return {
        "flood": j.flood.name, "expected": j.flood.expected, "sent": j.flood.what,
        "address": j.address, "port": j.port, "backlog": j.flood.backlog,
        "as_expected": j.as_expected,
        "incidents": [{**incident_view(i, list(runs)), "evidence": i.reasons}
                      for i, runs in j.incidents],
    }
