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
    events = store.events(since=args.since, limit=args.limit,
                          host=chosen_host(args, host)) if store else []
    where = store.namespaces_of([e.incident_id for e in events
                                 if e.incident_id is not None]) if store else {}
    rows = [event_view(e, where.get(e.incident_id) if e.incident_id is not None else None)
            for e in events]
    if args.format == "json":
        print(dumps(rows))
    else:
        table(rows, ["id", "time", "source", "trusted", "kind", "family", "address", "port",
                     "mode", "source_ip", "incident_id", "netns"], sys.stdout,
              headers=["id", "time", "source", "trusted", "kind", "fam", "address", "port",
                       "mode", "source_ip", "incident", "netns"])
    return 0


def register(sub: Any) -> None:
    events = group(sub, "events", "recorded kernel events")
    p = command(events, "list", cmd_events_list, "list recorded kernel events, oldest first")
    p.add_argument("--since", type=since, metavar="DUR", help="only the last DUR (e.g. 1h)")
    p.add_argument("--limit", type=positive, metavar="N", help="only the newest N")
    add_hosts(p)
    add_format(p)
    add_config(p)
