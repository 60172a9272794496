"""The one reader of synwatch.toml: strict parse, defaults, validation; no I/O beyond the file.

Unknown sections and keys are errors, and every error names its key:
``synwatch: config /etc/synwatch/synwatch.toml: incident.quiet_period: expected a duration ...``.
Whether the machine can do what the config asks (is there a journal? nft?) is checked elsewhere.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from synwatch.durations import parse_duration
from synwatch.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SYSTEM_CONFIG = Path("/etc/synwatch/synwatch.toml")
EMBEDDED = "<embedded default>"
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


VERDICTS = ("capacity", "concentrated", "spoofed", "unknown")
# What each verdict does by default. Bans are for "concentrated" only (DESIGN.md, "Verdicts"):
# a capacity incident is real clients, a spoofed one comes from everywhere.
DEFAULT_POLICY = {"capacity": ["notify", "exec"], "concentrated": ["ban", "notify", "exec"],
                  "spoofed": ["notify", "exec"], "unknown": ["notify", "exec"]}
EXEC_CHANGES = ("opened", "verdict", "closed")
# The actions synwatch ships (entry points in pyproject.toml) -> whether [actions.policy] chooses
# them per incident; the others run on their own section. A test holds this to the entry points.
BUILTIN_ACTIONS = {"ban": True, "exec": True, "notify": True, "ratelimit": False,
                   "syncookies": False}
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
    widest_v4: int = 16  # prefixes that fill a larger block are banned as it, up to this wide
    widest_v6: int = 48


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


@dataclass(frozen=True, slots=True)
class ExecSettings:
    enabled: bool = False
    argv: tuple[str, ...] = ()
    on: tuple[str, ...] = EXEC_CHANGES
    timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class Config:
    path: str  # where it was read from, for messages
    storage_url: str
    journald: Auto
    files: tuple[str, ...]
    kmsg: Auto
    netns: str
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


def _show(value: Any) -> str:
    """A value as it reads in TOML: "text", true, 3600, ["a", "b"]."""
    return json.dumps(value, ensure_ascii=False, default=str)


class _Invalid(ValueError):
    """A value is wrong; the caller adds the key and the file."""


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_show(value)}")
    return value


def _auto(value: Any) -> Auto:
    if value == "auto" or isinstance(value, bool):
        return value  # type: ignore[no-any-return]
    raise _Invalid(f'expected "auto", true or false, got {_show(value)}')


def _duration(value: Any) -> float:
    if not isinstance(value, str):
        raise _Invalid(f'expected a duration string like "90s" or "1h", got {_show(value)}')
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from exc
    if seconds <= 0:
        raise _Invalid(f"must be longer than 0, got {_show(value)}")
    return seconds


def _int_in(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _Invalid(f"expected a whole number from {low} to {high}, got {_show(value)}")
        return value
    return check


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise _Invalid(f"expected a fraction from 0 to 1 (0.8 = 80%), got {_show(value)}")
    return float(value)


def _string_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"expected a list of strings, got {_show(value)}")
    return tuple(value)


# SQLAlchemy's URL grammar starts "dialect[+driver]://" (sqlalchemy.engine.url._parse_url);
# whether the driver is installed and the database answers is the machine's question, asked by
# `check-config` and at the start, so parsing never imports SQLAlchemy.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\+[A-Za-z0-9_]+)?://.*", re.DOTALL)


def _url(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    if value and not _URL.fullmatch(value):
        raise _Invalid(f"not an SQLAlchemy URL (e.g. sqlite:////var/lib/synwatch/"
                       f"synwatch.db): {_show(value)}")
    return value


def _files(value: Any) -> tuple[str, ...]:
    paths = _string_list(value)
    for p in paths:
        if not p.startswith("/"):
            raise _Invalid(f"{_show(p)} is not an absolute path")
    return paths


def _netns(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a network namespace name, got {_show(value)}")
    # not "-x": `ip netns exec -x` would read it as an option
    if value and (value in (".", "..") or not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,254}",
                                                            value)):
        raise _Invalid(f"{_show(value)} is not an `ip netns` name")
    return value


def _networks(value: Any) -> tuple[Network, ...]:
    out = []
    for text in _string_list(value):
        try:
            out.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f" (did you mean {ipaddress.ip_network(text, strict=False)}?)"
            raise _Invalid(f"{_show(text)} is not a CIDR network: {exc}{hint}") from exc
    return tuple(out)


def _backend(value: Any) -> str:
    if value not in BAN_BACKENDS:
        raise _Invalid(f"expected one of {', '.join(BAN_BACKENDS)}, got {_show(value)}")
    return str(value)


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
        raise _Invalid(f"expected a number of at least 1, got {_show(value)}")
    return float(value)


def _ports(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536 for v in value):
        raise _Invalid(f"expected a list of TCP ports (1-65535), got {_show(value)}")
    return tuple(value)


def _argv(value: Any) -> tuple[str, ...]:
    argv = _string_list(value)
    if argv and not argv[0].startswith("/"):
        raise _Invalid(f"the program must be an absolute path (no shell, no $PATH), "
                       f"got {_show(argv[0])}")
    return argv


def _exec_on(value: Any) -> tuple[str, ...]:
    changes = _string_list(value)
    for c in changes:
        if c not in EXEC_CHANGES:
            raise _Invalid(f"{_show(c)}: expected some of {', '.join(EXEC_CHANGES)}")
    return changes


def _actions_for(verdict: str) -> Callable[[Any], tuple[str, ...]]:
    def check(value: Any) -> tuple[str, ...]:
        names = _string_list(value)
        for name in names:
            if name == "ban" and verdict != "concentrated":
                raise _Invalid(f"{verdict} incidents are never banned: only a flood from a few "
                               "networks (concentrated) is")
            if BUILTIN_ACTIONS.get(name) is False:
                raise _Invalid(f"{_show(name)} is not run per incident (it has its own "
                               f"[actions.{name}] section)")
        # any other name may be a plugin: it is looked up among the entry points when the
        # service starts and by `check-config` (registry.resolve_policy)
        return names
    return check


def _notify_urls(value: Any) -> tuple[str, ...]:
    urls = _string_list(value)
    for url in urls:
        if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url):
            raise _Invalid(f"{_show(url)} is not an apprise URL (scheme://...)")
    return urls


def _listen(value: Any) -> tuple[str, int] | None:
    if not isinstance(value, str):
        raise _Invalid(f'expected "host:port" or "", got {_show(value)}')
    if not value:
        return None
    m = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d{1,5})", value)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise _Invalid(f'expected "host:port" such as "127.0.0.1:9851", got {_show(value)}')
    host = m.group(1) or "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise _Invalid(f"{_show(host)} is not an IP address to listen on") from exc
    return host, int(m.group(2))


_DEFAULTS = Thresholds()

# section -> key -> (validator, default). The keys of the interface contract (DESIGN.md).
_SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "storage": {"url": (_url, "")},
    "sources": {"journald": (_auto, "auto"), "files": (_files, []), "kmsg": (_auto, "auto")},
    "watch": {"netns": (_netns, "")},
    "incident": {"quiet_period": (_duration, "60s"), "probe_interval": (_duration, "1s"),
                 "open_rate": (_int_in(1, 10_000_000), _DEFAULTS.open_rate),
                 "accounting": (_auto, "auto"), "sampler": (_auto, "auto"),
                 "half_open_for": (_duration, "10s"),
                 "half_open_min": (_int_in(1, 65535), _DEFAULTS.half_open_min),
                 "verdict_window": (_duration, "10s")},
    "verdict": {"capacity_completion": (_fraction, _DEFAULTS.capacity_completion),
                "spoofed_completion": (_fraction, _DEFAULTS.spoofed_completion),
                "concentrated_prefixes": (_int_in(1, 64), _DEFAULTS.concentrated_prefixes),
                "concentrated_share": (_fraction, _DEFAULTS.concentrated_share),
                "spoofed_min_prefixes": (_int_in(2, 65536), _DEFAULTS.spoofed_min_prefixes),
                "ipv4_prefix": (_int_in(8, 32), _DEFAULTS.ipv4_prefix),
                "ipv6_prefix": (_int_in(16, 128), _DEFAULTS.ipv6_prefix)},
    "allowlist": {"networks": (_networks, [])},
    # a dry run unless the file says otherwise: a minimal /etc/synwatch/synwatch.toml must not
    # change sysctls and the firewall (the embedded default says so too)
    "actions": {"dry_run": (_bool, True)},
    "actions.policy": {v: (_actions_for(v), DEFAULT_POLICY[v]) for v in VERDICTS},
    "actions.syncookies": {"enabled": (_bool, True)},
    "actions.ban": {"enabled": (_bool, True), "backend": (_backend, "nftables"),
                    "duration": (_duration, "1h"), "increment": (_positive, 2.0),
                    "max_duration": (_duration, "7d"),
                    "max_per_incident": (_int_in(1, 4096), 8),
                    "max_total": (_int_in(1, 1_000_000), 256),
                    "min_share": (_fraction, 0.05),
                    "widest_v4": (_int_in(8, 32), _DEFAULTS.widest_v4),
                    "widest_v6": (_int_in(16, 128), _DEFAULTS.widest_v6)},
    "actions.ratelimit": {"enabled": (_bool, False), "rate": (_int_in(1, 1_000_000), 100),
                          "burst": (_int_in(1, 1_000_000), 50), "hold": (_duration, "5m"),
                          "ports": (_ports, [])},
    "actions.notify": {"enabled": (_bool, False), "urls": (_notify_urls, []),
                       "interval": (_duration, "10m"), "timeout": (_duration, "10s"),
                       "retry": (_duration, "30s"), "attempts": (_int_in(1, 100), 5)},
    "actions.exec": {"enabled": (_bool, False), "argv": (_argv, []),
                     "on": (_exec_on, list(EXEC_CHANGES)), "timeout": (_duration, "30s")},
    "metrics": {"listen": (_listen, "")},
}


def _flatten(doc: dict[str, Any], path: str) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} with nested tables as dotted sections; unknown names are errors."""
    out: dict[str, dict[str, Any]] = {}

    def walk(table: dict[str, Any], prefix: str) -> None:
        for key, value in table.items():
            dotted = f"{prefix}.{key}" if prefix else key
            if dotted in _SCHEMA:
                if not isinstance(value, dict):
                    raise ConfigError(path, dotted,
                                      f"must be a table ([{dotted}]), got {_show(value)}")
                walk(value, dotted)
            elif prefix in _SCHEMA and key in _SCHEMA[prefix]:
                out.setdefault(prefix, {})[key] = value
            elif not prefix and key not in _SCHEMA:
                raise ConfigError(path, key, "unknown section"
                                  f" (known: {', '.join(s for s in _SCHEMA if '.' not in s)})")
            else:
                known = ", ".join(_SCHEMA.get(prefix, {})) or "none"
                raise ConfigError(path, dotted, f"unknown key (known in [{prefix}]: {known})")

    walk(doc, "")
    return out


def default_storage_url() -> str:
    """Root keeps its history in /var/lib/synwatch; anyone else in their XDG state dir."""
    if os.geteuid() == 0:
        return "sqlite:////var/lib/synwatch/synwatch.db"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return f"sqlite:///{state}/synwatch/synwatch.db"


def _section(values: dict[str, Any], section: str) -> dict[str, Any]:
    return {k: values[f"{section}.{k}"] for k in _SCHEMA[section]}


def parse_config(text: str, path: str) -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, None, f"not valid TOML: {exc}") from exc
    given = _flatten(doc, path)
    values: dict[str, Any] = {}
    for section, keys in _SCHEMA.items():
        for key, (validate, default) in keys.items():
            raw = given.get(section, {}).get(key, default)
            try:
                values[f"{section}.{key}"] = validate(raw)
            except _Invalid as exc:
                raise ConfigError(path, f"{section}.{key}", str(exc)) from None
    v = values
    if v["sources.journald"] is True and v["sources.kmsg"] is True:
        raise ConfigError(path, "sources.kmsg", "is true while sources.journald is true: journald "
                          "already carries every kernel line, so each would be recorded twice "
                          '(use "auto", which takes kmsg only where there is no journal)')
    if v["incident.probe_interval"] < 0.1:
        raise ConfigError(path, "incident.probe_interval",
                          "must be at least 0.1s (probing reads every socket of the namespace)")
    if v["actions.notify.enabled"] and not v["actions.notify.urls"]:
        raise ConfigError(path, "actions.notify.urls", "is empty while notify is enabled")
    if v["actions.exec.enabled"] and not v["actions.exec.argv"]:
        raise ConfigError(path, "actions.exec.argv", "is empty while exec is enabled")
    if v["actions.ban.max_duration"] < v["actions.ban.duration"]:
        raise ConfigError(path, "actions.ban.max_duration",
                          "must not be shorter than actions.ban.duration")
    if v["verdict.spoofed_completion"] > v["verdict.capacity_completion"]:
        raise ConfigError(path, "verdict.spoofed_completion",
                          f"must not exceed verdict.capacity_completion "
                          f"({v['verdict.capacity_completion']})")
    return Config(
        path=path,
        storage_url=v["storage.url"] or default_storage_url(),
        journald=v["sources.journald"], files=v["sources.files"], kmsg=v["sources.kmsg"],
        netns=v["watch.netns"], quiet_period=v["incident.quiet_period"],
        probe_interval=v["incident.probe_interval"], accounting=v["incident.accounting"],
        sampler=v["incident.sampler"],
        thresholds=Thresholds(open_rate=v["incident.open_rate"],
                              half_open_min=v["incident.half_open_min"],
                              half_open_for=v["incident.half_open_for"],
                              verdict_window=v["incident.verdict_window"],
                              widest_v4=v["actions.ban.widest_v4"],
                              widest_v6=v["actions.ban.widest_v6"],
                              **{k: v[f"verdict.{k}"] for k in _SCHEMA["verdict"]}),
        allowlist=v["allowlist.networks"], dry_run=v["actions.dry_run"],
        syncookies_enabled=v["actions.syncookies.enabled"],
        policy={verdict: v[f"actions.policy.{verdict}"] for verdict in VERDICTS},
        ban=BanSettings(**_section(v, "actions.ban")),
        ratelimit=RatelimitSettings(**_section(v, "actions.ratelimit")),
        notify=NotifySettings(**_section(v, "actions.notify")),
        exec=ExecSettings(**_section(v, "actions.exec")),
        metrics_listen=v["metrics.listen"],
    )


def embedded_default_text() -> str:
    here = Path(__file__).resolve().parent
    for candidate in (here / "default.toml", here.parent / "packaging" / "synwatch.toml"):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    raise ConfigError(EMBEDDED, None, f"missing from the installation (looked next to {here})")


def config_location(explicit: str | None) -> str | None:
    """The file to read: --config, else $SYNWATCH_CONFIG, else /etc/..., else None (embedded)."""
    if explicit:
        return explicit
    env = os.environ.get("SYNWATCH_CONFIG")
    if env:
        return env
    return str(SYSTEM_CONFIG) if SYSTEM_CONFIG.is_file() else None


def load_config(explicit: str | None = None) -> Config:
    path = config_location(explicit)
    if path is None:
        return parse_config(embedded_default_text(), EMBEDDED)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, None, exc.strerror or str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not UTF-8 text: {exc}") from exc
    return parse_config(text, path)
