"""Keep SYN cookies on while an incident is open, and put the old value back afterwards.

With ``tcp_syncookies = 0`` a full SYN queue drops every new client; with 1 the kernel answers
with cookies once the queue is full (docs/kernel.md §4). The value to restore is written to the
store *before* the sysctl is changed, so a crash in between, or a restart while the incident is
open, still ends with the admin's value back.
"""

from __future__ import annotations

from synwatch.actions.registry import Action, Plan, skipped
from synwatch.config import Config
from synwatch.records import IncidentChange
from synwatch.system.sysctl import read_sysctl, write_sysctl

SYSCTL = "net.ipv4.tcp_syncookies"


class SyncookiesAction(Action):
    name = "syncookies"
    per_incident = False  # every incident, whatever its verdict
    order = 10

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.syncookies_enabled

    def _where(self) -> str:
        return f"netns {self.ctx.netns}" if self.ctx.netns else "this host"

    def start(self) -> list[Plan]:
        """After a crash or a stop mid-incident: restore now if nothing is open any more."""
        if self.ctx.store.saved_setting(self.ctx.netns, SYSCTL) is None or self.ctx.open:
            return []
        return [self._restore(None)]

    def on_change(self, change: IncidentChange) -> list[Plan]:
        store, netns = self.ctx.store, self.ctx.netns
        if change.change == "opened":
            if store.saved_setting(netns, SYSCTL) is not None:
                return []  # raised for an incident still open
            value = read_sysctl(netns, SYSCTL)
            if value != 0:
                return [skipped(self.name, SYSCTL, f"already {value}", change.incident_id)]
            return [Plan(self.name, SYSCTL,
                         f"sysctl -w {SYSCTL}=1  # in {self._where()}, was 0; put back when "
                         "the last incident there closes",
                         lambda: self._engage(value), change.incident_id)]
        if change.change == "closed":
            others = [i for i in self.ctx.open if i != change.incident_id]
            if not others and store.saved_setting(netns, SYSCTL) is not None:
                return [self._restore(change.incident_id)]
        return []

    def _engage(self, previous: int) -> str:
        self.ctx.store.save_setting(self.ctx.netns, SYSCTL, str(previous), self.ctx.clock.now())
        write_sysctl(self.ctx.netns, SYSCTL, 1)
        return f"{previous} -> 1"

    def _restore(self, incident_id: int | None) -> Plan:
        saved = self.ctx.store.saved_setting(self.ctx.netns, SYSCTL)
        return Plan(self.name, SYSCTL,
                    f"sysctl -w {SYSCTL}={saved}  # in {self._where()}, the value before the "
                    "incidents (unless someone changed it meanwhile)",
                    lambda: self._put_back(int(saved or 0)), incident_id)

    def _put_back(self, saved: int) -> str:
        now = read_sysctl(self.ctx.netns, SYSCTL)
        if now == 1:
            write_sysctl(self.ctx.netns, SYSCTL, saved)
            outcome = f"1 -> {saved}"
        else:
            outcome = f"left at {now}: it was changed while the incident lasted"
        self.ctx.store.forget_setting(self.ctx.netns, SYSCTL)
        return outcome
