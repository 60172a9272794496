"""`synwatch scan`, `test-filter` and `import`: kernel lines in log files, read without the
service (scan, test-filter record nothing; import adds old logs to the history)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synwatch.cli.common import add_config, command, open_store, whole
from synwatch.errors import ExitStatus

if TYPE_CHECKING:
    from synwatch.cli.render import ProgressBar
    from synwatch.lines.scan import Hit

# A progress bar on a terminal for inputs larger than this (the variable is for tests).
PROGRESS_THRESHOLD = int(os.environ.get("SYNWATCH_PROGRESS_BYTES", str(64 << 20)))


def _progress_bar(path: str, size: int | None, threshold: int) -> ProgressBar | None:
    """A bar on stderr when it is a terminal and the input is bigger than ``threshold``."""
    from synwatch.cli.render import ProgressBar  # noqa: PLC0415

    if size and size > threshold and sys.stderr.isatty():
        return ProgressBar(path, size, sys.stderr)
    return None


# What `scan` reports by default, as its JSON contract has it: the SYN-flood lines and the
# "drop open request" ones. `--all` adds the other kernel lines synwatch knows (conntrack's
# "table full"), which the service and `import` always record.
SCAN_KINDS = frozenset({"syn_flood", "drop_open_request"})


def _scan_inputs(paths: Sequence[str], line_numbers: bool = True,
                 kinds: frozenset[str] | None = SCAN_KINDS) -> Iterator[Hit]:
    """Every match in ``paths``, with a progress bar on a terminal."""
    from synwatch.clock import local_timezone  # noqa: PLC0415
    from synwatch.lines.catalogue import load_catalogue  # noqa: PLC0415
    from synwatch.lines.scan import open_input, scan_stream  # noqa: PLC0415

    catalogue = load_catalogue()
    now, tz = datetime.now(timezone.utc), local_timezone()
    for path in paths:
        stream = open_input(path)
        bar = _progress_bar(path, stream.size, PROGRESS_THRESHOLD)
        try:
            yield from scan_stream(stream, path, catalogue, now=now, tz=tz, progress=bar,
                                   line_numbers=line_numbers, kinds=kinds)
        finally:
            if bar:
                bar.close()
            stream.close()


def _bad_lines_status(command_name: str, code: int) -> int:
    """Exit 1 when some lines made a parser raise: they were skipped (and logged), and the
    admin should know that the output is short of them."""
    from synwatch.lines.sinks import BAD_LINES  # noqa: PLC0415

    bad = sum(BAD_LINES.counts.values())
    if bad and code == 0:
        sys.stderr.write(f"synwatch: {command_name}: {bad} lines could not be parsed and were "
                         "skipped (see the warnings above)\n")
        return int(ExitStatus.FAILURE)
    return code


def cmd_scan(args: argparse.Namespace) -> int:
    from synwatch.cli.render import print_hits  # noqa: PLC0415

    hits = _scan_inputs(args.paths, line_numbers=not args.count,
                        kinds=None if args.all else SCAN_KINDS)
    if args.count:
        print(sum(1 for _ in hits))
    else:
        print_hits(hits, args.format, sys.stdout)
    return _bad_lines_status("scan", 0)


def cmd_test_filter(args: argparse.Namespace) -> int:
    from synwatch.cli import testfilter  # noqa: PLC0415

    target = args.target
    try:
        is_file = target == "-" or Path(target).is_file()
    except OSError:  # a log line longer than a file name may be (ENAMETOOLONG)
        is_file = False
    if is_file:
        return testfilter.explain_file(target, sys.stdout, show_misses=args.max_misses)
    return testfilter.explain_line(target, sys.stdout)


def cmd_import(args: argparse.Namespace) -> int:
    from synwatch.cli.importer import import_paths  # noqa: PLC0415
    from synwatch.lines.catalogue import load_catalogue  # noqa: PLC0415

    store = open_store(args)
    bars: list[ProgressBar] = []

    def progress_for(path: str, size: int | None) -> ProgressBar | None:
        bar = _progress_bar(path, size, 0)  # an import is always worth watching
        if bar is not None:
            bars.append(bar)
        return bar

    try:
        results = import_paths(store, load_catalogue(), args.paths, progress_for)
    finally:
        for bar in bars:
            bar.close()
    for r in results:
        print(f"{r.path}: {r.matched} kernel lines, {r.added} new events")
    return _bad_lines_status("import", 0)


def register(sub: Any) -> None:
    p = command(sub, "scan", cmd_scan,
                "find kernel SYN-flood lines in log files; records nothing")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--count", action="store_true", help="print only the number of matches")
    p.add_argument("--all", action="store_true",
                   help="also the other kernel lines synwatch knows (conntrack: table full)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="log file, .gz, or - for stdin")
    p = command(sub, "test-filter", cmd_test_filter,
                "show which pattern hits a line or a file, what it extracts, and what missed")
    p.add_argument("target", metavar="PATH|LINE")
    p.add_argument("--max-misses", type=whole(0, 1_000_000), default=20, metavar="N",
                   help="near misses to list for a file (default 20)")
    p = command(sub, "import", cmd_import,
                "read old logs (.1, .gz) into the event history, untrusted and historical; "
                "importing twice adds nothing")
    p.add_argument("paths", nargs="+", metavar="PATH")
    add_config(p)
