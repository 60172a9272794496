"""Which prefixes a ban may take, and for how long: the guard (the allowlist, loopback, the
host's own addresses and gateways are never banned), the caps per incident and in total, and
longer bans for repeat offenders (like fail2ban's bantime.increment). Pure but for reading the
host's addresses."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from synwatch.config import BanSettings, Network
from synwatch.records import BanTarget
from synwatch.system.runner import run

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
    """Which of an incident's ban targets (synwatch.detect.bantargets: the flood's own sources
    at the width that holds them, each with a real share) to ban now: those not already handled or
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
