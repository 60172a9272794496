"""The validators of the settings schema (synwatch/config/schema.py): each takes a TOML value
and returns the setting's value or raises Invalid with why. Pure: no file, no import of what
they name."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
from collections.abc import Callable
from typing import Any

from synwatch.config.types import (
    BAN_BACKENDS,
    BUILTIN_ACTIONS,
    EXEC_CHANGES,
    Auto,
    Network,
)
from synwatch.config.urls import is_sqlite, masked, port_problem
from synwatch.durations import parse_duration


def shown(value: Any) -> str:
    """A value as it reads in TOML: "text", true, 3600, ["a", "b"]; cut short past 200
    characters (a message is one line), and never an error of its own."""
    try:
        shown = json.dumps(value, ensure_ascii=False, default=str)
    except (RecursionError, ValueError):
        return "a value nested too deeply"
    return shown if len(shown) <= 200 else f"{shown[:200]}... ({len(shown)} characters)"


class Invalid(ValueError):
    """A value is wrong; the caller adds the key and the file."""


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {shown(value)}")
    return value


def auto_or_bool(value: Any) -> Auto:
    if value == "auto" or isinstance(value, bool):
        return value  # type: ignore[no-any-return]
    raise Invalid(f'expected "auto", true or false, got {shown(value)}')


# The longest duration a key takes unless it says otherwise: every duration ends in a timedelta,
# a monotonic deadline or a firewall timeout, and a year is far within what each of them holds
# (and beyond what any of these settings means). Keys with a tighter limit name it below.
LONGEST = "365d"
LONGEST_SECONDS = parse_duration(LONGEST)
# What the code holds, for the keys bounded by it rather than by sense:
IPSET_MAX_TIMEOUT = 2_147_483  # seconds: `ipset add ... timeout N` refuses more (24.8 days)
NFT_MAX_TIMEOUT = 99_999_999  # seconds: nft 1.0's parser refuses "100000000s" ("value too large")
POLL_MAX_TIMEOUT = 2_147_483  # seconds: subprocess.run(timeout=) polls in int milliseconds


def duration(value: Any, least: str = "", most: str = LONGEST) -> float:
    """Seconds of a duration string, from more than 0 (or ``least``) to ``most``; never inf
    (a digit run too long for a float) or anything a timedelta cannot hold."""
    if not isinstance(value, str):
        raise Invalid(f'expected a duration string like "90s" or "1h", got {shown(value)}')
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from exc
    if seconds <= 0:
        raise Invalid(f"must be longer than 0, got {shown(value)}")
    if least and seconds < parse_duration(least):
        raise Invalid(f"must be at least {least}, got {shown(value)}")
    if not seconds <= parse_duration(most):  # inf too
        raise Invalid(f"must be at most {most}, got {shown(value)}")
    return seconds


def duration_in(least: str, most: str) -> Callable[[Any], float]:
    """A duration key with limits of its own (``least`` "" = anything above 0)."""
    def check(value: Any) -> float:
        return duration(value, least, most)
    return check


upto_1h = duration_in("", "1h")
upto_1d = duration_in("", "1d")  # exec.timeout: subprocess holds POLL_MAX_TIMEOUT at most
# a firewall timeout: whole seconds ("0s" would be no timeout at all: held forever), within
# NFT_MAX_TIMEOUT (and IPSET_MAX_TIMEOUT for that backend, checked with the backend)
ban_timeout = duration_in("1s", LONGEST)


def reconcile_period(value: Any) -> float:
    """How often the ban reconcile checks the kernel: from 1 s (tests) to an hour."""
    seconds = duration(value)
    if not 1 <= seconds <= 3600:
        raise Invalid(f"expected a duration from 1s to 1h, got {shown(value)}")
    return seconds


def int_in(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise Invalid(f"expected a whole number from {low} to {high}, got {shown(value)}")
        return value
    return check


def fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise Invalid(f"expected a fraction from 0 to 1 (0.8 = 80%), got {shown(value)}")
    return float(value)


def string_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid(f"expected a list of strings, got {shown(value)}")
    return tuple(value)


# SQLAlchemy's URL grammar starts "dialect[+driver]://" (sqlalchemy.engine.url._parse_url);
# whether the driver is installed and the database answers is the machine's question, asked by
# `check-config` and at the start, so parsing never imports SQLAlchemy.
DIALECTS = ("sqlite://", "postgresql+psycopg://")
URL_SHAPE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\+[A-Za-z0-9_]+)?://.*", re.DOTALL)


def storage_url(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {shown(value)}")
    if value and not URL_SHAPE.fullmatch(value):
        raise Invalid(f"not an SQLAlchemy URL (e.g. sqlite:////var/lib/synwatch/"
                      f"synwatch.db): {shown(masked(value))}")
    if value and not value.startswith(DIALECTS):
        # the two histories that are built and tested; another SQLAlchemy dialect would load
        # and then fail on the first statement that is not portable
        raise Invalid(f"synwatch keeps its history in SQLite (sqlite:///PATH) or PostgreSQL "
                      f"(postgresql+psycopg://USER@HOST/DB), not {shown(masked(value))}")
    if value.startswith("sqlite://") and value.removeprefix("sqlite:///").split("?", 1)[0] \
            in ("", ":memory:", value.split("?", 1)[0]):
        raise Invalid(f"an SQLite history is a file, sqlite:///PATH (one in memory would keep "
                      f"nothing), not {shown(masked(value))}")
    if value and not is_sqlite(value) and (why := port_problem(value)) is not None:
        raise Invalid(f"{why}: {shown(masked(value))}")
    return value


def host_name(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 255 or not re.fullmatch(r"[^\x00-\x20\x7f]*",
                                                                          value):
        raise Invalid(f"expected a host name (up to 255 characters, no spaces), got "
                      f"{shown(value)}")
    return value


def host_globs(value: Any) -> tuple[str, ...]:
    names = string_list(value)
    for name in names:
        if not name or len(name) > 255 or not re.fullmatch(r"[^\x00-\x20\x7f]*", name):
            raise Invalid(f"expected host names or globs (up to 255 characters, no spaces), "
                          f"got {shown(name)}")
    return names


def state_dir_path(value: Any) -> str:
    if not isinstance(value, str) or (value and not value.startswith("/")):
        raise Invalid(f"expected an absolute path or \"\", got {shown(value)}")
    return value


def password_file(value: Any) -> str:
    """A path, read by load_config (parsing touches no file); no control characters, which
    no file name an admin means has and open() refuses (NUL)."""
    if not isinstance(value, str) or not re.fullmatch(r"[^\x00-\x1f\x7f]*", value):
        raise Invalid(f"expected a file path or \"\", got {shown(value)}")
    return value


def keep_for(value: Any) -> float | None:
    """A retention: a duration, or "forever"."""
    if value == "forever":
        return None
    try:  # a century back from now is still a datetime; longer is "forever"
        return duration(value, most="36500d")
    except Invalid as exc:
        raise Invalid(f'{exc} (or "forever")') from None


def ban_scope(value: Any) -> str:
    if value not in ("local", "fleet"):
        raise Invalid(f'expected "local" or "fleet", got {shown(value)}')
    return str(value)


def ban_bridged(value: Any) -> str:
    if value not in ("path", "inside"):
        raise Invalid(f'expected "path" or "inside", got {shown(value)}')
    return str(value)


def log_files(value: Any) -> tuple[str, ...]:
    paths = string_list(value)
    for p in paths:
        if not p.startswith("/"):
            raise Invalid(f"{shown(p)} is not an absolute path")
    return paths


def netns_name(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a network namespace name, got {shown(value)}")
    # not "-x": `ip netns exec -x` would read it as an option
    if value and (value in (".", "..") or not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,254}",
                                                           value)):
        raise Invalid(f"{shown(value)} is not an `ip netns` name")
    return value


GLOB = re.compile(r"[][*?]")
NETNS_PATTERN = re.compile(r"[A-Za-z0-9_.:/*?#\[\]][A-Za-z0-9_.:/*?#\[\]-]{0,254}")


def netns_choice(value: Any) -> str | tuple[str, ...]:
    """One `ip netns` name (or "" for our own) as before, or the namespaces to follow as they
    come and go: "*" (every one), one of the names synwatch gives them ("docker:web1"), or a
    list of names and globs ("docker:web*", "k8s:shop/*", an `ip netns` name, "" for our
    own). Globs take ``*`` and ``?``."""
    if isinstance(value, str) and not GLOB.search(value) and not re.search(r"[:#]", value):
        return netns_name(value)  # an `ip netns` name: probed and acted in as before
    patterns = (value,) if isinstance(value, str) else string_list(value)
    if not patterns:
        raise Invalid('is an empty list: "" watches our own namespace, "*" every one')
    for p in patterns:
        if p and not NETNS_PATTERN.fullmatch(p):
            raise Invalid(f"{shown(p)} is neither a namespace name nor a glob of names")
    return patterns


def networks(value: Any) -> tuple[Network, ...]:
    out = []
    for text in string_list(value):
        try:
            out.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f" (did you mean {ipaddress.ip_network(text, strict=False)}?)"
            raise Invalid(f"{shown(text)} is not a CIDR network: {exc}{hint}") from exc
    return tuple(out)


def ban_backend(value: Any) -> str:
    if value not in BAN_BACKENDS:
        raise Invalid(f"expected one of {', '.join(BAN_BACKENDS)}, got {shown(value)}")
    return str(value)


def factor(value: Any) -> float:
    """A multiplier from 1 to 100 (TOML's inf and nan are floats: neither is one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 100:
        raise Invalid(f"expected a number from 1 to 100, got {shown(value)}")
    return float(value)


def ports(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536 for v in value):
        raise Invalid(f"expected a list of TCP ports (1-65535), got {shown(value)}")
    return tuple(value)


def argv(value: Any) -> tuple[str, ...]:
    given = string_list(value)
    if given and not given[0].startswith("/"):
        raise Invalid(f"the program must be an absolute path (no shell, no $PATH), "
                      f"got {shown(given[0])}")
    return given


def exec_on(value: Any) -> tuple[str, ...]:
    changes = string_list(value)
    for c in changes:
        if c not in EXEC_CHANGES:
            raise Invalid(f"{shown(c)}: expected some of {', '.join(EXEC_CHANGES)}")
    return changes


def actions_for(verdict: str) -> Callable[[Any], tuple[str, ...]]:
    def check(value: Any) -> tuple[str, ...]:
        names = string_list(value)
        for name in names:
            if name in ("ban", "ratelimit") and verdict != "concentrated":
                raise Invalid(f"{verdict} incidents are never banned or rate limited: only a "
                              "flood from a few networks (concentrated) is")
            if BUILTIN_ACTIONS.get(name) is False:
                raise Invalid(f"{shown(name)} is not run per incident (it has its own "
                              f"[actions.{name}] section)")
        # any other name may be a plugin: it is looked up among the entry points when the
        # service starts and by `check-config` (registry.resolve_policy)
        return names
    return check


def notify_urls(value: Any) -> tuple[str, ...]:
    urls = string_list(value)
    for url in urls:
        if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url):
            raise Invalid(f"{shown(url)} is not an apprise URL (scheme://...)")
    return urls


def listen_address(value: Any) -> tuple[str, int] | None:
    if not isinstance(value, str):
        raise Invalid(f'expected "host:port" or "", got {shown(value)}')
    if not value:
        return None
    m = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d{1,5})", value)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise Invalid(f'expected "host:port" such as "127.0.0.1:9851", got {shown(value)}')
    host = m.group(1) or "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise Invalid(f"{shown(host)} is not an IP address to listen on") from exc
    return host, int(m.group(2))
