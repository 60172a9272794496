"""`synwatch bans list` and `synwatch unban`."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from typing import Any

from synwatch.cli.common import (
    add_config,
    add_format,
    add_hosts,
    chosen_host,
    command,
    existing_store,
    group,
    load,
    open_history,
)
from synwatch.errors import NotFound


def cmd_bans_list(args: argparse.Namespace) -> int:
    from synwatch.actions.banproof import enforced  # noqa: PLC0415
    from synwatch.cli.render import dumps, table  # noqa: PLC0415
    from synwatch.cli.views import ban_view  # noqa: PLC0415

    now = datetime.now(timezone.utc)
    store, this = open_history(args)
    host = chosen_host(args, this)
    checks = store.ban_checks(host=host) if store else {}
    rows = [ban_view(b, now, enforced(b, checks, now))
            for b in (store.bans(host=host) if store else [])]
    if args.format == "json":
        print(dumps(rows))
    else:
        table(rows, [*(["host"] if args.all_hosts else []), "prefix", "backend", "scope",
                     "incident_id", "created_at", "expires_at", "active", "enforced"],
              sys.stdout)
    return 0


def cmd_unban(args: argparse.Namespace) -> int:
    from synwatch.actions.unban import unban  # noqa: PLC0415

    config = load(args)
    store = existing_store(config, write=True)
    if store is None:
        raise NotFound(f"unban {args.prefix}", "no history yet, so no ban of synwatch's to lift "
                       f"({config.storage_url})")
    for done in unban(config, store, args.prefix, datetime.now(timezone.utc)):
        ban = done.ban
        print(f"unbanned {ban.prefix} ({ban.backend}, incident {ban.incident_id})")
        if done.kept:
            print(f"  {args.prefix} was inside it; the rest stays banned until "
                  f"{ban.expires_at.isoformat()}: {', '.join(done.kept)}")
        if args.verbose:
            print(done.rendered)
    return 0


def register(sub: Any) -> None:
    bans = group(sub, "bans", "bans")
    p = command(bans, "list", cmd_bans_list, "list bans with their expiry")
    add_hosts(p)
    add_format(p)
    add_config(p)
    p = command(sub, "unban", cmd_unban, "lift the active bans covering a prefix or an address")
    p.add_argument("prefix", metavar="PREFIX")
    p.add_argument("-v", "--verbose", action="store_true", help="print the commands run")
    add_config(p)
