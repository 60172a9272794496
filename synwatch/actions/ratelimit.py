"""The opt-in per-source SYN rate limit (preset ratelimit-nftables): set up at start, removed at
stop. It protects whatever the verdicts say, so it is not chosen per incident."""

from __future__ import annotations

from typing import Any

from synwatch.actions.presets import load_presets
from synwatch.actions.registry import Action, Plan
from synwatch.config import Config
from synwatch.runner import Command, execute, show

PRESET = "ratelimit-nftables"


def ratelimit_context(config: Config) -> dict[str, Any]:
    r = config.ratelimit
    dports = f"tcp dport {{ {', '.join(map(str, r.ports))} }} " if r.ports else ""
    return {"rate": r.rate, "burst": r.burst, "hold": int(r.hold), "dports": dports}


class RatelimitAction(Action):
    name = "ratelimit"
    per_incident = False
    order = 30

    @classmethod
    def enabled(cls, config: Config) -> bool:
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
        return self._plan("setup", f"over {r.rate}/min (burst {r.burst}): held {int(r.hold)} s")

    def stop(self) -> list[Plan]:
        return self._plan("teardown", "removed")
