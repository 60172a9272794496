"""Where a watched container's bans go (``[actions.ban] bridged``), and the tables left on the
host's path to containers that went.

A bridged container's bans go in a table of its own in the namespace of its bridge (the preset
``nftables-path``; synwatch/system/bridgepath.py finds the namespace). That table outlives
nothing it guards: its container going (synwatch.actions.ban ``retire``) removes it at once, and
one left by a crash, or by a container replaced under the same name while synwatch was down, is
removed at the next start. The history remembers each table under the container's name (the
setting ``ban.path``) for that.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import datetime

from synwatch.actions.ban import PATH_PRESET
from synwatch.actions.firewall import Firewall
from synwatch.actions.presets import load_presets
from synwatch.config import Config
from synwatch.daemon.watched import Watched
from synwatch.errors import CommandError
from synwatch.store.api import ServiceStore
from synwatch.system.bridgepath import SETTING, BridgePath, find_path, record, recorded
from synwatch.system.netnsfind import FoundNamespace, ident_text
from synwatch.system.runner import execute, show

log = logging.getLogger("synwatch")
PATH_SETTING = SETTING


def bridge_path(w: Watched, config: Config,
                seen: Iterable[FoundNamespace]) -> BridgePath | None:
    """The path a namespace's bans go on, or None: they go inside it (not a container's or a
    process's watched among many, bans off, another backend, ``bridged = "inside"``, no
    bridge)."""
    c = config
    if not (c.many_namespaces and w.found.kind in ("container", "process")
            and c.ban.enabled and c.ban.backend == "nftables" and c.ban.bridged == "path"):
        return None
    try:
        path = find_path(w.name, w.found.ident[1], seen)
    except (CommandError, OSError, ValueError) as exc:
        log.warning("netns %s: cannot tell whether it is on a bridge (%s); its bans go inside "
                    "it", w.name, exc)
        return None
    if path is None:
        log.info("netns %s: on no bridge; its bans go inside it", w.name)
    else:
        log.info("netns %s: its bans go on the host's path to it: %s, toward %s (table inet %s)",
                 w.name, path.describe(),
                 ", ".join((*path.addresses4, *path.addresses6)), path.table)
    return path


def keep_path(store: ServiceStore, w: Watched, path: BridgePath,
              seen: Iterable[FoundNamespace], now: datetime) -> None:
    """Remember the table made for ``w``; one remembered under its name for another namespace
    (its container replaced while synwatch was down) is removed first."""
    value = record(w.found.ident, path)
    saved = store.saved_setting(w.name, PATH_SETTING)
    if saved is not None and saved != value:
        drop_path(w.name, saved, seen)
    store.save_setting(w.name, PATH_SETTING, value, now)


def stale_path(saved: str, live: FoundNamespace | None) -> bool:
    """Is the remembered table no longer its container's (that namespace went)?"""
    try:
        was = json.loads(saved).get("container")
    except (ValueError, AttributeError):
        return True
    return live is None or was != ident_text(live.ident)


def drop_path(name: str, saved: str, seen: Iterable[FoundNamespace]) -> None:
    """Remove a table remembered for ``name``, where its bridge's namespace still is (rendered
    and logged first); a failure is logged, and uninstall removes what is left."""
    place = recorded(saved, seen)
    if place is None:
        return  # its namespace went (a reboot, dockerd's own namespace): the table with it
    found, table = place
    commands = Firewall(load_presets()[PATH_PRESET], found.name,
                        values=(("table", table),)).render_teardown()
    log.info("netns %s: gone; removing its bans on the host's path to it:\n%s", name,
             show(commands))
    try:
        execute(commands, found.name)
    except CommandError as exc:
        log.warning("netns %s: could not remove table inet %s: %s", name, table, exc)


def drop_stale(store: ServiceStore, seen: list[FoundNamespace]) -> None:
    """The settings saved for namespaces gone while synwatch was down forgotten, and the tables
    remembered on the path to containers no longer there removed."""
    live = {f.name: f for f in seen}
    for where, name, value in store.saved_settings():
        if where and name == PATH_SETTING and stale_path(value, live.get(where)):
            drop_path(where, value, seen)
            store.forget_setting(where, name)
        elif where and where not in live:
            log.info("netns %s: gone; forgetting its %s", where, name)
            store.forget_setting(where, name)
