"""`synwatch status`: is the daemon running, since when, its sources, open incidents, active
bans, its last errors. It reads the status file the daemon keeps and the history, so it works
without the daemon; exit 3 when it is not running, as `systemctl status` does."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from synwatch.cli.common import add_config, add_format, command, load
from synwatch.config.urls import masked
from synwatch.errors import SynwatchError

if TYPE_CHECKING:
    from synwatch.config import Config

NOT_RUNNING = 3
RECENT = 120.0  # seconds: a node whose heartbeat is newer is "heard from recently"


def cmd_status(args: argparse.Namespace) -> int:
    from synwatch.cli.render import dumps, print_status  # noqa: PLC0415
    from synwatch.daemon.status import alive, read_status, status_path  # noqa: PLC0415

    config = load(args)
    found = read_status(status_path(config)) or {}
    running = alive(found.get("pid"))
    view: dict[str, Any] = {
        "running": running, "pid": found.get("pid") if running else None,
        "since": found.get("since") if running else None,
        "sources": found.get("sources", []) if running else [],
        "namespaces": found.get("namespaces", {}) if running else {},
        "open_incidents": [], "active_bans": 0, "bans_drift": 0, "bans_drift_at": None,
        "last_errors": found.get("last_errors", []),
        "summary": found.get("summary") if running else "not running",
        "host": config.host, "store": found.get("store"), "hosts": [],
        # other nodes' fleet bans this node refused since it started (synwatch/actions/fleetcopy.py)
        "fleet_refused": found.get("fleet_refused", 0) if running else 0,
    }
    try:
        _from_history(view, config)
    except SynwatchError as exc:
        view["last_errors"] = [*view["last_errors"], {"at": None, "what": str(exc)}]
    if args.format == "json":
        print(dumps(view))
    else:
        print_status(view, sys.stdout)
    return 0 if running else NOT_RUNNING


def _from_history(view: dict[str, Any], config: Config) -> None:
    """The open incidents, bans, drift and nodes, read from the history; a look, never a
    write: a history that is not there yet is not created here."""
    from synwatch.actions.banproof import drift_count  # noqa: PLC0415
    from synwatch.store import History  # noqa: PLC0415

    store = History.open_existing(config.storage_url, host=config.host)
    if store is None:
        view["store"] = (f"{masked(config.storage_url)} (no history yet: `synwatch run` "
                         "creates it)")
        return
    now = datetime.now(timezone.utc)
    view["store"] = store.display_url
    view["open_incidents"] = [i.id for i in store.incidents(status="open", host=config.host)]
    view["active_bans"] = len(store.active_bans(None if config.many_namespaces else config.netns,
                                                now))
    # bans the reconcile found not enforced in the kernel and put back (banproof.py)
    drift, drift_at = drift_count(store.ban_checks(config.host), config.host, config.netns)
    view["bans_drift"] = drift
    view["bans_drift_at"] = drift_at.isoformat(timespec="seconds") if drift_at else None
    view["hosts"] = [{"host": n.host, "seen_at": n.seen_at.isoformat(timespec="seconds"),
                      "recent": (now - n.seen_at).total_seconds() < RECENT}
                     for n in store.nodes()]
    store.close()


def register(sub: Any) -> None:
    p = command(sub, "status", cmd_status,
                "is the service running, its sources, open incidents, active bans, last errors "
                "(exit 3 when it is not running)")
    add_format(p)
    add_config(p)
