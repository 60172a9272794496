"""A fleet's bans on this node (actions.ban.scope = "fleet"): the bans other nodes decided,
copied into this node's firewall in batches, each row checked like a log line and against this
node's own guards and caps (synwatch/actions/fleetcopy.py decides); a refusal is logged and
counted, never stored.

A node reads the fleet's *changes*: at its start every ban in force that it has not copied
(a page per loop turn), then, about once a second, the bans decided or lifted everywhere since
the last change it saw (``bans.fleet_seq``, an index probe when nothing changed), and every
five minutes or so every ban in force again, for rows written without a number (a node of an
older synwatch during an upgrade, a row written by hand). Nothing is
held open on the database between two looks (no LISTEN session), so a transaction pooler
(pgbouncer) can serve a thousand nodes from a few server connections; each node's wait is
drawn at random around the second, so nodes started together, or back together after an
outage, do not look at the same moment.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import partial

from synwatch.actions.banchoice import Guard
from synwatch.actions.firewall import BanItem, Firewall
from synwatch.actions.fleetcopy import BATCH, MALFORMED, PAGE, Refusal, is_plain_prefix, pick
from synwatch.actions.registry import Action, Plan
from synwatch.durations import format_duration
from synwatch.errors import StoreError
from synwatch.records import ActionRun, Ban
from synwatch.system.runner import Command, show

log = logging.getLogger("synwatch")
FLEET_POLL = 1.0  # seconds between two looks at the fleet's changes, on average
FLEET_PROOF = 5.0  # seconds, about, from a batch of copies to its proof in the kernel
FLEET_CATCH_UP = 300.0  # seconds between two looks at every fleet ban in force, on average
FLEET_JITTER = 0.25  # each wait is give or take this share of it, drawn at random
MAX_SHOWN = 5  # refusals named in one log line (the rest as a count)
MALFORMED_SHOWN = 20  # malformed fleet rows named, each in a warning, per loop turn


def jittered(seconds: float) -> float:
    """A wait of about ``seconds``, drawn at random: nodes that started together, or came back
    together after an outage, drift apart instead of asking the database at the same moment."""
    return seconds * random.uniform(1 - FLEET_JITTER, 1 + FLEET_JITTER)  # noqa: S311


@dataclass
class FleetTurn:
    """The process's schedule of looks at one history's fleet changes: when the next is due,
    its number, and the page the first namespace read at it (after which change, the rows)."""

    due: float = 0.0
    number: int = 0
    page: tuple[int, list[tuple[int, Ban]]] | None = None


_TURNS: dict[int, FleetTurn] = {}


def turn_of(store: object) -> FleetTurn:
    """The schedule of ``store`` (by identity: the service's one store lives as long as it)."""
    return _TURNS.setdefault(id(store), FleetTurn())


@dataclass
class FleetScan:
    """Where the reading of other nodes' fleet bans is: the fleet's last change read
    (``cursor``; None until read), a look at every ban in force by id from ``after`` (at the
    start), and the rows waiting to be copied (``pending``), a batch per loop turn."""

    cursor: int | None = None
    after: int = 0
    reading: bool = False  # the look at every ban in force, a page per loop turn
    more: bool = False  # the last page of changes was full: the next one at the next turn
    catch_up_due: float = 0.0  # the next look at every ban in force
    pending: deque[Ban] = field(default_factory=deque)
    problem: str | None = None  # the store's, said once

    @property
    def busy(self) -> bool:
        return self.reading or self.more or bool(self.pending)


class FleetCopies(Action):
    """The ban action's fleet half; synwatch/actions/ban.py is the rest."""

    firewall: Firewall
    guard: Guard
    fleet_turn: int  # the turn of the fleet's schedule this node last looked at
    fleet_seen: set[int]  # other nodes' fleet bans decided on here
    fleet_lifted: set[int]  # fleet bans read as lifted everywhere (a copy made after: lifted)
    fleet_scan: FleetScan
    malformed_own: set[int]  # this node's own rows found malformed (warned)

    @property
    def fleet(self) -> bool:
        return self.ctx.config.ban.scope == "fleet"

    def _reconcile(self, *, setup: bool = True) -> list[Plan]:
        raise NotImplementedError  # the ban action's (synwatch/actions/ban.py)

    def _mark_due(self) -> None:
        """The reconcile at the next tick (the ban action's)."""
        raise NotImplementedError

    def _prove_by(self, mono: float) -> None:
        """The reconcile at ``mono`` at the latest (the ban action's)."""
        raise NotImplementedError


    def next_due(self) -> float:
        return turn_of(self.ctx.store).due if self.fleet else math.inf

    def _fleet_due(self, mono: float) -> bool:
        """Is this node's look at the fleet's changes due? Every namespace's ban action of
        the process looks at the same turn (one schedule per history), so a host watching
        many namespaces turns its loop about once a second for them all, not once each."""
        if not self.fleet:
            return False
        turn = turn_of(self.ctx.store)
        if mono >= turn.due:
            turn.due, turn.number, turn.page = mono + jittered(FLEET_POLL), turn.number + 1, None
        return self.fleet_turn != turn.number

    def _fleet_tick(self, mono: float) -> list[Plan]:
        """The look at the fleet's changes of this turn: a ban lifted everywhere is taken out
        at the next tick (the reconcile), a new one waits with the others to be copied."""
        self.fleet_turn = turn_of(self.ctx.store).number
        scan = self.fleet_scan
        try:
            if scan.cursor is not None and mono >= scan.catch_up_due and not scan.reading:
                scan.reading, scan.after = True, 0
            if scan.cursor is None or scan.reading:
                scan.catch_up_due = mono + jittered(FLEET_CATCH_UP)
            self._read_changes()
        except StoreError as exc:  # the database is away: looked at again when it answers
            self._cannot_read(exc)
            return []
        return self._copy_fleet()

    def _read_changes(self) -> None:
        """A page of the fleet's changes after the last one read (read once per turn for all
        the process's namespaces that are as far); at the start (or until the history first
        answers), the number of the last change, then every ban in force."""
        scan, store = self.fleet_scan, self.ctx.store
        if scan.cursor is None:
            scan.cursor = store.fleet_cursor()  # first: a ban decided meanwhile is a change
            scan.reading, scan.after = True, 0
            return
        turn = turn_of(store)
        if turn.page is not None and turn.page[0] == scan.cursor:
            page = turn.page[1]
        else:
            page = store.fleet_changes(scan.cursor, PAGE)
            turn.page = (scan.cursor, page)
        scan.more = len(page) == PAGE
        lifted: set[int] = set()
        for seq, b in page:
            scan.cursor = seq
            if b.id is None:
                continue
            if b.removed_at is not None:
                lifted.add(b.id)
            elif b.host != self.ctx.host and b.id not in self.fleet_seen:
                self.fleet_seen.add(b.id)
                scan.pending.append(b)
        if lifted:
            self._lifted(lifted)

    def _lifted(self, origins: set[int]) -> None:
        """Fleet bans lifted everywhere: not copied if still waiting, this node's copies of
        them marked removed (one made after the `unban` was written would stay in force: it
        named no copy of this node's then), and the firewall reconciled at the next tick."""
        scan = self.fleet_scan
        if scan.pending:
            scan.pending = deque(b for b in scan.pending if b.id not in origins)
        self.fleet_lifted |= origins
        self._mark_due()  # first: the copies written before the lift are lifted whatever comes
        self.ctx.store.lift_copies(sorted(origins), self.ctx.netns, self.ctx.clock.now())

    def _cannot_read(self, exc: StoreError) -> None:
        scan = self.fleet_scan
        if scan.problem != exc.why:
            log.warning("ban: the fleet's bans cannot be read (%s); looking again every "
                        "%.0f s", exc.why, FLEET_POLL)
            scan.problem = exc.why

    def _copy_fleet(self) -> list[Plan]:
        """One loop turn's share of other nodes' fleet bans (synwatch/actions/fleetcopy.py): a
        page of rows read, then at most one batch copied (one firewall command), so the probes keep
        their schedule and a stop is honoured whatever the backlog; the rest on the next turns
        (the loop is woken for them). Each row is checked like a log line and against this
        node's own guards and caps; a refusal is logged and counted, never stored."""
        scan, store, now = self.fleet_scan, self.ctx.store, self.ctx.clock.now()
        try:
            if scan.more and len(scan.pending) < BATCH:
                scan.more = False
                self._read_changes()
            if scan.reading and len(scan.pending) < BATCH:
                page = store.fleet_bans_to_copy(now, after=scan.after, limit=PAGE,
                                                netns=self.ctx.netns)
                scan.after = max((b.id or 0 for b in page), default=scan.after)
                scan.pending.extend(b for b in page if b.id not in self.fleet_seen)
                self.fleet_seen.update(b.id for b in page if b.id is not None)
                scan.reading = len(page) == PAGE
            active = self._well_formed(store.active_bans(self.ctx.netns, now)) \
                if scan.pending else []
        except StoreError as exc:  # the database is away: looked at again when it answers
            self._cannot_read(exc)
            return []
        scan.problem = None
        if not scan.pending:
            if scan.busy:
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
        late = sorted({o.id for o, _ in copies if o.id in self.fleet_lifted})
        if late:  # lifted everywhere while this batch waited: its copies were not there
            store.lift_copies([i for i in late if i is not None], self.ctx.netns, now)
        self.firewall.apply(commands)  # a failure: the reconcile puts them in from the store
        if late:
            self._mark_due()  # the late ones lifted at the next tick
        else:
            # proven in the kernel within seconds, at a time of this node's own: every node
            # of the fleet copies the same ban at once, and a proof reads and writes the
            # history (drawn apart, the proofs leave the next copies their database)
            self._prove_by(self.ctx.clock.monotonic() + jittered(FLEET_PROOF))
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
