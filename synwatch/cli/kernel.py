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

    view = snapshot_view(take(args.netns))
    if args.format == "json":
        print(dumps(view))
    else:
        print_snapshot(view, sys.stdout)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from synwatch.cli.render import dumps  # noqa: PLC0415
    from synwatch.detect.doctor import examine  # noqa: PLC0415
    from synwatch.probes.snapshot import take  # noqa: PLC0415

    config = load(args)
    netns = config.netns if args.netns is None else args.netns
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
                   help="an `ip netns` name")
    add_format(p)
    p = command(sub, "doctor", cmd_doctor,
                "judge the listeners, sysctls and counters of a namespace, with tuning advice "
                "(backlogs below the peaks in the history, listen(0), cookies off, somaxconn)")
    p.add_argument("--netns", type=netns_name, default=None, metavar="NAME",
                   help="an `ip netns` name (default: watch.netns of the config)")
    p.add_argument("--seconds", type=seconds_in(0.1, 3600), default=1.0, metavar="S",
                   help="measure counter rates over S seconds, 0.1 to 3600 (default 1)")
    add_format(p)
    add_config(p)
