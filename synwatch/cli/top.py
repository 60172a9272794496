"""`synwatch top`: a live terminal view, refreshed each probe interval, of a namespace's
listeners and the open incidents; `q` (or Ctrl-C) quits. It reads the kernel itself, so it works
without the daemon; the incidents come from the history when it can be opened."""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from synwatch.cli.common import (
    add_config,
    command,
    enter_name,
    load,
    netns_name,
    seconds_in,
)
from synwatch.errors import SynwatchError

if TYPE_CHECKING:
    from synwatch.records import Incident
    from synwatch.store import History


@contextlib.contextmanager
def _keys() -> Iterator[None]:
    """Keys one at a time, without echo, while the view runs (restored on the way out)."""
    if not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(timeout: float) -> bool:
    if not sys.stdin.isatty():
        time.sleep(timeout)
        return False
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return bool(ready) and os.read(sys.stdin.fileno(), 32).lower().startswith(b"q")


def _open_incidents(store: History | None) -> list[Incident] | None:
    if store is None:
        return None
    try:
        return store.incidents(status="open", host=store.host)
    except SynwatchError:
        return None


SPARKLINES_FROM = 110  # columns


def cmd_top(args: argparse.Namespace) -> int:
    from rich.console import Console  # noqa: PLC0415
    from rich.live import Live  # noqa: PLC0415

    from synwatch.cli.topview import Trends, view  # noqa: PLC0415
    from synwatch.probes.snapshot import take  # noqa: PLC0415

    config = load(args)
    netns = enter_name(config.netns if args.netns is None else args.netns)
    interval = args.interval or config.probe_interval
    store = _history(config.storage_url, config.host)
    prev, prev_at = None, time.monotonic()
    trends = Trends()
    with _keys(), Live(console=Console(), screen=True, auto_refresh=False) as live:
        try:
            while True:
                snap, at = take(netns), time.monotonic()
                trends.add(snap, prev, at - prev_at, at)
                # the sparklines where there is room for them beside whole numbers
                wide = live.console.width >= SPARKLINES_FROM
                live.update(view(snap, prev, at - prev_at, _open_incidents(store),
                                 datetime.now(timezone.utc).astimezone(),
                                 trends=trends if wide else None), refresh=True)
                prev, prev_at = snap, at
                if _quit_pressed(interval):
                    return 0
        except KeyboardInterrupt:
            return 0


def _history(url: str, host: str) -> History | None:
    """The history, if there is one: top never creates it."""
    from synwatch.store import History  # noqa: PLC0415

    try:
        return History.open_existing(url, host=host)
    except SynwatchError:
        return None


def register(sub: Any) -> None:
    p = command(sub, "top", cmd_top,
                "a live view of the listeners (queues, SYN-RECV, drops, source prefixes) and "
                "the open incidents; q quits")
    p.add_argument("--netns", type=netns_name, default=None, metavar="NAME",
                   help="an `ip netns` name or a container's (default: watch.netns of the "
                        "config)")
    p.add_argument("--interval", type=seconds_in(0.1, 3600), default=None, metavar="S",
                   help="seconds between refreshes, 0.1 to 3600 (default: "
                        "incident.probe_interval)")
    add_config(p)
