"""The policy step: incident changes in, actions out, every outcome recorded on the incident.

Which actions run for a change is the policy ([actions.policy]: verdict -> actions; syncookies
are not chosen per verdict, and the rate limit's standing rule runs on its own section). Every
plan is logged with its render first; in dry-run that is all. Quick actions (sysctl, firewall)
run inline, so a ban lands within the probe that decided it; actions that may block (notify,
exec) run on one worker thread each, and their outcomes come back through a queue, so the store
is only ever written from the main thread. Failed notifications are retried with a doubling
delay; what is still unsent at a stop is recorded as such and sent again at the next start (the
notify action finds it in the store).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from synwatch.actions.registry import Action, ActionContext, Plan, resolve_policy
from synwatch.clock import Clock
from synwatch.config import Config
from synwatch.errors import StoreError, SynwatchError
from synwatch.records import ActionRun, IncidentChange
from synwatch.store.api import ServiceStore
from synwatch.system.bridgepath import BridgePath

log = logging.getLogger("synwatch")


@dataclass(frozen=True, slots=True)
class Outcome:
    plan: Plan
    attempt: int
    ok: bool
    detail: str
    at: datetime


class Worker:
    """One thread running one action's plans in order.

    A job leaves the queue only once its outcome is out (both under one lock), so at a stop
    the queue holds exactly what did not finish: no job is lost or reported twice."""

    def __init__(self, name: str, clock: Clock, results: queue.Queue[Outcome]) -> None:
        self.jobs: deque[tuple[Plan, int]] = deque()
        self.stopping = False
        self.cv = threading.Condition()
        self.clock = clock
        self.results = results
        self.thread = threading.Thread(target=self._loop, name=f"action {name}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.jobs and not self.stopping:
                    self.cv.wait()
                if not self.jobs:
                    return
                plan, attempt = self.jobs[0]
            try:
                detail, ok = plan.run(), True
            except Exception as exc:  # a plugin's failure is an outcome, not a crash
                detail, ok = (exc.why if isinstance(exc, SynwatchError) else repr(exc)), False
            with self.cv:
                self.jobs.popleft()
                self.results.put(Outcome(plan, attempt, ok, detail, self.clock.now()))

    def submit(self, plan: Plan, attempt: int) -> None:
        with self.cv:
            self.jobs.append((plan, attempt))
            self.cv.notify()

    def stop(self, timeout: float) -> list[tuple[Plan, int]]:
        """Finish what is queued within ``timeout``; returns the jobs that did not finish
        (one hanging on a dead server, the ones behind it)."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(timeout)
        with self.cv:
            return list(self.jobs)


class Responder:
    def __init__(self, config: Config, store: ServiceStore, clock: Clock,
                 on_record: Callable[[ActionRun], None] | None = None,
                 wake: Callable[[], None] | None = None, *,
                 on_drift: Callable[[str, int], None] | None = None,
                 on_fleet_refused: Callable[[str, int], None] | None = None,
                 bridge_path: BridgePath | None = None) -> None:
        self.ctx = ActionContext(config, store, clock, wake=wake or (lambda: None),
                                 drift=on_drift or (lambda _backend, _n: None),
                                 fleet_refused=on_fleet_refused or (lambda _reason, _n: None),
                                 bridge_path=bridge_path)
        self.on_record = on_record  # every outcome, as it is recorded (metrics)
        chosen = {name for names in config.policy.values() for name in names}
        self.actions: list[Action] = sorted(
            (cls(self.ctx) for name, cls in resolve_policy(config).items()
             if cls.enabled(config)
             and (not cls.per_incident or name in chosen or cls.standing(config))),
            key=lambda a: a.order)
        self.results: queue.Queue[Outcome] = queue.Queue()
        self.workers = {a.name: Worker(a.name, clock, self.results)
                        for a in self.actions if a.background}
        self.by_name = {a.name: a for a in self.actions}
        self.retry_at: list[tuple[float, Plan, int]] = []
        # its namespace went: only its messages (notify, exec) are finished, nothing more runs
        # in a namespace its name may mean another of by now (a container back under it)
        self.retired = False

    @property
    def config(self) -> Config:
        return self.ctx.config

    def next_due(self) -> float:
        """When an action's own work is next due (monotonic): the service's loop turns then.
        A retired responder ticks none: never due (the loop would turn for nothing)."""
        if self.retired:
            return math.inf
        return min((a.next_due() for a in self.actions), default=math.inf)

    def names(self) -> list[str]:
        return [a.name for a in self.actions]

    def resume(self, changes: list[IncidentChange]) -> None:
        """Incidents still open from before a restart."""
        for c in changes:
            if c.incident_id is not None:
                self.ctx.open[c.incident_id] = c

    def start(self) -> None:
        for a in self.actions:
            self._do_all(a, a.start, at_start=True)

    def on_change(self, change: IncidentChange) -> None:
        if change.incident_id is not None and change.status == "open":
            self.ctx.open[change.incident_id] = change
        chosen = self.config.policy.get(change.verdict, ())
        for a in self.actions:
            if self.retired and not a.background:
                continue  # its namespace is gone: what acts there would act by its name
            if not a.per_incident or a.name in chosen:
                self._do_all(a, lambda a=a: a.on_change(change))  # type: ignore[misc]
        if change.change == "closed" and change.incident_id is not None:
            self.ctx.open.pop(change.incident_id, None)

    def tick(self) -> None:
        """Collect the workers' outcomes, resubmit retries that are due, run time-driven work
        (ban expiry and reconciliation, delayed notification updates)."""
        self._collect()
        mono = self.ctx.clock.monotonic()
        due = [r for r in self.retry_at if r[0] <= mono]
        self.retry_at = [r for r in self.retry_at if r[0] > mono]
        for _, plan, attempt in due:
            self.workers[plan.action].submit(plan, attempt)
        now = self.ctx.clock.now()
        for a in self.actions:
            if not self.retired:
                self._do_all(a, lambda a=a: a.tick(now))  # type: ignore[misc]

    def stop(self, wait: float = 5.0) -> None:
        for a in self.actions:
            self._do_all(a, a.stop)
        unfinished = [job for w in self.workers.values() for job in w.stop(wait)]
        self._collect()  # not tick(): nothing may be submitted to the stopped workers
        # retries not yet due already have their "retrying" row; these have none yet
        for plan, attempt in unfinished:
            detail = f"attempt {attempt}: not done when synwatch stopped"
            retry_at = None
            if self.by_name[plan.action].retries:
                detail += "; retrying at the next start"
                retry_at = self.ctx.clock.now()
            log.warning("action %s %s: %s", plan.action, plan.target, detail)
            self._record(plan, "failed", detail, retry_at=retry_at)
        for _, plan, _attempt in self.retry_at:
            log.info("action %s %s: retried at the next start", plan.action, plan.target)

    # -- running and recording ------------------------------------------------------------------

    def _collect(self) -> None:
        while True:
            try:
                outcome = self.results.get_nowait()
            except queue.Empty:
                return
            self._outcome(outcome)

    def _do_all(self, action: Action, hook: Callable[[], list[Plan]], *,
                at_start: bool = False) -> None:
        try:
            plans = hook()
        except SynwatchError as exc:
            log.warning("action %s: %s", action.name, exc)
            return
        for plan in plans:
            self._do(action, plan, at_start=at_start)

    def _do(self, action: Action, plan: Plan, *, at_start: bool = False) -> None:
        about = f"incident {plan.incident_id}" if plan.incident_id is not None else "synwatch"
        if plan.skip is not None:
            log.info("action %s %s (%s): skipped: %s", plan.action, plan.target, about,
                     plan.skip)
            self._record(plan, "skipped", plan.skip)
            return
        if self.config.dry_run and at_start:
            # a dry run's setup is the same script at every start: one line says it, the
            # commands are for --debug
            log.info("action %s %s: dry run, not done (--debug shows its commands)",
                     plan.action, plan.target)
            log.debug("action %s %s:\n%s", plan.action, plan.target, plan.rendered)
            return  # nothing of an incident's: no run recorded, none counted
        log.info("action %s %s (%s)%s:\n%s", plan.action, plan.target, about,
                 " [dry run: not done]" if self.config.dry_run else "", plan.rendered)
        if self.config.dry_run:
            self._record(plan, "dry-run", "")
            return
        if action.background:
            self.workers[action.name].submit(plan, 1)
            return
        try:
            detail = plan.run()
        except SynwatchError as exc:
            log.warning("action %s %s failed: %s", plan.action, plan.target, exc.why)
            self._record(plan, "failed", exc.why)
            return
        log.info("action %s %s: %s", plan.action, plan.target, detail)
        self._record(plan, "done", detail)

    def _outcome(self, o: Outcome) -> None:
        action = self.by_name.get(o.plan.action)
        if o.ok:
            log.info("action %s %s: %s", o.plan.action, o.plan.target, o.detail)
            self._record(o.plan, "done", o.detail, o.at)
            return
        attempts = self.config.notify.attempts if action and action.retries else 1
        detail = f"attempt {o.attempt} of {attempts}: {o.detail}"
        retry_at = None
        if o.attempt < attempts:
            delay = self.config.notify.retry * 2 ** (o.attempt - 1)
            self.retry_at.append((self.ctx.clock.monotonic() + delay, o.plan, o.attempt + 1))
            detail += f"; retrying in {delay:.0f} s"
            retry_at = o.at + timedelta(seconds=delay)
        log.warning("action %s %s failed: %s", o.plan.action, o.plan.target, detail)
        self._record(o.plan, "failed", detail, o.at, retry_at)

    def _record(self, plan: Plan, status: str, detail: str, at: datetime | None = None,
                retry_at: datetime | None = None) -> None:
        run = ActionRun(incident_id=plan.incident_id, action=plan.action,
                        target=plan.target[:255], status=status,
                        at=at or self.ctx.clock.now(), rendered=plan.rendered, detail=detail,
                        retry_at=retry_at)
        if self.on_record is not None:
            self.on_record(run)
        try:
            # the service's history is behind its spool, which keeps what it cannot write now
            self.ctx.store.add_action_runs([run])
        except StoreError as exc:
            log.error("store: %s; the outcome of %s %s is not recorded",  # noqa: TRY400
                      exc, plan.action, plan.target)

    def reload(self, config: Config) -> None:
        """New settings for the actions already running; which actions run (their enabled
        flags, the ban backend) is decided at start."""
        self.ctx.config = replace(config, netns=self.ctx.config.netns)
