"""Run an admin's program on incident changes: an argv (no shell), the incident's fields in the
environment as SYNWATCH_* variables, on a worker thread with a timeout."""

from __future__ import annotations

import json
import os
import shlex
import subprocess

from synwatch.actions.registry import Action, ActionContext, Plan
from synwatch.config import Config
from synwatch.errors import ActionFailed
from synwatch.records import IncidentChange


def incident_env(kind: str, c: IncidentChange) -> dict[str, str]:
    def text(value: object) -> str:
        return "" if value is None else str(value)

    return {
        "SYNWATCH_CHANGE": kind,
        "SYNWATCH_INCIDENT_ID": text(c.incident_id),
        "SYNWATCH_HOST": c.host, "SYNWATCH_NETNS": c.netns,
        "SYNWATCH_ADDRESS": text(c.address), "SYNWATCH_PORT": text(c.port),
        "SYNWATCH_FAMILY": text(c.family), "SYNWATCH_STATUS": c.status,
        "SYNWATCH_VERDICT": c.verdict, "SYNWATCH_TRIGGER": c.trigger,
        "SYNWATCH_OPENED_AT": c.opened_at.isoformat(),
        "SYNWATCH_CLOSED_AT": c.closed_at.isoformat() if c.closed_at else "",
        "SYNWATCH_PEAK_SYN_RECV": str(c.peak_syn_recv),
        "SYNWATCH_TOP_PREFIXES": " ".join(p for p, *_ in c.top_prefixes),
        "SYNWATCH_RECOMMENDATIONS": json.dumps(list(c.recommendations)),
    }


def run_program(argv: tuple[str, ...], env: dict[str, str], timeout: float) -> str:
    full_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **env}
    try:
        proc = subprocess.run(argv, env=full_env, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ActionFailed(f"exec {argv[0]}", str(exc)) from exc
    said = (proc.stdout or proc.stderr).strip().splitlines()
    if proc.returncode != 0:
        raise ActionFailed(f"exec {argv[0]}", f"exit status {proc.returncode}"
                                               f"{f': {said[-1]}' if said else ''}")
    return f"exit status 0{f': {said[-1]}' if said else ''}"


class ExecAction(Action):
    name = "exec"
    background = True
    order = 90

    def __init__(self, ctx: ActionContext) -> None:
        super().__init__(ctx)
        self.verdicts: dict[int, str] = {}

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.exec.enabled

    def on_change(self, change: IncidentChange) -> list[Plan]:
        if change.incident_id is None:
            return []
        before = self.verdicts.get(change.incident_id)
        self.verdicts[change.incident_id] = change.verdict
        if change.change == "closed":
            del self.verdicts[change.incident_id]
            kind = "closed"
        elif change.change == "opened":
            kind = "opened"
        elif before is not None and change.verdict != before:
            kind = "verdict"
        else:
            return []
        settings = self.ctx.config.exec
        if kind not in settings.on:
            return []
        env = incident_env(kind, change)
        shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()
                         if k in ("SYNWATCH_CHANGE", "SYNWATCH_INCIDENT_ID", "SYNWATCH_VERDICT"))
        return [Plan(self.name, kind, f"{shown} ... {shlex.join(settings.argv)}",
                     lambda: run_program(settings.argv, env, settings.timeout),
                     change.incident_id)]
