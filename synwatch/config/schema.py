"""The settings schema: every key with its validator, default and help text. Parsing
(synwatch/config/__init__.py) applies it; scripts/settings_docs.py writes the key table of
docs/configuration.md and the default file from it. Validators are pure: no file, no import
of what they name."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from synwatch.config.types import (
    BAN_BACKENDS,
    BUILTIN_ACTIONS,
    DEFAULT_POLICY,
    EXEC_CHANGES,
    VERDICTS,
    Auto,
    Network,
    Thresholds,
)
from synwatch.config.urls import is_sqlite, masked, port_problem
from synwatch.durations import parse_duration


def _show(value: Any) -> str:
    """A value as it reads in TOML: "text", true, 3600, ["a", "b"]; cut short past 200
    characters (a message is one line), and never an error of its own."""
    try:
        shown = json.dumps(value, ensure_ascii=False, default=str)
    except (RecursionError, ValueError):
        return "a value nested too deeply"
    return shown if len(shown) <= 200 else f"{shown[:200]}... ({len(shown)} characters)"


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


# The longest duration a key takes unless it says otherwise: every duration ends in a timedelta,
# a monotonic deadline or a firewall timeout, and a year is far within what each of them holds
# (and beyond what any of these settings means). Keys with a tighter limit name it below.
LONGEST = "365d"
LONGEST_SECONDS = parse_duration(LONGEST)
# What the code holds, for the keys bounded by it rather than by sense:
IPSET_MAX_TIMEOUT = 2_147_483  # seconds: `ipset add ... timeout N` refuses more (24.8 days)
NFT_MAX_TIMEOUT = 99_999_999  # seconds: nft 1.0's parser refuses "100000000s" ("value too large")
POLL_MAX_TIMEOUT = 2_147_483  # seconds: subprocess.run(timeout=) polls in int milliseconds


def _duration(value: Any, least: str = "", most: str = LONGEST) -> float:
    """Seconds of a duration string, from more than 0 (or ``least``) to ``most``; never inf
    (a digit run too long for a float) or anything a timedelta cannot hold."""
    if not isinstance(value, str):
        raise _Invalid(f'expected a duration string like "90s" or "1h", got {_show(value)}')
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from exc
    if seconds <= 0:
        raise _Invalid(f"must be longer than 0, got {_show(value)}")
    if least and seconds < parse_duration(least):
        raise _Invalid(f"must be at least {least}, got {_show(value)}")
    if not seconds <= parse_duration(most):  # inf too
        raise _Invalid(f"must be at most {most}, got {_show(value)}")
    return seconds


def _duration_in(least: str, most: str) -> Callable[[Any], float]:
    """A duration key with limits of its own (``least`` "" = anything above 0)."""
    def check(value: Any) -> float:
        return _duration(value, least, most)
    return check


_upto_1h = _duration_in("", "1h")
_upto_1d = _duration_in("", "1d")  # exec.timeout: subprocess holds POLL_MAX_TIMEOUT at most
# a firewall timeout: whole seconds ("0s" would be no timeout at all: held forever), within
# NFT_MAX_TIMEOUT (and IPSET_MAX_TIMEOUT for that backend, checked with the backend)
_timeout = _duration_in("1s", LONGEST)


def _reconcile(value: Any) -> float:
    """How often the ban reconcile checks the kernel: from 1 s (tests) to an hour."""
    seconds = _duration(value)
    if not 1 <= seconds <= 3600:
        raise _Invalid(f"expected a duration from 1s to 1h, got {_show(value)}")
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
DIALECTS = ("sqlite://", "postgresql+psycopg://")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\+[A-Za-z0-9_]+)?://.*", re.DOTALL)


def _url(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    if value and not _URL.fullmatch(value):
        raise _Invalid(f"not an SQLAlchemy URL (e.g. sqlite:////var/lib/synwatch/"
                       f"synwatch.db): {_show(masked(value))}")
    if value and not value.startswith(DIALECTS):
        # the two histories that are built and tested; another SQLAlchemy dialect would load
        # and then fail on the first statement that is not portable
        raise _Invalid(f"synwatch keeps its history in SQLite (sqlite:///PATH) or PostgreSQL "
                       f"(postgresql+psycopg://USER@HOST/DB), not {_show(masked(value))}")
    if value.startswith("sqlite://") and value.removeprefix("sqlite:///").split("?", 1)[0] \
            in ("", ":memory:", value.split("?", 1)[0]):
        raise _Invalid(f"an SQLite history is a file, sqlite:///PATH (one in memory would keep "
                       f"nothing), not {_show(masked(value))}")
    if value and not is_sqlite(value) and (why := port_problem(value)) is not None:
        raise _Invalid(f"{why}: {_show(masked(value))}")
    return value


def _host(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 255 or not re.fullmatch(r"[^\x00-\x20\x7f]*",
                                                                          value):
        raise _Invalid(f"expected a host name (up to 255 characters, no spaces), got "
                       f"{_show(value)}")
    return value


def _host_globs(value: Any) -> tuple[str, ...]:
    names = _string_list(value)
    for name in names:
        if not name or len(name) > 255 or not re.fullmatch(r"[^\x00-\x20\x7f]*", name):
            raise _Invalid(f"expected host names or globs (up to 255 characters, no spaces), "
                           f"got {_show(name)}")
    return names


def _state_dir(value: Any) -> str:
    if not isinstance(value, str) or (value and not value.startswith("/")):
        raise _Invalid(f"expected an absolute path or \"\", got {_show(value)}")
    return value


def _password_file(value: Any) -> str:
    """A path, read by load_config (parsing touches no file); no control characters, which
    no file name an admin means has and open() refuses (NUL)."""
    if not isinstance(value, str) or not re.fullmatch(r"[^\x00-\x1f\x7f]*", value):
        raise _Invalid(f"expected a file path or \"\", got {_show(value)}")
    return value


def _keep(value: Any) -> float | None:
    """A retention: a duration, or "forever"."""
    if value == "forever":
        return None
    try:  # a century back from now is still a datetime; longer is "forever"
        return _duration(value, most="36500d")
    except _Invalid as exc:
        raise _Invalid(f'{exc} (or "forever")') from None


def _scope(value: Any) -> str:
    if value not in ("local", "fleet"):
        raise _Invalid(f'expected "local" or "fleet", got {_show(value)}')
    return str(value)


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


def _factor(value: Any) -> float:
    """A multiplier from 1 to 100 (TOML's inf and nan are floats: neither is one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 100:
        raise _Invalid(f"expected a number from 1 to 100, got {_show(value)}")
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
            if name in ("ban", "ratelimit") and verdict != "concentrated":
                raise _Invalid(f"{verdict} incidents are never banned or rate limited: only a "
                               "flood from a few networks (concentrated) is")
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


@dataclass(frozen=True, slots=True)
class Setting:
    """One key: how its value is checked, its default, and what it means (the key table of
    docs/configuration.md and the default file, packaging/synwatch.toml, are generated from these:
    `python scripts/settings_docs.py --write`, checked by tests/test_docs.py)."""

    validate: Callable[[Any], Any]
    default: Any
    help: str


def _s(validate: Callable[[Any], Any], default: Any, help_text: str) -> Setting:
    return Setting(validate, default, help_text)


_POLICY_HELP = {
    "capacity": "the actions a *capacity* incident runs",
    "concentrated": "... a *concentrated* one (the only verdict that may ban)",
    "spoofed": "... a *spoofed* one",
    "unknown": "... one with no verdict yet",
}

# section -> key -> Setting. The keys are an interface: scripts and tests outside rely on them.
SCHEMA: dict[str, dict[str, Setting]] = {
    "storage": {
        "url": _s(_url, "", '`sqlite:///PATH` or `postgresql+psycopg://...` (the two histories '
                  'synwatch is built and tested on); `""` = `/var/lib/synwatch/synwatch.db` (root) '
                  "or `$XDG_STATE_HOME/synwatch/synwatch.db` (`~/.local/state/...`); "
                  '`"postgresql+psycopg://user@db.example/synwatch"` shares one history '
                  "with a fleet"),
        "password_file": _s(_password_file, "", "a file whose first line is the database "
                            "password, put into `storage.url` (which then must have none; not "
                            "for SQLite); keep it readable by root only. A relative path is in "
                            "`$CREDENTIALS_DIRECTORY` when systemd sets it (`LoadCredential=`), "
                            'else in the configuration file\'s directory; `""` = none'),
        "host": _s(_host, "", 'this node\'s name in the history; `""` = the hostname (two '
                   "nodes on one machine need two names)"),
        "state_dir": _s(_state_dir, "", 'where the status file and the spool live; `""` = '
                        "next to an SQLite history, else `/var/lib/synwatch` (root) or "
                        "`$XDG_STATE_HOME/synwatch`"),
        "spool_max": _s(_int_in(100, 10_000_000), 100_000,
                        "records spooled while the history cannot be written (a database "
                        "server away; an SQLite file locked, full, read-only or deleted), "
                        "replayed in order when it can be; also at most 32 MiB. Past either, "
                        "kernel lines wait in their source and an incident's updates are "
                        "thinned; openings, closings, actions and bans are always kept"),
    },
    "storage.retention": {
        "events": _s(_keep, "90d", 'kernel events older than this are pruned; `"forever"` '
                     "keeps them"),
        "incidents": _s(_keep, "forever", "closed incidents (with their timelines and action "
                        "runs) older than this are pruned"),
    },
    "sources": {
        "journald": _s(_auto, "auto", '`"auto"` | `true` | `false`; auto = when journald runs '
                       "(`/run/systemd/journal/socket`) and has journal files"),
        "files": _s(_files, [], 'syslog files to follow, e.g. `["/var/log/syslog"]`; never '
                    "trusted (any user can write kernel-like lines to them)"),
        "kmsg": _s(_auto, "auto", "`/dev/kmsg`; auto = when there is no journal and it is "
                   "readable"),
    },
    "watch": {
        "netns": _s(_netns, "", 'an `ip netns` name to probe and act in; `""` = our own'),
    },
    "incident": {
        "quiet_period": _s(_duration, "60s", "an incident closes after this long without "
                           "kernel evidence"),
        "probe_interval": _s(_upto_1h, "1s", "how often counters, listeners and SYN-RECV "
                             "sockets are read (at least `0.1s`)"),
        "open_rate": _s(_int_in(1, 10_000_000), _DEFAULTS.open_rate,
                        "SYNs/s finding a full SYN queue, or accept-queue overflows/s, that open "
                        "an incident with no log line (the kernel logs once per socket)"),
        "accounting": _s(_auto, "auto", "count SYNs per source prefix and port in an nftables "
                         "set (`table inet synwatch`, chain `account`); auto = nft installed, "
                         "root, and `dry_run` off"),
        "sampler": _s(_auto, "auto", "sample inbound SYNs on a packet socket with a BPF filter "
                      "(1 in N, N following the rate; no firewall rule, works in dry run and "
                      "with `tcp_syncookies=2`); auto = when a packet socket can be opened (root "
                      "or `CAP_NET_RAW`); `true` warns when it cannot"),
        "half_open_min": _s(_int_in(1, 65535), _DEFAULTS.half_open_min,
                            "SYN-RECV at or above this (or a quarter of the backlog, if more) "
                            "..."),
        "half_open_for": _s(_upto_1d, "10s", "... for this long, with most requests never "
                            "completing, opens a `half_open` incident (a slow flood that never "
                            "overflows)"),
        "verdict_window": _s(_upto_1d, "10s", "the recent evidence a verdict follows; a "
                             "different confident verdict there starts a new phase"),
    },
    "verdict": {
        "capacity_completion": _s(_fraction, _DEFAULTS.capacity_completion,
                                  "share of overflowing SYNs that completed a handshake (SYN "
                                  "cookies received / sent) at or above which the load is real "
                                  "(*capacity*)"),
        "spoofed_completion": _s(_fraction, _DEFAULTS.spoofed_completion,
                                 "at or below this, with sources spread thin, the flood is "
                                 "*spoofed*"),
        "concentrated_prefixes": _s(_int_in(1, 64), _DEFAULTS.concentrated_prefixes,
                                    'how many prefixes "a few" is'),
        "concentrated_share": _s(_fraction, _DEFAULTS.concentrated_share,
                                 "share of SYNs those few must carry for *concentrated* (its "
                                 "lower 95% Wilson bound, from the sample size)"),
        "spoofed_min_prefixes": _s(_int_in(2, 65536), _DEFAULTS.spoofed_min_prefixes,
                                   'how many prefixes "spread thin" is (estimated from those '
                                   "sampled once and twice: Chao1)"),
        "ipv4_prefix": _s(_int_in(8, 32), _DEFAULTS.ipv4_prefix,
                          "prefix length of IPv4 sources (and of bans)"),
        "ipv6_prefix": _s(_int_in(16, 128), _DEFAULTS.ipv6_prefix,
                          "prefix length of IPv6 sources (and of bans)"),
    },
    "allowlist": {
        "networks": _s(_networks, [], "CIDRs never banned (loopback and our own addresses "
                       "never are)"),
    },
    "actions": {
        # a dry run unless the file says otherwise: a minimal /etc/synwatch/synwatch.toml must
        # not change sysctls and the firewall (the embedded default says so too)
        "dry_run": _s(_bool, True, "render and log actions, change nothing (also when the key "
                      "is missing); `run` warns when it is `false`"),
    },
    "actions.policy": {v: _s(_actions_for(v), DEFAULT_POLICY[v], _POLICY_HELP[v])
                       for v in VERDICTS},
    "actions.syncookies": {
        "enabled": _s(_bool, True, "keep `tcp_syncookies` >= 1 during an incident, restore "
                      "after"),
    },
    "actions.synproxy": {
        "enabled": _s(_bool, False, "opt-in, with `synproxy` in a verdict's policy (e.g. "
                      '`spoofed = ["synproxy", "notify", "exec"]`): while a *spoofed* flood '
                      "lasts on a host that tracks connections, SYNPROXY for its port (nftables "
                      "`notrack` + `synproxy`, "
                      "`nf_conntrack_tcp_loose=0`), removed when it ends"),
    },
    "actions.ban": {
        "enabled": _s(_bool, True, "ban source prefixes of *concentrated* incidents, only "
                      "from kernel-side evidence"),
        "backend": _s(_backend, "nftables", '`"nftables"` | `"ufw"` | `"iptables-ipset"` '
                      "(presets in `actions/`)"),
        "duration": _s(_timeout, "1h", "the first ban of a prefix"),
        "increment": _s(_factor, 2, "each later ban of the same prefix lasts this many times "
                        "longer ..."),
        "max_duration": _s(_timeout, "7d", "... up to this"),
        "max_per_incident": _s(_int_in(1, 4096), 8, "cap on prefixes banned for one incident"),
        "max_total": _s(_int_in(1, 1_000_000), 256, "cap on active bans"),
        "min_share": _s(_fraction, 0.05, "a block carrying less of the flood's SYNs on its "
                        "own is not banned (never a target for being among the busiest)"),
        "coverage": _s(_fraction, 0.95, "blocks are banned, busiest first, until they hold "
                       "this share of the flood's SYNs from sources that never complete a "
                       "handshake"),
        "widest_v4": _s(_int_in(8, 32), _DEFAULTS.widest_v4,
                        "IPv4 prefixes that fill a larger block (four /24s of a /22) are banned "
                        "as that block, never wider than this"),
        "widest_v6": _s(_int_in(16, 128), _DEFAULTS.widest_v6,
                        "the same for IPv6"),
        "scope": _s(_scope, "local", '`"fleet"`: a ban decided on one node is copied by '
                    "every node sharing the history (within seconds on PostgreSQL: "
                    "LISTEN/NOTIFY), each within its own allowlist, caps and "
                    "`max_duration`; `unban` on any node lifts it everywhere"),
        "fleet_from": _s(_host_globs, ["*"], "the nodes whose fleet bans this node copies: "
                         'names or globs (`["web*", "db1"]`) of `storage.host`; `["*"]` = every '
                         "node of the fleet, `[]` = none. Every row read is checked like a log "
                         "line (its prefix, times, host, scope) and every copy obeys this "
                         "node's own guards (allowlist, own addresses, `widest_v4`/`widest_v6`, "
                         "multicast, loopback, link-local, unspecified, reserved and "
                         "v4-mapped/compatible ranges, `max_total`, `max_per_incident`, "
                         "`max_duration`); a refusal is logged and counted "
                         "(`synwatch_fleet_refused_total`), not stored"),
        "reconcile": _s(_reconcile, "60s", "how often every active ban is checked in the "
                        "kernel (present, at its prefix length, with the time left the history "
                        "says) and a drifted one put back"),
    },
    "actions.ratelimit": {
        "enabled": _s(_bool, False, "opt-in per-source SYN rate limit (nftables)"),
        "rate": _s(_int_in(1, 1_000_000), 100, "new connections a minute from one address ..."),
        "burst": _s(_int_in(1, 1_000_000), 50, "... after a burst of this many (browsers open "
                    "~6 connections per site, crawlers a few dozen) ..."),
        "hold": _s(_timeout, "5m", "... above which its SYNs are dropped for this long"),
        "ports": _s(_ports, [], "TCP ports it applies to; `[]` = all"),
    },
    "actions.notify": {
        "enabled": _s(_bool, False, "send notifications"),
        "urls": _s(_notify_urls, [], "apprise URLs (`mailto://`, `json://`, `slack://`, "
                   "`tgram://`, ...)"),
        "interval": _s(_upto_1d, "10m", "at most one update per incident this often (besides "
                       "opened and closed)"),
        "timeout": _s(_upto_1h, "10s", "per message: a dead mail server cannot hold synwatch "
                      "longer"),
        "retry": _s(_upto_1d, "30s", "first retry of a failed message, doubling after"),
        # retry * 2**(attempts - 2) must stay a timedelta: 1d * 2**18 is 718 years
        "attempts": _s(_int_in(1, 20), 5, "tries per message"),
    },
    "actions.exec": {
        "enabled": _s(_bool, False, "run a program on incident changes"),
        "argv": _s(_argv, [], 'its argv, absolute path first, no shell (e.g. '
                   '`["/usr/local/bin/on-synflood"]`); run with `SYNWATCH_*` variables'),
        "on": _s(_exec_on, list(EXEC_CHANGES), "which changes run it"),
        "timeout": _s(_upto_1d, "30s", "after which it is killed and the run recorded as "
                      "failed"),
    },
    "metrics": {
        "listen": _s(_listen, "", '`"127.0.0.1:9851"` serves Prometheus text at `/metrics`; '
                     '`""` = off'),
    },
}

# What a section is about, above its keys in the default file.
SECTION_HELP = {
    "incident": "When an incident opens and closes, and what is read while it lasts.",
    "verdict": "How an incident is judged (docs/incidents.md): capacity, "
               "concentrated or spoofed.",
    "actions": "Actions are rendered and logged first; in a dry run that is all that happens.",
    "actions.policy": "What each verdict does (docs/actions.md). SYN cookies are not "
                      "chosen here: they are kept on during every incident. `ratelimit` "
                      "limits the addresses a concentrated flood shares with real users (NAT) "
                      "instead of banning them; [actions.ratelimit] enabled adds a standing "
                      "rule for every source. `synproxy` (opt-in, [actions.synproxy]) acts on "
                      "spoofed incidents only.",
}
