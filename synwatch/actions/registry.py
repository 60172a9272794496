"""The action plugin interface and its registry (entry-point group ``synwatch.actions.v1``).

A plugin is a subclass of ``Action`` named by its entry point; it gets the ``ActionContext`` and
returns ``Plan``s from its hooks. The responder decides when a plan runs (inline, on a worker, or
not at all in dry-run) and records every outcome.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, ClassVar

from synwatch.errors import ConfigError

if TYPE_CHECKING:
    from synwatch.clock import Clock
    from synwatch.config import Config
    from synwatch.records import IncidentChange
    from synwatch.store.api import ServiceStore
    from synwatch.system.bridgepath import BridgePath

GROUP = "synwatch.actions.v1"


@dataclass(frozen=True, slots=True)
class Plan:
    """One thing an action will do: shown first (``rendered``), then done by ``run``, which
    returns a line about the outcome or raises a SynwatchError."""

    action: str
    target: str
    rendered: str
    run: Callable[[], str]
    incident_id: int | None = None
    skip: str | None = None  # nothing to do, and why: recorded as "skipped"


def skipped(action: str, target: str, why: str, incident_id: int | None) -> Plan:
    return Plan(action, target, "", lambda: why, incident_id, skip=why)


@dataclass
class ActionContext:
    """What actions share: the configuration, the store (written from the main thread only),
    the clock, and the incidents open in the watched namespace (id -> latest change)."""

    config: Config
    store: ServiceStore
    clock: Clock
    open: dict[int, IncidentChange] = field(default_factory=dict)
    # ends the service's wait so hooks run now (called from an action's own thread)
    wake: Callable[[], None] = field(default=lambda: None)
    # a ban found not enforced in the kernel, per backend (synwatch_bans_drift_total)
    drift: Callable[[str, int], None] = field(default=lambda _backend, _n: None)
    # other nodes' fleet bans refused here, per reason (synwatch_fleet_refused_total)
    fleet_refused: Callable[[str, int], None] = field(default=lambda _reason, _n: None)
    # a bridged container's: where its traffic is routed to it (its bans go there)
    bridge_path: BridgePath | None = None

    @property
    def netns(self) -> str:
        return self.config.netns

    @property
    def host(self) -> str:
        """This node (storage.host), as the incidents have it."""
        return self.config.host


class Action:
    """Base of every action. Hooks return plans; the default is to do nothing."""

    name: ClassVar[str] = ""
    per_incident: ClassVar[bool] = True  # chosen per verdict in [actions.policy]
    background: ClassVar[bool] = False  # runs on a worker thread (may block: network, programs)
    retries: ClassVar[bool] = False  # a failure is tried again (notifications)
    order: ClassVar[int] = 50  # within one change, lower runs first (bans before notify)

    def __init__(self, ctx: ActionContext) -> None:
        self.ctx = ctx

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return True

    @classmethod
    def standing(cls, config: Config) -> bool:
        """Does it also run outside the policy (a standing rule of its own section)?"""
        return False

    def start(self) -> list[Plan]:
        return []

    def on_change(self, change: IncidentChange) -> list[Plan]:
        return []

    def tick(self, now: datetime) -> list[Plan]:
        return []

    def next_due(self) -> float:
        """When (monotonic) ``tick`` has work of its own next, if sooner than the loop's next
        turn (at least once a second)."""
        return math.inf

    def stop(self) -> list[Plan]:
        return []


_registered: dict[str, type[Action]] | None = None


def registered() -> dict[str, type[Action]]:
    """name -> Action class for every entry point of the group (built-ins included)."""
    global _registered
    if _registered is None:
        found: dict[str, type[Action]] = {}
        for ep in entry_points(group=GROUP):
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Action)):
                raise ConfigError("actions", ep.name, f"{ep.value} is not an Action subclass")
            found[ep.name] = cls
        if not found:
            raise ConfigError("actions", None, f"no entry points in group {GROUP}: is synwatch "
                              "installed (pip install .)?")
        _registered = found
    return _registered


def resolve_policy(config: Config) -> dict[str, type[Action]]:
    """Every action: the policy's names looked up among the entry points. Parsing knows only
    the built-in actions, so a plugin's name is checked here, at the start and by
    `check-config`."""
    known = registered()
    for verdict, names in config.policy.items():
        for name in names:
            key = f"actions.policy.{verdict}"
            if name not in known:
                raise ConfigError(config.path, key, f'"{name}" is not an action '
                                                    f"(known: {', '.join(sorted(known))})")
            if not known[name].per_incident:
                raise ConfigError(config.path, key, f'"{name}" is not run per incident (it has '
                                                    f"its own [actions.{name}] section)")
    return known
