"""Subnet bans for concentrated floods, from kernel-side evidence only.

The blocks come from the verdict (synwatch.bantargets: the flood's own sources, from the SYN
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
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial

from synwatch.actions.firewall import BanItem, Firewall
from synwatch.actions.presets import load_presets
from synwatch.actions.registry import Action, ActionContext, Plan, skipped
from synwatch.banproof import CHECK, UNENFORCED, Check, compare
from synwatch.config import BanSettings, Config, Network
from synwatch.durations import format_duration
from synwatch.errors import CommandError, StoreError
from synwatch.fleetlisten import FleetListener
from synwatch.records import Ban, BanTarget, IncidentChange
from synwatch.runner import Command, run, show

log = logging.getLogger("synwatch")
DRIFT_TOLERANCE = 5.0  # seconds: a kernel timeout this far from the history's is a drift
MAX_SHOWN = 5  # drifted bans named in the one warning of a reconcile
FLEET_EVERY = 5.0  # seconds: a fleet's bans are looked at this often without a notification
ALWAYS_PROTECTED = ((ipaddress.ip_network("127.0.0.0/8"), "loopback"),
                    (ipaddress.ip_network("::1/128"), "loopback"),
                    (ipaddress.ip_network("0.0.0.0/32"), "unspecified"),
                    (ipaddress.ip_network("::/128"), "unspecified"))


@dataclass(frozen=True, slots=True)
class Guard:
    """Networks a ban must never touch, each with the reason."""

    protected: tuple[tuple[Network, str], ...]

    def refuses(self, prefix: str) -> str | None:
        net = ipaddress.ip_network(prefix)
        for other, why in self.protected:
            if net.version == other.version and net.overlaps(other):
                return f"{why} ({other})"
        return None


def host_networks(netns: str) -> list[tuple[Network, str]]:
    """The namespace's own addresses and default gateways, from `ip -j`."""
    found: list[tuple[Network, str]] = []
    for entry in json.loads(run(["ip", "-j", "addr", "show"], netns=netns) or "[]"):
        for a in entry.get("addr_info", []):
            found.append((ipaddress.ip_network(a["local"]), "one of this host's addresses"))
    for family in ("-4", "-6"):
        routes = json.loads(run(["ip", "-j", family, "route", "show", "default"],
                                netns=netns) or "[]")
        for r in routes:
            if "gateway" in r:
                found.append((ipaddress.ip_network(r["gateway"]), "the default gateway"))
    return found


def ban_seconds(settings: BanSettings, times_before: int) -> int:
    """The first ban lasts ``duration``; each one after it ``increment`` times longer (the
    exponent capped: 2.0 ** 1024 is past what a float holds, and max_duration is reached long
    before)."""
    return int(min(settings.duration * settings.increment ** min(times_before, 64),
                   settings.max_duration))


@dataclass(frozen=True, slots=True)
class Choice:
    ban: tuple[str, ...]  # blocks to ban: a prefix, or prefixes that fill a block, as that block
    refused: tuple[tuple[str, str], ...]  # prefix, why
    handled: tuple[str, ...] = ()  # every prefix of the incident these decide for


def choose(targets: Iterable[BanTarget], *, settings: BanSettings, guard: Guard,
           seen: set[str], banned_here: int, active_total: int,
           active: Sequence[str] = ()) -> Choice:
    """Which of an incident's ban targets (synwatch.bantargets: the flood's own sources at the
    width that holds them, each with a real share) to ban now: those not already handled or
    inside an active ban, within the guard and the caps. A block the guard refuses is tried
    part by part (the prefixes it was joined from), so the allowlist is never covered."""
    ban: list[str] = []
    refused: list[tuple[str, str]] = []
    handled: list[str] = []
    banned = Guard(tuple((ipaddress.ip_network(p), "banned") for p in active))
    for target in targets:
        if target.prefix in seen:
            continue
        handled.append(target.prefix)
        if banned.refuses(target.prefix) is not None:
            continue  # already dropped by an active ban (a block around it)
        whole = guard.refuses(target.prefix) is None or len(target.parts) <= 1
        for prefix in (target.prefix,) if whole else target.parts:
            why = guard.refuses(prefix)
            if why is None and banned_here + len(ban) >= settings.max_per_incident:
                why = f"cap of {settings.max_per_incident} bans per incident reached"
            if why is None and active_total + len(ban) >= settings.max_total:
                why = f"cap of {settings.max_total} active bans reached"
            if why is None:
                ban.append(prefix)
            else:
                refused.append((prefix, why))
    return Choice(tuple(ban), tuple(refused), tuple(handled))


def _absent(exc: CommandError) -> bool:
    """Did listing fail because synwatch's table or set is not there (nft, ipset)?"""
    return "No such file or directory" in exc.why or "does not exist" in exc.why


@dataclass
class _Reconcile:
    due: float = 0.0
    problem: str | None = None  # the firewall's
    store_problem: str | None = None


class BanAction(Action):
    name = "ban"
    order = 20

    def __init__(self, ctx: ActionContext) -> None:
        super().__init__(ctx)
        c = ctx.config
        preset = load_presets()[c.ban.backend]
        self.firewall = Firewall(preset, c.netns, c.thresholds.ipv4_prefix,
                                 c.thresholds.ipv6_prefix)
        self.seen: dict[int, set[str]] = {}  # incident -> prefixes banned or refused
        self.guard = Guard(())
        self.host: list[tuple[Network, str]] = []
        self.reconcile_state = _Reconcile()
        self.drifted: dict[int, str] = {}  # ban id -> why, found at the last check (warned)
        self.kept: _Kept | None = None  # the last check's outcome, as the history has it
        self.listener: FleetListener | None = None
        self.fleet_due = 0.0
        self.fleet_seen: set[int] = set()  # other nodes' fleet bans decided on here

    @classmethod
    def enabled(cls, config: Config) -> bool:
        return config.ban.enabled

    @property
    def fleet(self) -> bool:
        return self.ctx.config.ban.scope == "fleet"

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
        plans: list[Plan] = []
        setup = self.firewall.render_setup()
        if setup:
            plans.append(Plan(self.name, f"{self.firewall.name} setup", show(setup),
                              lambda: self._apply(setup, "ready")))
        if self.fleet and self.ctx.store.dialect == "postgresql":
            self.listener = FleetListener(self.ctx.store.url, self.ctx.host, self.ctx.wake)
            self.listener.start()
        return (plans + self._reconcile(setup=False)
                + self._fleet_tick(self.ctx.clock.monotonic()))

    def stop(self) -> list[Plan]:
        if self.listener is not None:
            self.listener.stop()
        return []

    def tick(self, now: datetime) -> list[Plan]:
        mono = self.ctx.clock.monotonic()
        woken = self.listener is not None and self.listener.woken.is_set()
        if woken or (self.fleet and mono >= self.fleet_due):
            return self._fleet_tick(mono)
        if mono < self.reconcile_state.due:
            return []
        self._refresh_guard()
        return self._reconcile()

    # -- a fleet's bans -------------------------------------------------------------------------

    def _fleet_tick(self, mono: float) -> list[Plan]:
        """Lifts what another node unbanned (the reconcile: its copy here was marked removed),
        then copies the bans other nodes decided since the last look."""
        if not self.fleet:
            return []
        if self.listener is not None:
            self.listener.woken.clear()
        self.fleet_due = mono + FLEET_EVERY
        return self._reconcile() + self._copy_fleet()

    def _copy_fleet(self) -> list[Plan]:
        """Other nodes' fleet bans, each copied here within this node's own guard (allowlist,
        own addresses), caps and ``max_duration``; a refusal is recorded once."""
        store, now, settings = self.ctx.store, self.ctx.clock.now(), self.ctx.config.ban
        try:
            origins = [b for b in store.fleet_bans_to_copy(now) if b.id not in self.fleet_seen]
        except StoreError as exc:  # the database is gone: the store has said so once
            log.debug("ban: the fleet's bans cannot be read: %s", exc)
            return []
        if not origins:
            return []
        active = store.active_bans(self.ctx.netns, now)
        banned = Guard(tuple((ipaddress.ip_network(b.prefix), "already banned here")
                             for b in active))
        plans: list[Plan] = []
        for origin in origins:
            assert origin.id is not None
            self.fleet_seen.add(origin.id)
            why = self.guard.refuses(origin.prefix) or banned.refuses(origin.prefix)
            if why is None and len(active) + len(plans) >= settings.max_total:
                why = f"cap of {settings.max_total} active bans reached"
            if why is not None:
                if not self.ctx.config.dry_run:  # decided: not looked at again
                    store.add_bans([replace(origin, id=None, host="", netns=self.ctx.netns,
                                            backend=self.firewall.name, created_at=now,
                                            removed_at=now, origin_id=origin.id)])
                plans.append(skipped(self.name, origin.prefix,
                                     f"fleet ban from {origin.host} not copied: {why}",
                                     origin.incident_id))
                continue
            until = min(origin.expires_at, now + timedelta(seconds=settings.max_duration))
            item = BanItem(origin.prefix, max(1, int((until - now).total_seconds())),
                           f"synwatch fleet ban {origin.id} from {origin.host}")
            commands = self.firewall.render_ban([item])
            plans.append(Plan(self.name, origin.prefix, show(commands),
                              partial(self._copy, origin, item, commands), origin.incident_id))
        return plans

    def _copy(self, origin: Ban, item: BanItem, commands: Sequence[Command]) -> str:
        now = self.ctx.clock.now()
        self.ctx.store.add_bans([replace(origin, id=None, host="", netns=self.ctx.netns,
                                         backend=self.firewall.name, created_at=now,
                                         expires_at=now + timedelta(seconds=item.seconds),
                                         origin_id=origin.id)])
        self.firewall.apply(commands)  # a failure: the reconcile puts it in from the store
        self.reconcile_state.due = 0.0  # proven in the kernel at the next tick
        return f"fleet ban from {origin.host}, for {format_duration(item.seconds)}"

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
        active = self.ctx.store.active_bans(self.ctx.netns, now)
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
        removed. The outcome of the check is kept in the history (synwatch/banproof.py) for
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
                unproven = store.active_bans(self.ctx.netns, now, fw.name)
                self._keep_check(now, 0, {b.id: f"not listed: {st.problem}"
                                          for b in unproven if b.id is not None}, unproven)
            return []
        have, absent = listing
        # a listing that took long leaves its times that much older
        tolerance = DRIFT_TOLERANCE + (self.ctx.clock.monotonic() - listed_at)
        try:
            active = store.active_bans(self.ctx.netns, now, fw.name)
            expired = store.expired_bans(self.ctx.netns, now, fw.name)
        except StoreError as exc:  # the database is gone: the firewall stays as it is
            if st.store_problem is None:
                log.warning("ban: %s; the firewall is reconciled when it answers", exc.why)
            st.store_problem = exc.why
            return []
        st.store_problem = None
        seen = compare(active, have, now, kernel_timeouts=fw.preset.kernel_timeouts,
                       tolerance=tolerance)
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
        """The check's outcome in the history (synwatch/banproof.py): when it was, the drift
        count, and a row for each ban it found not enforced. Written when that changes, when a
        ban is newer than the check kept, and else once per reconcile period (not at every
        fleet look, every 5 s)."""
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
