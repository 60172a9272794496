"""`synwatch unban`: lifting bans by hand, on this node and, for a fleet ban, on every node."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache

from synwatch.actions.ban import PATH_PRESET
from synwatch.actions.firewall import BanItem, Firewall
from synwatch.actions.presets import Preset, load_presets
from synwatch.config import Config, Network
from synwatch.errors import NotFound, UsageError
from synwatch.records import ActionRun, Ban
from synwatch.store import History
from synwatch.system.bridgepath import SETTING, recorded
from synwatch.system.netns import bind, exists
from synwatch.system.netnsfind import FoundNamespace, find_namespaces
from synwatch.system.runner import show


def _covers(ban: Ban, wanted: Network) -> bool:
    try:
        net = ipaddress.ip_network(ban.prefix)
    except ValueError:  # a row anyone who can write the table wrote: not a ban of anything
        return False
    return net.version == wanted.version and net.overlaps(wanted)


def _firewall(ban: Ban, config: Config, store: History, presets: dict[str, Preset],
              namespaces: Callable[[], list[FoundNamespace]]) -> Firewall | None:
    """Where the ban acts: its namespace's firewall, or a bridged container's table on the
    host's path to it (where the history recorded it). None when that namespace went, and
    what it held with it."""
    v4, v6 = config.thresholds.ipv4_prefix, config.thresholds.ipv6_prefix
    if ban.backend == PATH_PRESET:
        saved = store.saved_setting(ban.netns, SETTING)
        place = recorded(saved, namespaces()) if saved else None
        if place is None:
            return None
        return Firewall(presets[PATH_PRESET], place[0].name, v4, v6,
                        values=(("table", place[1]),))
    if ban.netns and not exists(ban.netns):  # a container's, by the name synwatch gave it
        found = next((f for f in namespaces() if f.name == ban.netns), None)
        if found is None:
            return None
        bind(found.name, found.path, found.ident)
    return Firewall(presets[ban.backend], ban.netns, v4, v6)


@dataclass(frozen=True, slots=True)
class Unbanned:
    ban: Ban
    rendered: str
    kept: tuple[str, ...] = ()  # the rest of a wider block, still banned until it expires


def unban(config: Config, store: History, text: str, now: datetime) -> list[Unbanned]:
    """Remove the active bans overlapping ``text`` (a prefix or an address) from their firewall
    and mark them removed. A prefix inside a wider banned block lifts only itself: the block is
    replaced by the rest of it (a /24 out of a /22 leaves a /23 and a /24), with the same
    expiry. An explicit admin command: it acts even when the service's actions are a dry run."""
    try:
        wanted = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise UsageError("unban", f"{text!r} is not a prefix or an address") from exc
    # watching many namespaces, a container's bans too
    hits = [b for b in store.active_bans(None if config.many_namespaces else config.netns, now)
            if _covers(b, wanted)]
    if not hits:
        # a fleet ban this node did not copy (refused, or not looked at yet) is lifted too
        elsewhere = [b for b in store.fleet_bans_to_copy(now) if _covers(b, wanted)]
        if not elsewhere:
            raise NotFound(f"unban {text}", "no active ban covers it (see synwatch bans list)")
        store.mark_removed([b.id for b in elsewhere], now, everywhere=True)
        return [Unbanned(b, "", ()) for b in elsewhere]
    presets = load_presets()
    namespaces = cache(find_namespaces)  # looked for once, for the containers' bans only
    done: list[Unbanned] = []
    for ban in hits:
        fw = _firewall(ban, config, store, presets, namespaces)
        block = ipaddress.ip_network(ban.prefix)
        rest: list[str] = []
        if fw is None:  # its namespace went, and the ban with it: the history says so
            store.mark_removed([ban.id], now)
            done.append(Unbanned(ban, f"# netns {ban.netns} is gone, and this ban with it"))
            continue
        if block.prefixlen < wanted.prefixlen:
            parts = block.address_exclude(wanted)  # type: ignore[arg-type]
            rest = [str(n) for n in sorted(parts)]
        seconds = max(1, int((ban.expires_at - now).total_seconds()))
        commands = fw.render_unban([ban.prefix]) + fw.render_ban(
            [BanItem(r, seconds, f"synwatch incident {ban.incident_id}") for r in rest])
        fw.apply(commands)  # a failure leaves the ban active in the store: try again
        # a fleet ban goes on every node (their copies too); the rest of a block is this
        # node's to decide again, as a fleet ban the others copy
        store.mark_removed([ban.id], now, everywhere=True)
        store.add_bans([Ban(prefix=r, backend=ban.backend, netns=ban.netns,
                            incident_id=ban.incident_id, created_at=now,
                            expires_at=ban.expires_at, times_banned=ban.times_banned,
                            scope=ban.scope)
                        for r in rest])
        kept = f"; {', '.join(rest)} stay banned until {ban.expires_at.isoformat()}" \
            if rest else ""
        store.add_action_runs([ActionRun(
            incident_id=ban.incident_id, action="unban", target=ban.prefix, status="done",
            at=now, rendered=show(commands), detail=f"synwatch unban {text}{kept}")])
        done.append(Unbanned(ban, show(commands), tuple(rest)))
    return done
