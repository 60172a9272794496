"""What a configuration is, once parsed: frozen settings the rest of synwatch reads, and the
names that parsing checks against (the built-in actions and ban backends)."""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass
from typing import Literal

Auto = Literal["auto"] | bool
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When counters open an incident, and how a verdict is reached ([incident], [verdict])."""

    open_rate: int = 20  # overflowing SYNs (or accept-queue overflows) per second
    capacity_completion: float = 0.5
    spoofed_completion: float = 0.1
    concentrated_prefixes: int = 4
    concentrated_share: float = 0.8
    spoofed_min_prefixes: int = 32
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    # a listener whose SYN-RECV stays at or above max(half_open_min, backlog / 4) for
    # half_open_for seconds while most requests never complete opens a "half_open" incident
    half_open_min: int = 64
    half_open_for: float = 10.0
    verdict_window: float = 10.0  # a verdict on this much recent evidence can start a phase
    widest_v4: int = 16  # aggregated prefixes are never wider than these ([actions.ban])
    widest_v6: int = 48
    ban_floor: float = 0.05  # a block carrying less of the flood is not banned ([actions.ban])
    ban_coverage: float = 0.95  # bans are added until they hold this share of the flood


VERDICTS = ("capacity", "concentrated", "spoofed", "unknown")
# What each verdict does by default. Bans are for "concentrated" only (docs/incidents.md,
# "Verdicts"): a capacity incident is real clients, a spoofed one comes from everywhere.
DEFAULT_POLICY = {"capacity": ["notify", "exec"],
                  "concentrated": ["ban", "ratelimit", "notify", "exec"],
                  "spoofed": ["notify", "exec"], "unknown": ["notify", "exec"]}
EXEC_CHANGES = ("opened", "verdict", "closed")
# The actions synwatch ships (entry points in pyproject.toml) -> whether [actions.policy] chooses
# them per incident; the others run on their own section. A test holds this to the entry points.
BUILTIN_ACTIONS = {"ban": True, "exec": True, "notify": True, "ratelimit": True,
                   "syncookies": False, "synproxy": True}
# The ban presets synwatch ships (actions/*.toml with action = "ban"); a test holds this to them.
BAN_BACKENDS = ("iptables-ipset", "nftables", "ufw")


@dataclass(frozen=True, slots=True)
class BanSettings:
    enabled: bool = True
    backend: str = "nftables"
    duration: float = 3600.0
    increment: float = 2.0  # a prefix banned before is banned increment**n times longer ...
    max_duration: float = 7 * 86400.0  # ... up to this
    max_per_incident: int = 8
    max_total: int = 256
    min_share: float = 0.05  # a prefix carrying less of the flood is not worth a ban
    coverage: float = 0.95  # blocks are banned until they hold this share of the flood
    widest_v4: int = 16  # prefixes that fill a larger block are banned as it, up to this wide
    widest_v6: int = 48
    scope: str = "local"  # local | fleet: copied by every node sharing the history
    fleet_from: tuple[str, ...] = ("*",)  # nodes (names or globs) whose fleet bans are copied
    reconcile: float = 60.0  # seconds between checks of the bans in the kernel
    bridged: str = "path"  # a bridged container's bans: "path" (the host's path) | "inside"


@dataclass(frozen=True, slots=True)
class StorageSettings:
    host: str = ""  # this node's name in the history ("" is resolved to the hostname)
    # the database password's file ("" = none): as written by parse_config, resolved to where
    # it was read by load_config (which has put the password into Config.storage_url)
    password_file: str = ""
    state_dir: str = ""
    spool_max: int = 100_000
    keep_events: float | None = 90 * 86400.0  # None = forever
    keep_incidents: float | None = None


@dataclass(frozen=True, slots=True)
class RatelimitSettings:
    enabled: bool = False
    rate: int = 100  # new connections a minute from one address ...
    burst: int = 50
    hold: float = 300.0  # ... above which its SYNs are dropped for this long
    ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class NotifySettings:
    enabled: bool = False
    urls: tuple[str, ...] = ()
    interval: float = 600.0  # at most one update per incident this often
    timeout: float = 10.0
    retry: float = 30.0  # first retry after a failure, doubling
    attempts: int = 5
    picture: bool = True  # the incident's PNG attached where the service takes attachments


@dataclass(frozen=True, slots=True)
class ExecSettings:
    enabled: bool = False
    argv: tuple[str, ...] = ()
    on: tuple[str, ...] = EXEC_CHANGES
    timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class SynproxySettings:
    enabled: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    path: str  # where it was read from, for messages
    storage_url: str
    journald: Auto
    files: tuple[str, ...]
    kmsg: Auto
    netns: str  # the one namespace watched ("" = our own) when netns_globs is empty
    quiet_period: float
    probe_interval: float
    accounting: Auto
    sampler: Auto
    thresholds: Thresholds
    allowlist: tuple[Network, ...]
    dry_run: bool
    syncookies_enabled: bool
    policy: dict[str, tuple[str, ...]]
    ban: BanSettings
    ratelimit: RatelimitSettings
    notify: NotifySettings
    exec: ExecSettings
    metrics_listen: tuple[str, int] | None
    synproxy: SynproxySettings = SynproxySettings()
    storage: StorageSettings = StorageSettings()
    # `watch.netns = "*"` or a list: the names and globs of the namespaces to follow (every one
    # found that matches); empty: ``netns`` alone
    netns_globs: tuple[str, ...] = ()

    @property
    def host(self) -> str:
        return self.storage.host

    @property
    def many_namespaces(self) -> bool:
        return bool(self.netns_globs)

    def watches(self, name: str) -> bool:
        """Does watch.netns take the namespace of this name? "" is our own: a list takes it
        where it holds "" or "*"."""
        if not self.netns_globs:
            return name == self.netns
        return any(fnmatch.fnmatchcase(name, g) if name else g in ("", "*")
                   for g in self.netns_globs)
