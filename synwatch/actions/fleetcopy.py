"""Other nodes' fleet bans as outside input: every row read from the shared history is checked
like a log line before this node copies it, and every copy obeys this node's own guards.

Anyone who can write the bans table (any node, its database password, a compromised node) can
write any row. A row is refused, never fatal, when it is malformed (its prefix is not a network,
a time Python cannot hold or out of order, a host name no node could have), comes from a node
``actions.ban.fleet_from`` does not accept, is wider than ``widest_v4``/``widest_v6``, touches a
range no source of a flood lives in (multicast, loopback, link-local, unspecified, reserved,
broadcast, v4-mapped or v4-compatible IPv6: a copy there is at best meaningless, at worst a
ban of half the Internet spelled in IPv6), the allowlist or this node's own addresses, or would
pass a cap. Documentation ranges (192.0.2.0/24, 2001:db8::/32, ...) are allowed: they never
carry real traffic, so a ban there harms nothing, and labs and examples use them.
"""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from fnmatch import fnmatchcase

from synwatch.config import BanSettings, Network
from synwatch.records import Ban
from synwatch.store.rows import TIME_MAX, TIME_MIN

BATCH = 100  # copies per loop turn: one firewall command (one `nft -f`)
PAGE = 1000  # fleet rows read per loop turn
EXAMINE = 2000  # rows checked per loop turn (refusals are cheap, but not free)
SKEW = timedelta(hours=1)  # a row made this far in this node's future is refused
_HOST = re.compile(r"[^\x00-\x20\x7f]{1,255}")  # as storage.host is checked

SPECIAL: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(net), why) for net, why in (
        ("0.0.0.0/8", "unspecified"), ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"), ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # 255.255.255.255 (broadcast) is inside it
        ("::/96", "v4-compatible and unspecified"), ("::1/128", "loopback"),
        ("::ffff:0:0/96", "v4-mapped"), ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast")))
# refusal reasons, the label of synwatch_fleet_refused_total
MALFORMED, ORIGIN, GUARD, CAP, COVERED = "malformed", "origin", "guard", "cap", "covered"


@dataclass(frozen=True, slots=True)
class Refusal:
    ban: Ban
    reason: str  # one of the labels above
    why: str


def _bound(text: str) -> datetime:
    return datetime.fromisoformat(text + "+00:00")


_MAX, _MIN = _bound(TIME_MAX), _bound(TIME_MIN)


def is_plain_prefix(text: str) -> bool:
    """A network written as ipaddress writes it: no IPv6 scope (``%...``, which ipaddress takes
    and keeps, and which would reach a firewall command's text), no host bits, no spaces."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except (ValueError, TypeError):
        return False
    return str(net) == text and "%" not in text


def malformed(b: Ban, now: datetime) -> str | None:
    """Why a fleet row is not a ban at all, or None. ``b`` as the store read it: its prefix as
    written, its times clamped to what Python holds (synwatch/store/rows.py in_range)."""
    if not _HOST.fullmatch(b.host or ""):
        return f"host {b.host!r} is not a node name"
    if b.scope != "fleet" or b.origin_id is not None:
        return "not a fleet ban decided on its node"
    if not is_plain_prefix(b.prefix):
        return f"prefix {b.prefix[:64]!r} is not a network"
    if b.expires_at >= _MAX or b.created_at >= _MAX:
        return "a time past what this node can hold (infinity?)"
    if b.created_at <= _MIN or b.expires_at <= _MIN:
        return "a time before what this node can hold (-infinity?)"
    if b.created_at > now + SKEW:
        return f"made in the future ({b.created_at.isoformat(timespec='seconds')})"
    if b.expires_at <= b.created_at:
        return "expires before it was made"
    return None


def accepted(host: str, fleet_from: Sequence[str]) -> bool:
    """Does ``actions.ban.fleet_from`` accept bans from ``host``?"""
    return any(fnmatchcase(host, pattern) for pattern in fleet_from)


class Held:
    """The prefixes banned here, for "does a candidate overlap one?" in constant time per
    candidate (a linear look over 20,000 bans for each of 10,000 rows took minutes): each held
    prefix as itself, and as each of its supernets down to the widest a copy may be."""

    def __init__(self, widest: dict[int, int], prefixes: Iterable[str] = ()) -> None:
        self.widest = widest
        self.exact: set[tuple[int, int, int]] = set()
        self.within: set[tuple[int, int, int]] = set()  # supernets of held prefixes
        for p in prefixes:
            try:
                self.add(ipaddress.ip_network(p, strict=False))
            except ValueError:
                continue  # not ours to judge here: the reconcile leaves it alone

    @staticmethod
    def _key(net: Network, length: int) -> tuple[int, int, int]:
        return net.version, int(net.network_address) >> (net.max_prefixlen - length), length

    def add(self, net: Network) -> None:
        self.exact.add(self._key(net, net.prefixlen))
        for length in range(self.widest[net.version], net.prefixlen + 1):
            self.within.add(self._key(net, length))

    def overlaps(self, net: Network) -> bool:
        if self._key(net, net.prefixlen) in self.within:
            return True  # it holds a banned prefix (or is one)
        return any(self._key(net, length) in self.exact for length in range(net.prefixlen))


@dataclass
class Picked:
    copies: list[tuple[Ban, int]]  # the row, normalized, and the seconds its copy lasts
    refused: list[Refusal]


def pick(rows: deque[Ban], *, now: datetime, settings: BanSettings,
         protected: Sequence[tuple[Network, str]], active: Sequence[Ban],
         limit: int = BATCH, examine: int = EXAMINE) -> Picked:
    """Of other nodes' fleet rows waiting in ``rows``, the copies to make now (at most
    ``limit``) and the refusals: each row taken from ``rows`` is decided once, at most
    ``examine`` of them per call (the rest wait for the next loop turn). ``protected``: the
    guard's networks (allowlist, loopback, this node's addresses and gateways); ``active``:
    this node's bans in force in its namespace."""
    widest = {4: settings.widest_v4, 6: settings.widest_v6}
    held = Held(widest, (b.prefix for b in active))
    per_incident: dict[int, int] = {}
    for b in active:
        if b.incident_id is not None:
            per_incident[b.incident_id] = per_incident.get(b.incident_id, 0) + 1
    total = len(active)
    out = Picked([], [])
    for _ in range(min(examine, len(rows))):
        if len(out.copies) >= limit:
            break
        b = rows.popleft()
        why = malformed(b, now)
        if why is not None:
            out.refused.append(Refusal(b, MALFORMED, why))
            continue
        if not accepted(b.host, settings.fleet_from):
            out.refused.append(Refusal(b, ORIGIN, f"{b.host} is not in actions.ban.fleet_from"))
            continue
        net = ipaddress.ip_network(b.prefix)
        refused = _guarded(net, widest, protected)
        if refused is not None:
            out.refused.append(Refusal(b, GUARD, refused))
            continue
        if held.overlaps(net):
            out.refused.append(Refusal(b, COVERED, "already banned here"))
            continue
        if b.expires_at <= now:
            continue  # ended while it waited: nothing to copy, nothing wrong
        if total >= settings.max_total:
            out.refused.append(Refusal(b, CAP, f"cap of {settings.max_total} active bans "
                                               "reached"))
            continue
        if b.incident_id is not None and \
                per_incident.get(b.incident_id, 0) >= settings.max_per_incident:
            out.refused.append(Refusal(b, CAP, f"cap of {settings.max_per_incident} bans per "
                                               "incident reached"))
            continue
        until = min(b.expires_at, now + timedelta(seconds=settings.max_duration))
        out.copies.append((replace(b, prefix=str(net)),
                           max(1, int((until - now).total_seconds()))))
        held.add(net)
        total += 1
        if b.incident_id is not None:
            per_incident[b.incident_id] = per_incident.get(b.incident_id, 0) + 1
    return out


def _guarded(net: Network, widest: dict[int, int],
             protected: Sequence[tuple[Network, str]]) -> str | None:
    if net.prefixlen < widest[net.version]:
        return (f"wider than widest_v{net.version} (/{widest[net.version]}) of this node's "
                "actions.ban")
    for other, why in (*SPECIAL, *protected):
        if net.version == other.version and net.overlaps(other):
            return f"{why} ({other})"
    return None
