"""`synwatch incidents list` and `incidents show`."""

from __future__ import annotations

import argparse
import sys
from typing import Any, get_args

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
    positive,
    since,
    tcp_port,
)
from synwatch.errors import NotFound
from synwatch.records import Verdict


def cmd_incidents_list(args: argparse.Namespace) -> int:
    from synwatch.cli.render import dumps, print_incident_rows  # noqa: PLC0415
    from synwatch.cli.views import incident_view  # noqa: PLC0415

    store, host = open_history(args)
    incidents = store.incidents(since=args.since, port=args.port, verdict=args.verdict,
                                limit=args.limit, host=chosen_host(args, host),
                                netns=args.netns) if store else []
    runs = store.actions_by_incident([i.id for i in incidents]) if store else {}
    rows = [incident_view(i, runs[i.id]) for i in incidents]
    if args.format == "json":
        print(dumps(rows))
    else:
        print_incident_rows(rows, sys.stdout, with_ids=True, with_hosts=args.all_hosts)
    return 0


def cmd_incidents_show(args: argparse.Namespace) -> int:
    from synwatch.cli.render import dumps, print_incident  # noqa: PLC0415
    from synwatch.cli.views import incident_view, sample_view  # noqa: PLC0415

    store = existing_store(load(args))
    if store is None:  # a look never creates the history
        raise NotFound(f"incident {args.id}", "no history yet: `synwatch run` creates it")
    incident, runs = store.incident(args.id)
    view = incident_view(incident, runs)
    samples = [sample_view(x) for x in store.samples(args.id)]
    if args.format == "json":
        # phases: a flood that changed character, each phase with its verdict ([]: one phase)
        extra = ({"evidence": incident.reasons, "timeline": samples,
                  "phases": incident.phases}
                 if args.evidence else {})
        print(dumps({**view, **extra}))
    else:
        # what each ban took and why that width (the verdict's numbers when it was decided)
        details = [(r.target, r.detail) for r in runs if r.action == "ban" and r.detail]
        print_incident(view, incident.reasons, incident.phases, samples, sys.stdout,
                       details=details)
    return 0


def register(sub: Any) -> None:
    incidents = group(sub, "incidents", "incidents")
    p = command(incidents, "list", cmd_incidents_list, "list incidents, oldest first")
    p.add_argument("--since", type=since, metavar="DUR")
    p.add_argument("--port", type=tcp_port, metavar="N")
    p.add_argument("--verdict", choices=get_args(Verdict))
    p.add_argument("--netns", metavar="PATTERN",
                   help='in the network namespaces whose names match (a glob: "docker:*", '
                        '"k8s:shop/*"; "" is the host\'s own)')
    p.add_argument("--limit", type=positive, metavar="N", help="only the newest N")
    add_hosts(p)
    add_format(p)
    add_config(p)
    p = command(incidents, "show", cmd_incidents_show,
                "one incident with its evidence and actions")
    p.add_argument("id", type=positive, metavar="ID")
    p.add_argument("--evidence", action="store_true",
                   help='with --format json: add "evidence" (the verdict\'s reasons), "phases" and '
                        '"timeline" (every probe while it lasted)')
    add_format(p)
    add_config(p)
