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
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial

from synwatch.actions.firewall import BanItem, Firewall
from synwatch.actions.presets import load_presets
from synwatch.actions.registry import Action, ActionContext, Plan, skipped
from synwatch.banproof import CHECK, UNENFORCED, Check, Comparison, compare, normal
from synwatch.config import BanSettings, Config, Network
from synwatch.durations import format_duration
from synwatch.errors import CommandError, StoreError
from synwatch.fleetcopy import BATCH, MALFORMED, PAGE, Refusal, is_plain_prefix, pick
from synwatch.records import ActionRun, Ban, BanTarget, IncidentChange
from synwatch.runner import Command, run, show
from synwatch.store.listen import FleetListener

log = logging.getLogger("synwatch")
DRIFT_TOLERANCE = 5.0  # seconds: a kernel timeout this far from the history's is a drift
MAX_SHOWN = 5  # drifted bans named in the one warning of a reconcile (and fleet refusals)
MALFORMED_SHOWN = 20  # malformed fleet rows named, each in a warning, per loop turn
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
class _FleetScan:
    """Where the reading of other nodes' fleet bans is: a page of rows per loop turn, by id
    from ``after``, into ``pending``; the copies go in batches from there."""

    after: int = 0
    reading: bool = False
    again: bool = False  # a look was asked for while reading: read from the start once more
    pending: deque[Ban] = field(default_factory=deque)
    problem: str | None = None  # the store's, said once

    @property
    def busy(self) -> bool:
        return self.reading or bool(self.pending)


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
        self.fleet_scan = _FleetScan()
        self.malformed_own: set[int] = set()  # this node's own rows found malformed (warned)
        self.forgotten: set[str] = set()  # held in the kernel, unknown to the history (said)

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
        if self.fleet and self.fleet_scan.busy:  # the next page or batch of a backlog
            return self._copy_fleet()
        if mono < self.reconcile_state.due:
            return []
        self._refresh_guard()
        return self._reconcile()

    # -- a fleet's bans -------------------------------------------------------------------------

    def _fleet_tick(self, mono: float) -> list[Plan]:
        """Lifts what another node unbanned (the reconcile: its copy here was marked removed),
        then looks at the bans other nodes decided since the last look."""
        if not self.fleet:
            return []
        if self.listener is not None:
            self.listener.woken.clear()
        self.fleet_due = mono + FLEET_EVERY
        scan = self.fleet_scan
        if scan.reading:
            scan.again = True
        else:
            scan.reading, scan.after = True, 0
        return self._reconcile() + self._copy_fleet()

    def _copy_fleet(self) -> list[Plan]:
        """One loop turn's share of other nodes' fleet bans (synwatch/fleetcopy.py): a page of
        rows read, then at most one batch copied (one firewall command), so the probes keep
        their schedule and a stop is honoured whatever the backlog; the rest on the next turns
        (the loop is woken for them). Each row is checked like a log line and against this
        node's own guards and caps; a refusal is logged and counted, never stored."""
        scan, store, now = self.fleet_scan, self.ctx.store, self.ctx.clock.now()
        try:
            if scan.reading and len(scan.pending) < BATCH:
                page = store.fleet_bans_to_copy(now, after=scan.after, limit=PAGE)
                scan.after = max((b.id or 0 for b in page), default=scan.after)
                scan.pending.extend(b for b in page if b.id not in self.fleet_seen)
                self.fleet_seen.update(b.id for b in page if b.id is not None)
                if len(page) < PAGE:
                    scan.reading, scan.after = scan.again, 0
                    scan.again = False
            active = self._well_formed(store.active_bans(self.ctx.netns, now)) \
                if scan.pending else []
        except StoreError as exc:  # the database is gone: looked at again when it answers
            if scan.problem != exc.why:
                log.warning("ban: the fleet's bans cannot be read (%s); looking again every "
                            "%.0f s", exc.why, FLEET_EVERY)
                scan.problem = exc.why
            scan.reading = scan.again = False
            return []
        scan.problem = None
        if not scan.pending:
            if scan.reading:
                self.ctx.wake()
            return []
        picked = pick(scan.pending, now=now, settings=self.ctx.config.ban,
                      protected=self.guard.protected, active=active)
        self._refused(picked.refused)
        if scan.busy:
            self.ctx.wake()  # the next page or batch at the next turn, after a probe if due
        if not picked.copies:
            return []
        items = [BanItem(b.prefix, seconds, f"synwatch fleet ban {b.id} from {b.host}")
                 for b, seconds in picked.copies]
        commands = self.firewall.render_ban(items)
        origins = sorted({b.host for b, _ in picked.copies})
        target = (picked.copies[0][0].prefix if len(items) == 1
                  else f"{len(items)} fleet bans from {', '.join(origins[:3])}"
                  + (f" and {len(origins) - 3} more nodes" if len(origins) > 3 else ""))
        return [Plan(self.name, target, show(commands),
                     partial(self._copy, picked.copies, commands),
                     picked.copies[0][0].incident_id if len(items) == 1 else None)]

    def _refused(self, refused: Sequence[Refusal]) -> None:
        """Logged (a malformed row as a WARNING naming its id, the rest as INFO; a few by name
        and the others as a count) and counted, never stored one by one."""
        if not refused:
            return
        counts: dict[str, int] = {}
        for r in refused:
            counts[r.reason] = counts.get(r.reason, 0) + 1
        for reason, n in counts.items():
            self.ctx.fleet_refused(reason, n)
        bad = [r for r in refused if r.reason == MALFORMED]
        rest = [r for r in refused if r.reason != MALFORMED]
        shown = bad[:MALFORMED_SHOWN] + rest[:MAX_SHOWN]
        for r in shown:
            log.log(logging.WARNING if r.reason == MALFORMED else logging.INFO,
                    "ban: fleet ban %s from %s (%s) not copied: %s", r.ban.id, r.ban.host[:64],
                    r.ban.prefix[:64], r.why)
        more = bad[MALFORMED_SHOWN:] + rest[MAX_SHOWN:]
        if more:
            log.log(logging.WARNING if len(bad) > MALFORMED_SHOWN else logging.INFO,
                    "ban: %d more fleet bans not copied (ids %s to %s); in all: %s", len(more),
                    min(r.ban.id or 0 for r in more), max(r.ban.id or 0 for r in more),
                    ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())))

    def _copy(self, copies: Sequence[tuple[Ban, int]], commands: Sequence[Command]) -> str:
        """Stored first, then one firewall command for the whole batch; each copy names its
        origin (``origin_id``, the element's comment, its action run on the origin's
        incident)."""
        now = self.ctx.clock.now()
        store = self.ctx.store
        store.add_bans([replace(origin, id=None, host="", netns=self.ctx.netns,
                                backend=self.firewall.name, created_at=now,
                                expires_at=now + timedelta(seconds=seconds),
                                origin_id=origin.id)
                        for origin, seconds in copies])
        self.firewall.apply(commands)  # a failure: the reconcile puts them in from the store
        self.reconcile_state.due = 0.0  # proven in the kernel at the next tick
        if len(copies) > 1:  # one plan for the batch: each copy on its origin's incident too
            store.add_action_runs([ActionRun(
                incident_id=origin.incident_id, action=self.name, target=origin.prefix,
                status="done", at=now, rendered="",
                detail=f"fleet ban {origin.id} from {origin.host}, for "
                       f"{format_duration(seconds)} (one batch of {len(copies)})")
                for origin, seconds in copies])
        longest = max(seconds for _, seconds in copies)
        if len(copies) == 1:
            origin = copies[0][0]
            return f"fleet ban {origin.id} from {origin.host}, for {format_duration(longest)}"
        return f"{len(copies)} fleet bans copied, for up to {format_duration(longest)}"

    def _well_formed(self, bans: list[Ban]) -> list[Ban]:
        """This node's own rows whose prefix is a network (anyone who can write the table can
        write a row in this node's name): the others are left alone, warned once each."""
        out = []
        for b in bans:
            if not is_plain_prefix(b.prefix):
                if b.id not in self.malformed_own:
                    log.warning("ban: ban %s of this node in the history has a prefix that is "
                                "not a network (%r): ignored", b.id, b.prefix[:64])
                    self.malformed_own.add(b.id or 0)
                continue
            out.append(b)
        return out

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
