"""`synwatch incidents list` and `incidents show`."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

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
from synwatch.errors import NotFound, UsageError
from synwatch.records import Verdict

if TYPE_CHECKING:
    from synwatch.store import History


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
    if args.plot is not None:
        return _plot(store, args.id, args.plot)
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


def _plot(store: History, incident_id: int, where: str) -> int:
    """The incident's picture: in the terminal (``-``) or as a PNG file."""
    import shutil  # noqa: PLC0415

    from synwatch.charts import require  # noqa: PLC0415
    from synwatch.charts.draw import picture_of  # noqa: PLC0415

    if where == "-":
        require("uniplot", "incidents show --plot")
        from synwatch.charts.terminal import draw_text  # noqa: PLC0415

        width = max(40, min(shutil.get_terminal_size().columns - 12, 100))
        shown = picture_of(store, incident_id, datetime.now(timezone.utc))
        sys.stdout.write(draw_text(shown, colour=sys.stdout.isatty(), width=width))
        return 0
    require("matplotlib", f"incidents show --plot {where}")
    from synwatch.charts.png import draw_png  # noqa: PLC0415

    drawn = draw_png(picture_of(store, incident_id, datetime.now(timezone.utc)))
    try:
        Path(where).write_bytes(drawn.png)
    except OSError as exc:
        raise UsageError(f"--plot {where}", exc.strerror or str(exc)) from exc
    print(f"wrote {where} ({len(drawn.png):,} bytes)")
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
    p.add_argument("--plot", nargs="?", const="-", metavar="FILE.png",
                   help="its picture: SYNs a second, SYN-RECV against the backlog, cookies "
                        "sent and validated, with the phases, cookies and bans marked; in the "
                        "terminal, or as a PNG to FILE.png (needs the charts extra)")
    add_format(p)
    add_config(p)
