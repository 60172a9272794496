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
    events = store.events(since=args.since, limit=args.limit, host=chosen_host(args, host),
                          netns=args.netns) if store else []
    rows = [event_view(e) for e in events]
    if args.format == "json":  # the contract's keys: an event's namespace is its incident's
        print(dumps(rows))
    else:
        where = store.namespaces_of([e.incident_id for e in events
                                     if e.incident_id is not None]) if store else {}
        shown = [{**r, "netns": ("-" if r["incident_id"] is None else
                                 where.get(r["incident_id"]) or "host")} for r in rows]
        table(shown, ["id", "time", "source", "trusted", "kind", "family", "address", "port",
                      "mode", "source_ip", "incident_id", "netns"], sys.stdout,
              headers=["id", "time", "source", "trusted", "kind", "fam", "address", "port",
                       "mode", "source_ip", "incident", "netns"])
    return 0


def register(sub: Any) -> None:
    events = group(sub, "events", "recorded kernel events")
    p = command(events, "list", cmd_events_list, "list recorded kernel events, oldest first")
    p.add_argument("--since", type=since, metavar="DUR", help="only the last DUR (e.g. 1h)")
    p.add_argument("--limit", type=positive, metavar="N", help="only the newest N")
    p.add_argument("--netns", metavar="PATTERN",
                   help="only the events of incidents in the network namespaces whose names "
                        'match (a glob: "docker:*"; "" is the host\'s own)')
    add_hosts(p)
    add_format(p)
    add_config(p)
