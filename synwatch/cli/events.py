"""`synwatch events list`: the recorded kernel events."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from synwatch.cli.common import (
    add_config,
    add_format,
    add_hosts,
    chosen_host,
    command,
    group,
    open_history,
    positive,
    since,
)


def cmd_events_list(args: argparse.Namespace) -> int:
    from synwatch.cli.render import dumps, table  # noqa: PLC0415
    from synwatch.cli.views import event_view  # noqa: PLC0415

    store, host = open_history(args)
    rows = [event_view(e) for e in (store.events(since=args.since, limit=args.limit,
                                                 host=chosen_host(args, host))
                                    if store else [])]
    if args.format == "json":
        print(dumps(rows))
    else:
        table(rows, ["id", "time", "source", "trusted", "kind", "family", "address", "port",
                     "mode", "source_ip", "incident_id"], sys.stdout,
              headers=["id", "time", "source", "trusted", "kind", "fam", "address", "port",
                       "mode", "source_ip", "incident"])
    return 0


def register(sub: Any) -> None:
    events = group(sub, "events", "recorded kernel events")
    p = command(events, "list", cmd_events_list, "list recorded kernel events, oldest first")
    p.add_argument("--since", type=since, metavar="DUR", help="only the last DUR (e.g. 1h)")
    p.add_argument("--limit", type=positive, metavar="N", help="only the newest N")
    add_hosts(p)
    add_format(p)
    add_config(p)
