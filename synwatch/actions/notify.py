"""Notifications through apprise: one message when an incident opens, at most one update per
``interval`` while it lasts, one summary when it closes.

Sending runs on a worker thread with apprise's own timeout (a dead SMTP server holds a call for
15 s), so it never delays detection or a ban; failures are recorded and retried by the responder.
The "opened" message waits for the first verdict, so it can say what the flood is and what was
done about it. A message still unsent at a stop (a retry not yet due, a server hanging) is sent
at the next start, as it was written, and an incident resumed after a restart is not announced
a second time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from synwatch.actions.message import compose
from synwatch.actions.picture import Picture, available, draw_picture
from synwatch.actions.registry import Action, ActionContext, Plan
from synwatch.config import Config, state_dir
from synwatch.errors import ActionFailed
from synwatch.records import IncidentChange

log = logging.getLogger("synwatch")
RESEND_WITHIN = timedelta(days=1)  # older unsent messages are news no longer


@dataclass
class _IncidentMessages:
    """What was said about one incident."""

    opened_sent: bool = False
    last_sent: float = 0.0
    verdict: str = "unknown"
    actions_said: int = 0
    latest: IncidentChange | None = field(default=None, repr=False)
    pending: bool = False


def send(urls: tuple[str, ...], title: str, body: str, timeout: float, *,
         picture: Callable[[], Picture | None] = lambda: None, hint: str = "") -> str:
    """One message to every URL; with the incident's ``picture`` attached where the service
    takes attachments (mail, JSON, Telegram, ...), and ``hint`` (how to see it) where it takes
    none (SMS, syslog, gotify) or the drawing failed."""
    import apprise  # noqa: PLC0415 - 90 ms to import; only the worker needs it

    plugins = []
    for url in urls:
        plugin = apprise.Apprise.instantiate(url)
        if plugin is None:
            # the scheme only: a URL may carry a password
            raise ActionFailed("notify", f"apprise cannot use a {url.split('://')[0]}:// URL")
        plugins.append(plugin)
    drawn = picture() if any(getattr(p, "attachment_support", False) for p in plugins) else None
    with_picture, without = apprise.Apprise(), apprise.Apprise()
    for plugin in plugins:
        (with_picture if drawn and plugin.attachment_support else without).add(plugin)
    failed = 0
    try:
        if len(with_picture):
            failed += _failed(with_picture.notify(body=body, title=title, timeout=timeout,
                                                  attach=str(drawn.path) if drawn else None))
        if len(without):
            said = f"\n\nIts picture: {hint}" if hint else ""
            failed += _failed(without.notify(body=body + said, title=title, timeout=timeout))
    finally:
        if drawn is not None:
            drawn.remove()
    if failed:
        raise ActionFailed("notify", f"{failed} of {len(urls)} URLs failed")
    said = f"sent to {len(urls)} URL{'s' if len(urls) > 1 else ''}"
    return said + (" with its picture" if drawn and len(with_picture) else "")


def _failed(result: Any) -> int:
    return 0 if result else int(getattr(result, "failed_count", 1) or 1)


class NotifyAction(Action):
    name = "notify"
    background = True
    retries = True
    order = 80

    def __init__(self, ctx: ActionContext) -> None:
        super().__init__(ctx)
        self.threads: dict[int, _IncidentMessages] = {}

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.notify.enabled

    def _plan(self, kind: str, change: IncidentChange, t: _IncidentMessages) -> Plan:
        assert change.incident_id is not None
        runs = self.ctx.store.action_runs(change.incident_id)
        title, body = compose(kind, change, runs, self.ctx.clock.now())
        t.last_sent = self.ctx.clock.monotonic()
        t.verdict = change.verdict
        t.actions_said = len(runs)
        t.pending = False
        settings = self.ctx.config.notify
        return Plan(self.name, kind, f"{title}\n{body}",
                    partial(send, settings.urls, title, body, settings.timeout,
                            **self._picture(change.incident_id)), change.incident_id)

    def _picture(self, incident_id: int | None) -> dict[str, Any]:
        """How the worker gets the incident's picture as it is when the message goes, and how
        to see it where it cannot go (nothing without the charts extra: text as before)."""
        c = self.ctx.config
        if incident_id is None or not c.notify.picture or not available():
            return {}
        return {"picture": partial(draw_picture, c.storage_url, incident_id, state_dir(c)),
                "hint": f"synwatch incidents show {incident_id} --plot"}

    def start(self) -> list[Plan]:
        """Messages the last run did not get out, as they were rendered then."""
        settings = self.ctx.config.notify
        since = self.ctx.clock.now() - RESEND_WITHIN
        plans = []
        for run in self.ctx.store.latest_runs(self.name, self.ctx.host, self.ctx.netns, since):
            if run.status != "failed" or run.retry_at is None:
                continue
            title, _, body = run.rendered.partition("\n")
            plans.append(Plan(self.name, run.target, run.rendered,
                              partial(send, settings.urls, title, body, settings.timeout,
                                      **self._picture(run.incident_id)), run.incident_id))
        return plans

    def _thread(self, incident_id: int) -> _IncidentMessages:
        """What was said about this incident, also before a restart (from the store)."""
        t = self.threads.get(incident_id)
        if t is None:
            runs = self.ctx.store.action_runs(incident_id)
            t = self.threads[incident_id] = _IncidentMessages(opened_sent=any(
                r.action == self.name and r.target == "opened" for r in runs))
            if t.opened_sent:  # resumed: say what changes from now on
                t.actions_said = len(runs)
                t.last_sent = self.ctx.clock.monotonic()
        return t

    def on_change(self, change: IncidentChange) -> list[Plan]:
        if change.incident_id is None:
            return []
        t = self._thread(change.incident_id)
        if t.opened_sent and t.latest is None:
            t.verdict = change.verdict
        t.latest = change
        if change.change == "closed":
            del self.threads[change.incident_id]
            return [self._plan("closed", change, t)]
        if not t.opened_sent:
            waited = (self.ctx.clock.now() - change.opened_at).total_seconds()
            if change.verdict == "unknown" and waited < 3 * self.ctx.config.probe_interval:
                return []  # the first samples give the verdict
            t.opened_sent = True
            return [self._plan("opened", change, t)]
        runs = len(self.ctx.store.action_runs(change.incident_id))
        if change.verdict != t.verdict or runs > t.actions_said:
            t.pending = True
        return self._due(t)

    def _due(self, t: _IncidentMessages) -> list[Plan]:
        if (t.pending and t.latest is not None and self.ctx.clock.monotonic() - t.last_sent
                >= self.ctx.config.notify.interval):
            return [self._plan("update", t.latest, t)]
        return []

    def tick(self, now: datetime) -> list[Plan]:
        return [p for t in list(self.threads.values()) for p in self._due(t)]
