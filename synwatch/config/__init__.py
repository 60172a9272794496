"""The one reader of synwatch.toml: strict parse, defaults, validation; no I/O beyond the file
and the password file it may name (``storage.password_file``, read after parsing).

Unknown sections and keys are errors, and every error names its key:
``synwatch: config /etc/synwatch/synwatch.toml: incident.quiet_period: expected a duration ...``.
Whether the machine can do what the config asks (is there a journal? nft?) is checked elsewhere.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from synwatch.config.schema import SCHEMA, SECTION_HELP, Setting
from synwatch.config.types import (
    BAN_BACKENDS,
    BUILTIN_ACTIONS,
    DEFAULT_POLICY,
    EXEC_CHANGES,
    VERDICTS,
    Auto,
    BanSettings,
    Config,
    ExecSettings,
    Network,
    NotifySettings,
    RatelimitSettings,
    StorageSettings,
    SynproxySettings,
    Thresholds,
)
from synwatch.config.urls import has_password, is_sqlite, with_password
from synwatch.config.validators import IPSET_MAX_TIMEOUT, Invalid, shown
from synwatch.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["BAN_BACKENDS", "BUILTIN_ACTIONS", "DEFAULT_POLICY", "EMBEDDED", "EXEC_CHANGES",
           "SCHEMA", "SECTION_HELP", "SYSTEM_CONFIG", "VERDICTS", "Auto", "BanSettings", "Config",
           "ExecSettings", "Network", "NotifySettings", "RatelimitSettings", "Setting",
           "StorageSettings", "SynproxySettings", "Thresholds", "config_location",
           "default_storage_url", "embedded_default_text", "load_config", "parse_config",
           "password_path", "sqlite_file", "state_dir"]

SYSTEM_CONFIG = Path("/etc/synwatch/synwatch.toml")
EMBEDDED = "<embedded default>"


def _flatten(doc: dict[str, Any], path: str) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} with nested tables as dotted sections; unknown names are errors."""
    out: dict[str, dict[str, Any]] = {}

    def walk(table: dict[str, Any], prefix: str) -> None:
        for key, value in table.items():
            dotted = f"{prefix}.{key}" if prefix else key
            if dotted in SCHEMA:
                if not isinstance(value, dict):
                    raise ConfigError(path, dotted,
                                      f"must be a table ([{dotted}]), got {shown(value)}")
                walk(value, dotted)
            elif prefix in SCHEMA and key in SCHEMA[prefix]:
                out.setdefault(prefix, {})[key] = value
            elif not prefix and key not in SCHEMA:
                raise ConfigError(path, key, "unknown section"
                                  f" (known: {', '.join(s for s in SCHEMA if '.' not in s)})")
            else:
                known = ", ".join(SCHEMA.get(prefix, {})) or "none"
                raise ConfigError(path, dotted, f"unknown key (known in [{prefix}]: {known})")

    walk(doc, "")
    return out


def default_storage_url() -> str:
    """Root keeps its history in /var/lib/synwatch; anyone else in their XDG state dir."""
    if os.geteuid() == 0:
        return "sqlite:////var/lib/synwatch/synwatch.db"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return f"sqlite:///{state}/synwatch/synwatch.db"


def state_dir(config: Config) -> Path:
    """Where the status file and the spool live: storage.state_dir, else next to an SQLite
    history, else /var/lib/synwatch (root) or the XDG state directory."""
    if config.storage.state_dir:
        return Path(config.storage.state_dir)
    db = sqlite_file(config.storage_url)
    if db is not None:
        return db.parent
    if os.geteuid() == 0:
        return Path("/var/lib/synwatch")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "synwatch"


def sqlite_file(url: str) -> Path | None:
    """The file of an SQLite ``storage.url`` (sqlite:////var/lib/synwatch/synwatch.db), or None
    for another database or one in memory; read without SQLAlchemy."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def nearest_existing(path: Path) -> Path | None:
    """The nearest directory above ``path`` that is there (or a file in its way): where a
    history file that is not there yet would be created, or what stops it."""
    return next((d for d in (path.parent, *path.parent.parents) if d.exists()), None)


def _section(values: dict[str, Any], section: str) -> dict[str, Any]:
    return {k: values[f"{section}.{k}"] for k in SCHEMA[section]}


def parse_config(text: str, path: str) -> Config:
    try:
        doc = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer of more than 4300 digits
        raise ConfigError(path, None, f"not valid TOML: {exc}") from exc
    except RecursionError:  # tomllib recurses into each nested array or inline table
        raise ConfigError(path, None, "not valid TOML: arrays or tables nested too "
                          "deeply") from None
    given = _flatten(doc, path)
    values: dict[str, Any] = {}
    for section, keys in SCHEMA.items():
        for key, setting in keys.items():
            raw = given.get(section, {}).get(key, setting.default)
            try:
                values[f"{section}.{key}"] = setting.validate(raw)
            except Invalid as exc:
                raise ConfigError(path, f"{section}.{key}", str(exc)) from None
    v = values
    if v["sources.journald"] is True and v["sources.kmsg"] is True:
        raise ConfigError(path, "sources.kmsg", "is true while sources.journald is true: journald "
                          "already carries every kernel line, so each would be recorded twice "
                          '(use "auto", which takes kmsg only where there is no journal)')
    if v["incident.probe_interval"] < 0.1:
        raise ConfigError(path, "incident.probe_interval",
                          "must be at least 0.1s (probing reads every socket of the namespace)")
    storage_url = v["storage.url"] or default_storage_url()
    if v["storage.password_file"]:
        if is_sqlite(storage_url):
            raise ConfigError(path, "storage.password_file",
                              f"storage.url is an SQLite history ({shown(storage_url)}"
                              f"{'' if v['storage.url'] else ', the default'}), which has no "
                              "password: a password file is for a database server "
                              "(postgresql+psycopg://USER@HOST/DB)")
        if has_password(storage_url):  # two passwords: which one would be meant?
            raise ConfigError(path, "storage.password_file",
                              "storage.url already has a password")
    if v["actions.notify.enabled"] and not v["actions.notify.urls"]:
        raise ConfigError(path, "actions.notify.urls", "is empty while notify is enabled")
    if v["actions.exec.enabled"] and not v["actions.exec.argv"]:
        raise ConfigError(path, "actions.exec.argv", "is empty while exec is enabled")
    if v["actions.ban.max_duration"] < v["actions.ban.duration"]:
        raise ConfigError(path, "actions.ban.max_duration",
                          "must not be shorter than actions.ban.duration")
    if (v["actions.ban.backend"] == "iptables-ipset"
            and v["actions.ban.max_duration"] > IPSET_MAX_TIMEOUT):
        raise ConfigError(path, "actions.ban.max_duration",
                          f"must be at most {IPSET_MAX_TIMEOUT}s (24.8 days) with the "
                          "iptables-ipset backend: ipset refuses a longer timeout")
    if v["verdict.spoofed_completion"] > v["verdict.capacity_completion"]:
        raise ConfigError(path, "verdict.spoofed_completion",
                          f"must not exceed verdict.capacity_completion "
                          f"({v['verdict.capacity_completion']})")
    return Config(
        path=path,
        storage_url=storage_url,
        journald=v["sources.journald"], files=v["sources.files"], kmsg=v["sources.kmsg"],
        netns=v["watch.netns"] if isinstance(v["watch.netns"], str) else "",
        netns_globs=() if isinstance(v["watch.netns"], str) else v["watch.netns"],
        quiet_period=v["incident.quiet_period"],
        probe_interval=v["incident.probe_interval"], accounting=v["incident.accounting"],
        sampler=v["incident.sampler"],
        thresholds=Thresholds(open_rate=v["incident.open_rate"],
                              half_open_min=v["incident.half_open_min"],
                              half_open_for=v["incident.half_open_for"],
                              verdict_window=v["incident.verdict_window"],
                              widest_v4=v["actions.ban.widest_v4"],
                              widest_v6=v["actions.ban.widest_v6"],
                              ban_floor=v["actions.ban.min_share"],
                              ban_coverage=v["actions.ban.coverage"],
                              **{k: v[f"verdict.{k}"] for k in SCHEMA["verdict"]}),
        allowlist=v["allowlist.networks"], dry_run=v["actions.dry_run"],
        syncookies_enabled=v["actions.syncookies.enabled"],
        policy={verdict: v[f"actions.policy.{verdict}"] for verdict in VERDICTS},
        ban=BanSettings(**_section(v, "actions.ban")),
        ratelimit=RatelimitSettings(**_section(v, "actions.ratelimit")),
        notify=NotifySettings(**_section(v, "actions.notify")),
        exec=ExecSettings(**_section(v, "actions.exec")),
        metrics_listen=v["metrics.listen"],
        synproxy=SynproxySettings(enabled=v["actions.synproxy.enabled"]),
        storage=StorageSettings(host=v["storage.host"] or socket.gethostname(),
                                password_file=v["storage.password_file"],
                                state_dir=v["storage.state_dir"],
                                spool_max=v["storage.spool_max"],
                                keep_events=v["storage.retention.events"],
                                keep_incidents=v["storage.retention.incidents"]),
    )


def embedded_default_text() -> str:
    here = Path(__file__).resolve().parent.parent  # the synwatch package
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


def password_path(name: str, config_path: str) -> Path:
    """Where ``storage.password_file`` is: a relative name is a systemd credential when the
    service manager passed some ($CREDENTIALS_DIRECTORY, set with LoadCredential=:
    https://systemd.io/CREDENTIALS/), else a file beside the configuration."""
    file = Path(name)
    if file.is_absolute():
        return file
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    return (Path(credentials) if credentials else Path(config_path).absolute().parent) / file


def _read_password(config: Config) -> Config:
    """The configuration with the password of ``storage.password_file`` in its storage.url
    (the parser has checked that the URL is a server's and has none of its own)."""
    key = "storage.password_file"
    file = password_path(config.storage.password_file, config.path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(config.path, key, f"cannot read {file}: "
                          f"{exc.strerror or exc}") from exc
    except UnicodeDecodeError:  # not chained: its message quotes a byte of the file
        raise ConfigError(config.path, key, f"{file} is not UTF-8 text") from None
    lines = text.splitlines()
    password = lines[0].strip() if lines else ""
    if not password:
        raise ConfigError(config.path, key, f"{file} is empty: the password is its first line")
    return replace(config, storage_url=with_password(config.storage_url, password),
                   storage=replace(config.storage, password_file=str(file)))


def load_config(explicit: str | None = None) -> Config:
    """Read and parse the file; then the one other file it names, the password's (parsing
    stays pure: parse_config reads nothing)."""
    path = config_location(explicit)
    if path is None:
        return parse_config(embedded_default_text(), EMBEDDED)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, None, exc.strerror or str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not UTF-8 text: {exc}") from exc
    config = parse_config(text, path)
    return _read_password(config) if config.storage.password_file else config
