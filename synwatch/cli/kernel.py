"""`synwatch snapshot` and `doctor`: the kernel's state now, read without the service."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from synwatch.cli.common import (
    add_config,
    add_format,
    command,
    enter_name,
    existing_store,
    load,
    netns_name,
    seconds_in,
)
from synwatch.errors import SynwatchError


def cmd_snapshot(args: argparse.Namespace) -> int:
    from synwatch.cli.render import dumps, print_snapshot  # noqa: PLC0415
    from synwatch.cli.snapshotview import snapshot_view  # noqa: PLC0415
    from synwatch.probes.snapshot import take  # noqa: PLC0415

    view = snapshot_view(take(enter_name(args.netns)))
    if args.format == "json":
        print(dumps(view))
    else:
        print_snapshot(view, sys.stdout)
    return 0


def cmd_namespaces(args: argparse.Namespace) -> int:
    """Every network namespace of the host, with the name synwatch gives it and whether
    watch.netns takes it."""
    from synwatch.cli.render import dumps, table  # noqa: PLC0415
    from synwatch.system.netnsfind import find_namespaces  # noqa: PLC0415

    config = load(args)
    rows = [{"name": f.name, "kind": f.kind,
             "runtime": f.owner.runtime if f.owner else None,
             "container_id": f.owner.container_id if f.owner else None,
             "pod": f"{f.owner.pod_namespace}/{f.owner.pod}" if f.owner and f.owner.pod
             else None,
             "pid": f.pid, "inode": f.ident[1], "watched": config.watches(f.name)}
            for f in find_namespaces()]
    if args.format == "json":
        print(dumps(rows))
    else:
        shown = [{**r, "name": r["name"] or "(our own)",
                  "container_id": str(r["container_id"] or "")[:12],
                  "watched": "yes" if r["watched"] else ""} for r in rows]
        table(shown, ["name", "kind", "runtime", "container_id", "pod", "pid", "watched"],
              sys.stdout)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from synwatch.cli.render import dumps  # noqa: PLC0415
    from synwatch.detect.doctor import examine  # noqa: PLC0415
    from synwatch.probes.snapshot import take  # noqa: PLC0415

    config = load(args)
    netns = enter_name(config.netns if args.netns is None else args.netns)
    history = {}
    try:
        store = existing_store(config)
        history = store.port_history(netns) if store is not None else {}
    except SynwatchError as exc:
        sys.stderr.write(f"synwatch: no history ({exc.subject}: {exc.why}); judging the "
                         "present only\n")
    before = take(netns)
    time.sleep(args.seconds)
    after = take(netns)
    findings = examine(before, after, args.seconds, history, config.thresholds.half_open_min)
    if args.format == "json":
        print(dumps([{"severity": f.severity, "subject": f.subject, "text": f.text}
                     for f in findings]))
    else:
        for f in findings:
            print(f"{f.severity.upper():<5} {f.subject}: {f.text}")
    return 0


def register(sub: Any) -> None:
    p = command(sub, "snapshot", cmd_snapshot,
                "listeners, their queues and SYN-RECV sources, counters, sysctls, a diagnosis")
    p.add_argument("--netns", type=netns_name, default="", metavar="NAME",
                   help='an `ip netns` name, or a container\'s ("docker:web1"; `synwatch '
                        'namespaces` lists them)')
    add_format(p)
    p = command(sub, "doctor", cmd_doctor,
                "judge the listeners, sysctls and counters of a namespace, with tuning advice "
                "(backlogs below the peaks in the history, listen(0), cookies off, somaxconn)")
    p.add_argument("--netns", type=netns_name, default=None, metavar="NAME",
                   help="an `ip netns` name or a container's (default: watch.netns of the "
                        "config)")
    p.add_argument("--seconds", type=seconds_in(0.1, 3600), default=1.0, metavar="S",
                   help="measure counter rates over S seconds, 0.1 to 3600 (default 1)")
    add_format(p)
    add_config(p)
    p = command(sub, "namespaces", cmd_namespaces,
                "every network namespace of the host: the name synwatch gives it (container, "
                "pod, `ip netns` name, process), and whether watch.netns takes it")
    add_format(p)
    add_config(p)
