"""The command line: one module per noun, each registering its own subcommands; rendering lives
in ``synwatch.cli.render``. ``main`` maps errors to exit codes.

Heavy imports (SQLAlchemy, alembic) happen inside the commands that need them, so `scan` starts
in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from synwatch import __version__
from synwatch.cli import bans, events, incidents, kernel, logs, service, status, top
from synwatch.cli.common import Parser, add_common
from synwatch.errors import ExitStatus, SynwatchError, UsageError
from synwatch.system.logsetup import setup_logging

# in the order `synwatch --help` lists them
NOUNS = (service, status, logs, kernel, top, events, incidents, bans)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="synwatch", description="SYN-flood and listen-queue watcher.")
    parser.add_argument("--version", action="version", version=f"synwatch {__version__}")
    add_common(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    for noun in NOUNS:
        noun.register(sub)
    return parser


def report(exc: SynwatchError) -> None:
    subject = f"{exc.subject}: " if exc.subject else ""
    sys.stderr.write(f"synwatch: {subject}{exc.why}\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug may come anywhere; logging is set up before the parser can fail
    debug = "--debug" in argv[: argv.index("--")] if "--" in argv else "--debug" in argv
    # the service's own log: the first word that is not an option names the command
    command = next((a for a in argv if not a.startswith("-")), "")
    setup_logging(debug, timestamps=command == "run")
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except UsageError as exc:  # a mistyped command line is never a traceback
        report(exc)
        return int(exc.status)
    except SynwatchError as exc:
        if debug:  # the traceback too, and still the error's own exit status
            traceback.print_exc()
        report(exc)
        return int(exc.status)
    except BrokenPipeError:  # `synwatch scan ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            raise
        sys.stderr.write(f"synwatch: internal error: {type(exc).__name__}: {exc} "
                         "(run with --debug for a traceback)\n")
        return int(ExitStatus.FAILURE)
