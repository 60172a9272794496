"""Is a ban enforced? The ban reconcile compares every active ban with what its backend holds in
the kernel (the element, its prefix length, its time left) and keeps the outcome of its last
check in the history, where `bans list` and `status` read it, also without the service.

What is kept needs no schema of its own: the ``saved_settings`` rows of the node and namespace
(the table the sysctls to put back live in, keyed by host and netns as a ban is; `uninstall`
restores only the sysctls it knows by name). One row per checked namespace, ``ban.check``:
when the last check was, of which backend, and how many drifts were repaired there in all; and
one row ``ban.unenforced.<ban id>`` for each ban the last check found not enforced (normally
none), with why. A ban is enforced when it is active, the last check of its backend was after
it was made, and no row says otherwise. Kept small on purpose: a value holds 255 characters.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from synwatch.records import Ban

CHECK = "ban.check"
UNENFORCED = "ban.unenforced."
PREFIX = "ban."  # every row this module keeps


def normal(prefix: str) -> str:
    """A prefix as ipaddress writes it, so two spellings of one network compare equal
    (nft lists ``::ffff:0.0.0.0/96`` for the history's ``::ffff:0:0/96``)."""
    return str(ipaddress.ip_network(prefix, strict=False))


@dataclass(frozen=True, slots=True)
class Check:
    at: datetime  # when the firewall was listed
    backend: str
    drift: int = 0  # drifts repaired in this namespace, ever
    drift_at: datetime | None = None  # the latest

    def encode(self) -> str:
        return json.dumps({"at": self.at.isoformat(), "backend": self.backend,
                           "drift": self.drift,
                           "drift_at": self.drift_at.isoformat() if self.drift_at else None},
                          separators=(",", ":"))

    @classmethod
    def decode(cls, value: str | None) -> Check | None:
        if not value:
            return None
        try:
            d = json.loads(value)
            return cls(at=_aware(datetime.fromisoformat(d["at"])), backend=str(d["backend"]),
                       drift=int(d.get("drift", 0)),
                       drift_at=_aware(datetime.fromisoformat(d["drift_at"]))
                       if d.get("drift_at") else None)
        except (ValueError, KeyError, TypeError):
            return None


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


Checks = Mapping[tuple[str, str, str], str]  # (host, netns, name) -> value, the ban.* rows


def enforced(ban: Ban, checks: Checks, now: datetime) -> bool:
    """Did the last check find ``ban`` in the kernel as the history has it? An inactive ban is
    not enforced; one made after the last check is not proven yet."""
    if ban.removed_at is not None or ban.expires_at <= now:
        return False
    check = Check.decode(checks.get((ban.host, ban.netns, CHECK)))
    if check is None or check.backend != ban.backend or check.at < ban.created_at:
        return False
    return (ban.host, ban.netns, f"{UNENFORCED}{ban.id}") not in checks


def drift_count(checks: Checks, host: str, netns: str) -> tuple[int, datetime | None]:
    """Drifts repaired in one namespace of one node, and when the latest was."""
    check = Check.decode(checks.get((host, netns, CHECK)))
    return (check.drift, check.drift_at) if check is not None else (0, None)


@dataclass(frozen=True, slots=True)
class Drift:
    ban: Ban
    why: str


@dataclass(frozen=True, slots=True)
class Comparison:
    """An active ban list against a firewall's listing."""

    drifted: tuple[Drift, ...]  # not held as the history says: to put back
    stale: tuple[str, ...]  # held, and no active ban wants it (expired, unbanned, unknown)
    enforced: tuple[Ban, ...]


def compare(bans: Sequence[Ban], have: Mapping[str, int | None], now: datetime, *,
            kernel_timeouts: bool, tolerance: float) -> Comparison:
    """Each ban is enforced when the firewall holds its prefix (at its length, compared as
    networks) and, where the kernel keeps the timeout, the time left matches the history's
    expiry within ``tolerance`` seconds. A ban ending within ``tolerance`` is left to end."""
    listed = {normal(p): left for p, left in have.items()}
    want: dict[str, list[Ban]] = {}
    for b in bans:
        want.setdefault(normal(b.prefix), []).append(b)
    drifted: list[Drift] = []
    ok: list[Ban] = []
    for key, group in want.items():
        # one element serves every ban of one prefix: the one that lasts longest sets its time
        expected = max((b.expires_at - now).total_seconds() for b in group)
        why = None
        if key not in listed:
            if expected > tolerance:
                net = ipaddress.ip_network(key)
                held = [p for p in listed if p not in want
                        and ipaddress.ip_network(p).network_address == net.network_address]
                why = (f"held as {held[0]} instead" if held else "missing from the kernel")
        elif kernel_timeouts:
            left = listed[key]
            if left is None:
                why = "held without a timeout"
            elif abs(left - expected) > tolerance and expected > tolerance:
                why = f"times out in {left} s, the history in {expected:.0f} s"
        for b in group:
            if why is None:
                ok.append(b)
            else:
                drifted.append(Drift(b, why))
    stale = tuple(sorted(p for p in listed if p not in want))
    return Comparison(tuple(drifted), stale, tuple(ok))
