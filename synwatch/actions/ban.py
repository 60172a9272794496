"""Subnet bans for concentrated floods, from kernel-side evidence only.

The blocks come from the verdict (synwatch.detect.bantargets: the flood's own sources, from the SYN
sampler, SYN-RECV sockets or the nftables accounting set, never from log text, at the width
that holds them and sparing every source that completes handshakes). A prefix is refused when it
touches the allowlist, loopback, one of the host's own addresses or its default gateway, and the
bans are capped per incident and in total. A prefix banned before is banned longer (like
fail2ban's bantime.increment). The store is the truth: a ban is stored before the firewall is
touched, and the firewall is reconciled with the store at start and every minute
(``actions.ban.reconcile``), so a failed command (a missing tool, a flushed ruleset) is repaired
rather than lost. The reconcile checks each ban where it acts: in the namespace's firewall, at
its prefix length, with the time left the history says; what it found is kept for `bans list`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial

from synwatch.actions.banchoice import (
    ALWAYS_PROTECTED,
    Guard,
    ban_seconds,
    choose,
    host_networks,
)
from synwatch.actions.banfleet import FleetCopies, FleetScan
from synwatch.actions.banproof import CHECK, UNENFORCED, Check, Comparison, compare, normal
from synwatch.actions.firewall import BanItem, Firewall, safe_comment
from synwatch.actions.presets import load_presets
from synwatch.actions.registry import ActionContext, Plan, skipped
from synwatch.config import Config, Network
from synwatch.durations import format_duration
from synwatch.errors import CommandError, StoreError
from synwatch.records import Ban, IncidentChange
from synwatch.system.bridgepath import addresses_toward
from synwatch.system.runner import Command, show

log = logging.getLogger("synwatch")
DRIFT_TOLERANCE = 5.0  # seconds: a kernel timeout this far from the history's is a drift
MAX_SHOWN = 5  # drifted bans named in the one warning of a reconcile
PATH_PRESET = "nftables-path"  # a bridged container's bans, on the host's path to it
def _absent(exc: CommandError) -> bool:
    """Did listing fail because synwatch's table or set is not there (nft, ipset)?"""
    return "No such file or directory" in exc.why or "does not exist" in exc.why


@dataclass
class _Reconcile:
    due: float = 0.0
    problem: str | None = None  # the firewall's
    store_problem: str | None = None


class BanAction(FleetCopies):
    name = "ban"
    order = 20

    def __init__(self, ctx: ActionContext) -> None:
        super().__init__(ctx)
        c = ctx.config
        path = ctx.bridge_path
        if path is None:
            self.firewall = Firewall(load_presets()[c.ban.backend], c.netns,
                                     c.thresholds.ipv4_prefix, c.thresholds.ipv6_prefix)
        else:  # a bridged container's: on the host's path to it (synwatch/system/bridgepath.py)
            self.firewall = Firewall(
                load_presets()[PATH_PRESET], path.netns, c.thresholds.ipv4_prefix,
                c.thresholds.ipv6_prefix,
                values=(("table", path.table), ("container", safe_comment(c.netns))),
                destinations=((4, path.addresses4), (6, path.addresses6)))
        self.seen: dict[int, set[str]] = {}  # incident -> prefixes banned or refused
        self.guard = Guard(())
        self.host: list[tuple[Network, str]] = []
        self.reconcile_state = _Reconcile()
        self.drifted: dict[int, str] = {}  # ban id -> why, found at the last check (warned)
        self.kept: _Kept | None = None  # the last check's outcome, as the history has it
        self.fleet_turn, self.fleet_lifted = -1, set[int]()
        self.addresses_due = 0.0  # the next look at this host's addresses (the guard's)
        self.fleet_seen: set[int] = set()  # other nodes' fleet bans decided on here
        self.fleet_scan = FleetScan()
        self.malformed_own: set[int] = set()  # this node's own rows found malformed (warned)
        self.forgotten: set[str] = set()  # held in the kernel, unknown to the history (said)

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.ban.enabled

    def _refresh_guard(self) -> None:
        try:
            self.host = host_networks(self.ctx.netns)
        except (CommandError, ValueError) as exc:
            log.warning("ban: cannot read this host's addresses and gateways (%s); "
                        "keeping the ones read before", exc)
        allow = [(n, "allowlisted") for n in self.ctx.config.allowlist]
        self.guard = Guard((*ALWAYS_PROTECTED, *allow, *self.host))

    def start(self) -> list[Plan]:
        self._refresh_guard()
        self.addresses_due = self.ctx.clock.monotonic() + self.ctx.config.ban.reconcile
        plans: list[Plan] = []
        setup = self.firewall.render_setup()
        if setup:
            plans.append(Plan(self.name, f"{self.firewall.name} setup", show(setup),
                              lambda: self._apply(setup, "ready")))
        return (plans + self._reconcile(setup=False)
                + (self._fleet_tick(self.ctx.clock.monotonic()) if self.fleet else []))

    def tick(self, now: datetime) -> list[Plan]:
        mono = self.ctx.clock.monotonic()
        plans: list[Plan] = []
        if self._fleet_due(mono):
            plans += self._fleet_tick(mono)
        elif self.fleet and self.fleet_scan.busy:  # the next page or batch of a backlog
            plans += self._copy_fleet()
        if mono < self.reconcile_state.due:
            return plans
        if mono < self.addresses_due:  # a reconcile brought forward to prove a new ban
            return plans + self._reconcile()
        # this host's addresses, read with `ip`: on the reconcile's own period, not at each
        # ban proven (a fleet node proves a copy of every ban the fleet decides)
        self.addresses_due = mono + self.ctx.config.ban.reconcile
        self._refresh_guard()
        return plans + self._follow_addresses() + self._reconcile()

    def _follow_addresses(self) -> list[Plan]:
        """A bridged container's addresses change (`docker network connect`, `disconnect`):
        the path's destinations follow at each reconcile, its bans stay."""
        path = self.ctx.bridge_path
        if path is None or self.ctx.config.dry_run:
            return []
        try:
            now4, now6 = addresses_toward(self.ctx.netns, path.nsid)
        except (CommandError, ValueError) as exc:
            log.debug("ban: cannot read the addresses of %s: %s", self.ctx.netns, exc)
            return []
        toward = ((4, now4), (6, now6))
        if toward == self.firewall.destinations:
            return []
        self.firewall = replace(self.firewall, destinations=toward)
        setup = self.firewall.render_setup()
        return [Plan(self.name, f"{self.firewall.name} destinations", show(setup),
                     lambda: self._apply(setup, f"toward {', '.join((*now4, *now6))}"))]

    def _mark_due(self) -> None:
        self.reconcile_state.due = 0.0

    def _prove_by(self, mono: float) -> None:
        self.reconcile_state.due = min(self.reconcile_state.due, mono)

    def _apply(self, commands: Sequence[Command], outcome: str) -> str:
        self.firewall.apply(commands)
        return outcome

    def on_change(self, change: IncidentChange) -> list[Plan]:
        if change.change == "closed" and change.incident_id is not None:
            self.seen.pop(change.incident_id, None)
        if (change.verdict != "concentrated" or change.status != "open"
                or change.incident_id is None):
            return []  # only a flood from a few networks is banned, and only while it lasts
        inc = change.incident_id
        seen = self.seen.setdefault(inc, set())
        if not seen:
            seen |= self.ctx.store.incident_bans(inc)  # after a restart
        now = self.ctx.clock.now()
        active = self._well_formed(self.ctx.store.active_bans(self.ctx.netns, now))
        choice = choose(change.bans, settings=self.ctx.config.ban, guard=self.guard, seen=seen,
                        banned_here=sum(1 for b in active if b.incident_id == inc),
                        active_total=len(active), active=[b.prefix for b in active])
        plans = [skipped(self.name, p, f"not banned: {why}", inc) for p, why in choice.refused]
        why = {part: t.why for t in change.bans for part in (t.prefix, *t.parts)}
        for prefix in choice.ban:
            times = self.ctx.store.times_banned(self.ctx.netns, prefix)
            seconds = ban_seconds(self.ctx.config.ban, times)
            item = BanItem(prefix, seconds, f"synwatch incident {inc}")
            commands = self.firewall.render_ban([item])
            plans.append(Plan(self.name, prefix, show(commands),
                              partial(self._ban, inc, item, times, commands,
                                      why.get(prefix, "")), inc))
        seen |= set(choice.ban) | {p for p, _ in choice.refused} | set(choice.handled)
        return plans

    def _ban(self, incident_id: int, item: BanItem, times: int,
             commands: Sequence[Command], why: str) -> str:
        now = self.ctx.clock.now()
        # stored first: if the firewall refuses, reconciliation puts it in later
        self.ctx.store.add_bans([Ban(prefix=item.prefix, backend=self.firewall.name,
                                     netns=self.ctx.netns, incident_id=incident_id,
                                     created_at=now,
                                     expires_at=now + timedelta(seconds=item.seconds),
                                     times_banned=times + 1,
                                     scope=self.ctx.config.ban.scope)])
        try:
            self.firewall.apply(commands)
        except CommandError:
            self.reconcile_state.due = self.ctx.clock.monotonic() + 5  # try again soon
            raise
        self.reconcile_state.due = 0.0  # proven in the kernel at the next tick
        again = f", ban #{times + 1} of this prefix" if times else ""
        return f"banned for {format_duration(item.seconds)}{again}" + (f"; {why}" if why else "")

    # -- reconcile ------------------------------------------------------------------------------

    def _reconcile(self, *, setup: bool = True) -> list[Plan]:
        """Make the firewall hold exactly the store's active bans of this backend, each as the
        history has it: present at its prefix length and, where the kernel keeps the timeout,
        with the time left the history says (within a few seconds). A ban that is not (deleted
        by hand, a flushed ruleset, a shortened timeout, a removed ufw rule) is a drift: put
        back with its remaining time, logged once and counted. Expired and unknown ones are
        removed. The outcome of the check is kept in the history (synwatch/actions/banproof.py) for
        `bans list` and `status`. ``setup``: put the backend's table or set back with the bans
        (not at the start, whose setup runs before)."""
        st = self.reconcile_state
        every = self.ctx.config.ban.reconcile
        st.due = self.ctx.clock.monotonic() + every
        if self.ctx.config.dry_run:
            # a dry run never bans, so there is nothing of ours to list (and as a user, nft
            # would refuse to list anything: a warning at every start for nothing)
            return []
        store, fw = self.ctx.store, self.firewall
        listed_at = self.ctx.clock.monotonic()
        listing = self._listed(every)
        now = self.ctx.clock.now()
        if listing is None:  # nothing is proven while the firewall cannot be listed
            with contextlib.suppress(StoreError):
                unproven = self._well_formed(store.active_bans(self.ctx.netns, now, fw.name))
                self._keep_check(now, 0, {b.id: f"not listed: {st.problem}"
                                          for b in unproven if b.id is not None}, unproven)
            return []
        have, absent = listing
        # a listing that took long leaves its times that much older
        tolerance = DRIFT_TOLERANCE + (self.ctx.clock.monotonic() - listed_at)
        try:
            active = self._well_formed(store.active_bans(self.ctx.netns, now, fw.name))
            expired = self._well_formed(store.expired_bans(self.ctx.netns, now, fw.name))
        except StoreError as exc:  # the database is gone: the firewall stays as it is
            if st.store_problem is None:
                log.warning("ban: %s; the firewall is reconciled when it answers", exc.why)
            st.store_problem = exc.why
            return []
        st.store_problem = None
        seen = compare(active, have, now, kernel_timeouts=fw.preset.kernel_timeouts,
                       tolerance=tolerance)
        seen = self._spare_forgotten(seen, have, active)
        new = [d for d in seen.drifted if d.ban.id not in self.drifted]
        if new:
            shown = "; ".join(f"{d.ban.prefix}{_of(d.ban)} {d.why}" for d in new[:MAX_SHOWN])
            more = f"; and {len(new) - MAX_SHOWN} more" if len(new) > MAX_SHOWN else ""
            log.warning("ban: %d ban%s not enforced by %s in the kernel, putting %s back: %s%s",
                        len(new), "s" if len(new) != 1 else "", fw.name,
                        "them" if len(new) != 1 else "it", shown, more)
            self.ctx.drift(fw.name, len(new))
        self.drifted = {d.ban.id: d.why for d in seen.drifted if d.ban.id is not None}
        self._keep_check(now, len(new), self.drifted, active)
        if not seen.drifted and not seen.stale:
            if expired:
                store.mark_removed([b.id for b in expired], now)
            return []
        missing = [BanItem(d.ban.prefix, max(1, int((d.ban.expires_at - now).total_seconds())),
                           f"synwatch incident {d.ban.incident_id}") for d in seen.drifted]
        # a table or set that is gone comes back first; then the stale ones go, in a batch of
        # their own: nft checks a batch's elements against the set before it, and an element
        # of the wrong length overlaps the right one
        commands = ((fw.render_setup() if absent and setup else [])
                    + fw.render_unban(list(seen.stale)) + fw.render_ban(missing))
        parts = ([f"restore {len(missing)}"] if missing else []) + (
            [f"remove {len(seen.stale)} expired or unknown"] if seen.stale else [])

        def apply() -> str:
            fw.apply(commands)
            store.mark_removed([b.id for b in expired], now)
            if missing:
                self._prove(active)
            return ", ".join(parts)

        return [Plan(self.name, f"{fw.name} reconcile", show(commands), apply)]

    def _spare_forgotten(self, seen: Comparison, have: dict[str, int | None],
                         active: Sequence[Ban]) -> Comparison:
        """A ban the kernel holds with a timeout of its own, of a prefix the history has never
        banned here, is left to that timeout rather than removed: the history forgot it (a
        deleted, replaced or restored file), it did not lift it. What the history knows it
        ended (expired, unbanned here or by another node of the fleet) is removed as before,
        and so is an element that overlaps an active ban (a /24 held as its .0: drift, and an
        interval set takes no overlapping element)."""
        if not seen.stale or not self.firewall.preset.kernel_timeouts:
            return seen
        left = {normal(p): t for p, t in have.items()}
        held = Guard(tuple((ipaddress.ip_network(b.prefix), "active") for b in active))
        forgotten: list[str] = []
        for prefix in seen.stale:
            if left.get(prefix) is None:
                continue  # no timeout of its own: it would stay for ever
            if held.refuses(prefix) is not None:
                continue  # in the way of an active ban: drift, removed
            try:
                known = self.ctx.store.times_banned(self.ctx.netns, prefix) > 0
            except StoreError:
                known = False  # the history cannot say: never lift on its silence
            if not known:
                forgotten.append(prefix)
        if not forgotten:
            return seen
        if set(forgotten) != self.forgotten:
            log.error("ban: %d ban%s in %s the history does not know (%s%s): left to their "
                      "kernel timeouts; was the history deleted or replaced?", len(forgotten),
                      "s" if len(forgotten) != 1 else "", self.firewall.name,
                      ", ".join(forgotten[:MAX_SHOWN]),
                      ", ..." if len(forgotten) > MAX_SHOWN else "")
            self.forgotten = set(forgotten)
        return replace(seen, stale=tuple(p for p in seen.stale if p not in forgotten))

    def _listed(self, every: float) -> tuple[dict[str, int | None], bool] | None:
        """What the firewall holds and whether our table or set is gone, or None when it
        cannot be listed (said once)."""
        st, fw = self.reconcile_state, self.firewall
        absent = False
        try:
            have = fw.listed()
        except CommandError as exc:
            if not _absent(exc):
                if st.problem != str(exc):
                    log.warning("ban: cannot list the %s bans: %s; retrying every %.0f s",
                                fw.name, exc, every)
                    st.problem = str(exc)
                return None
            # no table or set of ours (a reboot, `nft flush ruleset`, a dry run, a first
            # start): the firewall holds none of our bans, and the setup that runs before
            # these plans creates what they go into
            have, absent = {}, True
        if st.problem is not None:
            log.info("ban: %s answers again", fw.name)
            st.problem = None
        return have, absent

    def _prove(self, active: Sequence[Ban]) -> None:
        """After putting bans back: listed again, so what the history keeps is what the kernel
        holds, not what the commands meant."""
        try:
            have = self.firewall.listed()
        except CommandError as exc:
            log.warning("ban: cannot list the %s bans after putting them back: %s",
                        self.firewall.name, exc)
            return
        now = self.ctx.clock.now()
        seen = compare(active, have, now, kernel_timeouts=self.firewall.preset.kernel_timeouts,
                       tolerance=DRIFT_TOLERANCE)
        self.drifted = {d.ban.id: d.why for d in seen.drifted if d.ban.id is not None}
        self._keep_check(now, 0, self.drifted, active)

    def _keep_check(self, now: datetime, drifts: int, unenforced: dict[int, str],
                    active: Sequence[Ban]) -> None:
        """The check's outcome in the history (synwatch/actions/banproof.py): when it was, the drift
        count, and a row for each ban it found not enforced. Written when that changes, when a
        ban is newer than the check kept, and else once per reconcile period (not at every
        reconcile a new ban brings forward)."""
        store, netns = self.ctx.store, self.ctx.netns
        try:
            if self.kept is None:  # the first check since the start: what the history has
                check = Check.decode(store.saved_setting(netns, CHECK))
                marks = {name: value for ns, name, value in store.saved_settings()
                         if ns == netns and name.startswith(UNENFORCED)}
                self.kept = _Kept(marks, check.drift if check else 0,
                                  check.drift_at if check else None, None)
            kept = self.kept
            marks = {f"{UNENFORCED}{i}": why[:255] for i, why in unenforced.items()}
            due = (kept.at is None or any(b.created_at >= kept.at for b in active)
                   or (now - kept.at).total_seconds() >= self.ctx.config.ban.reconcile / 2)
            if marks == kept.marks and not drifts and not due:
                return
            for name in kept.marks.keys() - marks.keys():
                store.forget_setting(netns, name)
            for name, why in marks.items():
                if kept.marks.get(name) != why:
                    store.save_setting(netns, name, why, now)
            now_kept = _Kept(marks, kept.drift + drifts, now if drifts else kept.drift_at, now)
            store.save_setting(netns, CHECK, Check(now, self.firewall.name, now_kept.drift,
                                                   now_kept.drift_at).encode(), now)
            self.kept = now_kept
        except StoreError as exc:  # kept at the next check
            log.debug("ban: the check's outcome is not kept: %s", exc)


def _of(ban: Ban) -> str:
    return f" (incident {ban.incident_id})" if ban.incident_id is not None else ""


@dataclass(frozen=True, slots=True)
class _Kept:
    """What the history holds of the last check."""

    marks: dict[str, str]  # ban.unenforced.<id> -> why
    drift: int
    drift_at: datetime | None
    at: datetime | None  # when it was written
