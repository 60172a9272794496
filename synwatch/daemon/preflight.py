"""Can this machine run this configuration? The other half of `check-config`.

Parsing (config.py) says whether the file is well formed and touches nothing; this looks at the
machine, as CrowdSec's data sources answer ``CanRun()`` before they are started: is the
watched namespace there, which log sources will run, are the chosen actions installed, does
the ban backend's tool exist, can the history be opened. One ``Check`` per question, each
printed as one line; a failure makes `check-config` exit 2 (and `run` would fail the same way).
Nothing here writes: a history that does not exist yet is reported as "will be created".
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from synwatch.config import EMBEDDED, Config, nearest_existing, sqlite_file
from synwatch.config.urls import has_password, masked
from synwatch.errors import ConfigError, StaleSchema, StoreError, StoreOutage
from synwatch.system import netns

Outcome = Literal["ok", "warn", "fail"]

# The programs each ban backend runs (its preset's argv[0]s), and `ip` for `ip netns exec`.
BACKEND_TOOLS = {"nftables": ("nft",), "ufw": ("ufw",),
                 "iptables-ipset": ("ipset", "iptables", "ip6tables")}


@dataclass(frozen=True, slots=True)
class Check:
    outcome: Outcome
    subject: str  # the config key it is about
    text: str

    def line(self) -> str:
        return f"{self.outcome:<4}  {self.subject}: {self.text}"


def check_netns(config: Config) -> list[Check]:
    if not config.netns:
        return [Check("ok", "watch.netns", "the service's own namespace")]
    if not netns.exists(config.netns):
        # a watched namespace that is not there would leave every kernel line unattributable
        return [Check("fail", "watch.netns",
                      f'there is no network namespace "{config.netns}" (`ip netns list`)')]
    return [Check("ok", "watch.netns", f'"{config.netns}" exists')]


def check_sources(config: Config, kmsg_path: str = "/dev/kmsg") -> list[Check]:
    from synwatch.sources import plan_sources  # noqa: PLC0415
    from synwatch.sources.base import journal_reader  # noqa: PLC0415

    plans, skipped = plan_sources(config, kmsg_path)
    out = [Check("ok", f"sources.{p.name.split(':', 1)[0]}", f"{p.name}: {p.reason}")
           for p in plans if not p.name.startswith("file:")]
    if config.journald is True and journal_reader() is None:
        out.append(Check("fail", "sources.journald",
                         "true, but there is no systemd-python and no journalctl"))
    if config.kmsg is True and not os.access(kmsg_path, os.R_OK):
        out.append(Check("fail", "sources.kmsg", f"true, but {kmsg_path} is not readable"))
    for path in config.files:
        if os.access(path, os.R_OK):
            out.append(Check("ok", "sources.files", f"{path} is readable"))
        else:  # the file source waits for it (a log that is not written yet)
            out.append(Check("warn", "sources.files",
                             f"{path} is not there or not readable yet; followed once it is"))
    out += [Check("ok", "sources", f"not used: {why}") for why in skipped]
    if not plans:
        out.append(Check("fail", "sources", "no log source will run; only counters and "
                                             "sockets will be watched"))
    return out


def check_actions(config: Config,
                  which: Callable[[str], str | None] = shutil.which) -> list[Check]:
    from synwatch.actions.registry import resolve_policy  # noqa: PLC0415 - entry points

    try:
        resolve_policy(config)
    except ConfigError as exc:
        return [Check("fail", exc.key or "actions.policy", exc.reason)]
    chosen = sorted({name for names in config.policy.values() for name in names})
    out = [Check("ok", "actions.policy", f"installed: {', '.join(chosen) or 'none chosen'}")]
    in_policy = "synproxy" in chosen
    if config.synproxy.enabled != in_policy:  # it runs only with both
        out.append(Check("warn", "actions.synproxy.enabled",
                         "true, but no verdict's policy names synproxy (e.g. spoofed = "
                         '["synproxy", "notify", "exec"]): it will not run'
                         if config.synproxy.enabled else
                         "false, while a policy names synproxy: it will not run"))
    mode = "a dry run: nothing is changed" if config.dry_run else "live"
    out.append(Check("ok" if config.dry_run else "warn", "actions.dry_run", mode))
    if config.ban.enabled and "ban" in config.policy.get("concentrated", ()):
        missing = [t for t in BACKEND_TOOLS[config.ban.backend] if which(t) is None]
        if config.netns and which("ip") is None:
            missing.append("ip")
        if missing:
            # a dry run only renders, so it can run without them
            out.append(Check("warn" if config.dry_run else "fail", "actions.ban.backend",
                             f"{config.ban.backend} needs {', '.join(missing)}, which "
                             "is not installed"))
        else:
            out.append(Check("ok", "actions.ban.backend",
                             f"{config.ban.backend}: {', '.join(BACKEND_TOOLS[config.ban.backend])}"
                             " installed"))
    return out


def check_store(config: Config) -> list[Check]:
    """Opens the history read-only when it exists; never creates or migrates it."""
    from synwatch.store import History  # noqa: PLC0415

    shown = masked(config.storage_url)  # the userinfo's password and ?password= (libpq's)
    db = sqlite_file(config.storage_url)
    fleet = [Check("warn", "actions.ban.scope", "fleet bans with an SQLite history reach only "
                   "the nodes sharing this file (a fleet of servers shares PostgreSQL)")
             ] if config.ban.scope == "fleet" and db is not None else []
    if db is not None:
        if not db.exists():
            where = nearest_existing(db)
            if where is None or not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
                return [Check("fail", "storage.url",
                              f"{db} does not exist and {where or db.parent} is not writable")]
            return [Check("ok", "storage.url", f"{db} will be created (0600)"), *fleet]
        if not os.access(db, os.R_OK | os.W_OK):
            return [Check("fail", "storage.url", f"{db} is not readable and writable")]
    try:
        history = History.open(config.storage_url, host=config.host, write=False)
        try:
            revision = history.schema_revision()
        finally:
            history.close()
    except StoreOutage as exc:
        if db is not None:
            return [Check("fail", "storage.url", f"{shown}: {exc.why}")]
        # a database server that is down does not stop `run`: it starts on its spool
        return [Check("warn", "storage.url", f"{shown}: {exc.why}; `run` would start on its "
                      "spool and write it when the server answers"), *fleet]
    except StaleSchema as exc:
        return [Check("ok", "storage.url", f"{shown} opens; {exc.why}"), *fleet]
    except StoreError as exc:
        return [Check("fail", "storage.url", f"{shown}: {exc.why}")]
    node = "" if db is not None else f" (this node: {config.host})"
    made = "" if revision is not None else "; no history yet: `run` creates it"
    return [Check("ok", "storage.url", f"{shown} opens{node}{made}"), *fleet]


# apprise's generic HTTP notifiers: their path is the receiving server's own path (json://host/
# hooks/synwatch), not a token; every other scheme puts tokens there (slack://A/B/C, tgram://bot/
# chat, discord://id/token)
_HTTP_PATH_SCHEMES = frozenset({"json", "jsons", "xml", "xmls", "form", "forms"})
# the query keys apprise URLs carry credentials in (?pass=, ?token=, ?webhook=...)
_SECRET_KEYS = frozenset({"pass", "password", "token", "key", "apikey", "secret", "webhook"})


def _notify_secret(url: str) -> bool:
    """Does an apprise URL carry a credential: a password in its userinfo, a credential's query
    key, or (but for the generic HTTP schemes) anything in its path?"""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # unparseable: nothing says it holds no token, so assume it may
        return True
    keys = {k.lower() for k in parse_qs(parts.query)}
    return (bool(password) or bool(keys & _SECRET_KEYS)
            or (parts.scheme.lower() not in _HTTP_PATH_SCHEMES
                and any(parts.path.split("/"))))


def _exposed(path: str) -> str | None:
    """Who besides root can read ``path`` (others, or a group other than root's; the package
    installs its files 0640 root:root), and the fix; None when no one can, or it is gone."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    readers = []
    if st.st_mode & stat.S_IROTH:
        readers.append("every user")
    if st.st_mode & stat.S_IRGRP and st.st_gid != 0:
        try:
            readers.append(f"group {grp.getgrgid(st.st_gid).gr_name}")
        except KeyError:
            readers.append(f"group {st.st_gid}")
    if not readers:
        return None
    fix = (f"`chmod 640 {path}`" if st.st_gid == 0
           else f"`chmod 600 {path}` (or `chown root:root` and `chmod 640`)")
    return (f"{path} (mode {stat.S_IMODE(st.st_mode):04o}) is readable by "
            f"{' and '.join(readers)}: {fix}")


def check_secrets(config: Config) -> list[Check]:
    """A secret in a file others can read is theirs too: a database password opens the fleet's
    history, a notification token lets anyone post as synwatch. Warn, one line per key, when
    the file holding one is readable by other users; never print the secret. `check-config`
    prints these; `run` logs them once at its start."""
    out = []
    if config.path != EMBEDDED:
        # with a password file, the password in storage_url came from there, not this file
        if not config.storage.password_file and has_password(config.storage_url):
            exposed = _exposed(config.path)
            if exposed:
                out.append(Check("warn", "storage.url", f"holds a password, and {exposed}"))
        schemes = sorted({u.split("://", 1)[0] for u in config.notify.urls if _notify_secret(u)})
        exposed = _exposed(config.path) if schemes else None
        if exposed:
            out.append(Check("warn", "actions.notify.urls", "holds a password or token ("
                             f"{', '.join(s + '://' for s in schemes)}), and {exposed}"))
    if config.storage.password_file:
        exposed = _exposed(config.storage.password_file)
        if exposed:
            out.append(Check("warn", "storage.password_file", exposed))
    return out


def preflight(config: Config) -> list[Check]:
    return [*check_netns(config), *check_sources(config), *check_actions(config),
            *check_store(config), *check_secrets(config)]
