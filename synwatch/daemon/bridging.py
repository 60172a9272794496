"""Where a watched container's bans go (``[actions.ban] bridged``), and the tables left on the
host's path to containers that went.

A bridged container's bans go in a table of its own in the namespace of its bridge (the preset
``nftables-path``; synwatch/system/bridgepath.py finds the namespace). Its address may be the
next container's once it goes, so the table goes with it: when the watch set finds it gone (at
its next look, within 10 s), at the next start when it went while synwatch was down, and before
a new container's table is made under its name or on its reused inode; the bans the history
holds for it end then too, so none is put back into another container. The history remembers
each table under the container's name (the setting ``ban.path``: the container's namespace and
runtime id, the bridge's namespace, the table); a removal that fails keeps it, to be tried again
at the next start (and by the package's removal). A dry run says what it would remove.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

from synwatch.actions.ban import PATH_PRESET
from synwatch.actions.firewall import Firewall
from synwatch.actions.presets import load_presets
from synwatch.config import Config
from synwatch.daemon.watched import Watched
from synwatch.errors import CommandError, StoreError
from synwatch.store.api import ServiceStore
from synwatch.system.bridgepath import (
    SETTING,
    BridgePath,
    find_path,
    record,
    recorded,
    same_container,
)
from synwatch.system.netnsfind import FoundNamespace
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
              seen: Iterable[FoundNamespace], now: datetime, *, dry_run: bool) -> None:
    """Remember the table made for ``w`` (before its responder starts). What the history holds
    under its name for another namespace (its container replaced while synwatch was down), and
    a table of this name left by one gone unremembered (its inode reused), go first."""
    saved = store.saved_setting(w.name, PATH_SETTING)
    if saved is None or not same_container(saved, w.found):
        if saved is not None:
            drop_path(w.name, saved, seen, dry_run=dry_run)
        teardown(path.netns, path.table, f"netns {w.name}: a table of its name left by a "
                 "namespace gone before it", dry_run=dry_run)
        end_bans(store, w.name, now, PATH_PRESET)
    store.save_setting(w.name, PATH_SETTING, record(w.found, path), now)


def teardown(where: str, table: str, why: str, *, dry_run: bool) -> bool:
    """Remove table ``table`` in namespace ``where`` if it is there, rendered and logged first;
    False when it may still be there (a failure, a dry run)."""
    commands = Firewall(load_presets()[PATH_PRESET], where,
                        values=(("table", table),)).render_teardown()
    log.info("%s; removing its bans on the host's path to it%s:\n%s", why,
             " [dry run: not done]" if dry_run else "", show(commands))
    if dry_run:
        return False
    try:
        execute(commands, where)
    except CommandError as exc:
        log.warning("%s: could not remove table inet %s (tried again at the next start): %s",
                    why, table, exc)
        return False
    return True


def drop_path(name: str, saved: str, seen: Iterable[FoundNamespace], *, dry_run: bool) -> bool:
    """Remove a table remembered for ``name`` where its bridge's namespace still is; True
    when it is gone (or went with that namespace), False to keep remembering it."""
    place = recorded(saved, seen)
    if place is None:
        return True  # its namespace went (a reboot, dockerd's own namespace): the table with it
    found, table = place
    return teardown(found.name, table, f"netns {name}: gone", dry_run=dry_run)


def end_bans(store: ServiceStore, name: str, now: datetime, backend: str | None = None) -> None:
    """The history's active bans of namespace ``name`` (of ``backend``) ended: what they
    guarded went, and none may be put back into what holds the name now."""
    try:
        ended = [b.id for b in store.active_bans(name, now, backend) if b.id is not None]
    except StoreError as exc:  # away, never read: its reconcile cannot run either
        log.warning("netns %s: cannot end its bans in the history: %s", name, exc.why)
        return
    if ended:
        log.info("netns %s: ending its %d ban%s in the history", name, len(ended),
                 "s" if len(ended) != 1 else "")
        store.mark_removed(ended, now)


def drop_stale(store: ServiceStore, seen: list[FoundNamespace], now: datetime, *,
               dry_run: bool) -> None:
    """What the history holds for namespaces gone while synwatch was down: their settings
    forgotten, their bans ended, their tables on the path to them removed."""
    live = {f.name: f for f in seen}
    for where, name, value in store.saved_settings():
        if where and name == PATH_SETTING and not same_container(value, live.get(where)):
            if drop_path(where, value, seen, dry_run=dry_run):
                store.forget_setting(where, name)
            end_bans(store, where, now, PATH_PRESET)
        elif where and where not in live:
            log.info("netns %s: gone; forgetting its %s", where, name)
            store.forget_setting(where, name)
    for where in {b.netns for b in store.active_bans(None, now)}:
        if where and where not in live:
            end_bans(store, where, now)
