"""The per-source SYN rate limit, two ways.

- Per incident (`ratelimit` in [actions.policy], by default for *concentrated*): an address the
  verdict found both flooding and completing handshakes (many users behind one NAT address,
  synwatch.detect.bantargets) is not banned, which would lock its users out; its SYNs over the rate
  are dropped instead, with a kernel-side timeout as long as a ban (preset
  ratelimit-sources-nftables).
- A standing rule for every source while synwatch runs ([actions.ratelimit] enabled, opt-in;
  preset ratelimit-nftables): set up at start, removed at stop.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from synwatch.actions.banchoice import ALWAYS_PROTECTED, Guard, host_networks
from synwatch.actions.firewall import BanItem, Firewall
from synwatch.actions.presets import load_presets
from synwatch.actions.registry import Action, Plan, skipped
from synwatch.config import Config
from synwatch.durations import format_duration
from synwatch.errors import CommandError
from synwatch.records import BanTarget, IncidentChange
from synwatch.system.runner import Command, execute, show

PRESET = "ratelimit-nftables"
SOURCES = "ratelimit-sources-nftables"
RETRY = 30.0  # seconds before a failed limit (nft missing, refused) is tried again
RENEWED = " (renewed: the incident goes on)"


def ratelimit_context(config: Config) -> dict[str, Any]:
    r = config.ratelimit
    dports = f"tcp dport {{ {', '.join(map(str, r.ports))} }} " if r.ports else ""
    return {"rate": r.rate, "burst": r.burst, "hold": int(r.hold), "dports": dports}


class RatelimitAction(Action):
    name = "ratelimit"
    order = 30

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sources = Firewall(load_presets()[SOURCES], self.ctx.netns)
        self.seen: dict[int, set[str]] = {}  # incident -> addresses limited or refused
        self.retry_at: dict[str, float] = {}  # address -> when a failed limit is tried again
        # (incident, address) -> when its limit was set, and why: renewed while it lasts
        self.limited: dict[tuple[int, str], tuple[float, str]] = {}
        self.ready = False  # the per-source chain is set up (at the first address)

    @classmethod
    def standing(cls, config: Config) -> bool:
        return config.ratelimit.enabled

    def _plan(self, step: str, outcome: str) -> list[Plan]:
        commands = load_presets()[PRESET].render(step, ratelimit_context(self.ctx.config))
        return [Plan(self.name, f"nftables {step}", show(commands),
                     lambda: self._apply(commands, outcome))]

    def _apply(self, commands: list[Command], outcome: str) -> str:
        execute(commands, self.ctx.netns)
        return outcome

    def start(self) -> list[Plan]:
        r = self.ctx.config.ratelimit
        if not r.enabled:
            return []
        return self._plan("setup", f"over {r.rate}/min (burst {r.burst}): held {int(r.hold)} s")

    def stop(self) -> list[Plan]:
        # the per-source limits stay until their kernel timeouts, as bans do
        return self._plan("teardown", "removed") if self.ctx.config.ratelimit.enabled else []

    def _guard(self) -> Guard:
        try:
            host = host_networks(self.ctx.netns)
        except (CommandError, ValueError):
            host = []
        allow = [(n, "allowlisted") for n in self.ctx.config.allowlist]
        return Guard((*ALWAYS_PROTECTED, *allow, *host))

    def on_change(self, change: IncidentChange) -> list[Plan]:
        if change.change == "closed" and change.incident_id is not None:
            self.seen.pop(change.incident_id, None)
            self.limited = {k: v for k, v in self.limited.items()
                            if k[0] != change.incident_id}
        if change.status != "open" or change.incident_id is None:
            return []
        inc = change.incident_id
        seen = self.seen.setdefault(inc, set())
        c, mono = self.ctx.config, self.ctx.clock.monotonic()
        seconds = int(c.ban.duration)
        # a limit is renewed at half its time while its incident lasts (the limit may have
        # ended the overflow, so the address need not be among the latest targets): its kernel
        # timeout must not end it under a flood that goes on. A renewal that fails is tried
        # again after RETRY, like a first limit.
        renew = [BanTarget(p, 0, 0.0, (), why + RENEWED)
                 for (i, p), (at, why) in self.limited.items()
                 if i == inc and mono - at >= seconds / 2]
        chosen = change.limits if change.verdict == "concentrated" else ()
        new = [*renew, *(t for t in chosen if t.prefix not in seen)]
        if not new:
            return []
        guard = self._guard()
        plans: list[Plan] = []
        for target in new:
            why = guard.refuses(target.prefix)
            if why is not None:
                seen.add(target.prefix)
                plans.append(skipped(self.name, target.prefix, f"not rate limited: {why}", inc))
                continue
            if self.retry_at.get(target.prefix, 0.0) > mono:
                continue  # failed (or planned) a moment ago: tried again at a later change
            self.retry_at[target.prefix] = mono + RETRY
            setup = ([] if self.ready else
                     self.sources.preset.render("setup", ratelimit_context(c)))
            commands = setup + self.sources.render_ban(
                [BanItem(target.prefix, seconds, f"synwatch incident {inc}")])
            plans.append(Plan(self.name, target.prefix, show(commands),
                              partial(self._limit, commands, seconds, target.why,
                                      inc, target.prefix), inc))
        return plans

    def _limit(self, commands: list[Command], seconds: int, why: str, inc: int,
               prefix: str) -> str:
        execute(commands, self.ctx.netns)  # a failure: tried again after RETRY seconds
        self.seen.setdefault(inc, set()).add(prefix)
        self.retry_at.pop(prefix, None)
        self.limited[inc, prefix] = (self.ctx.clock.monotonic(), why.removesuffix(RENEWED))
        self.ready = True
        r = self.ctx.config.ratelimit
        return (f"SYNs over {r.rate}/min (burst {r.burst}) dropped for "
                f"{format_duration(seconds)}; {why}")
