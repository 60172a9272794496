"""synwatch(1), generated from the CLI's own help (argparse), so the man page says what
`synwatch COMMAND --help` says. Writes roff to stdout.

    python scripts/manpage.py > synwatch.1
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from synwatch import __version__  # noqa: E402
from synwatch.cli import build_parser  # noqa: E402


def esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace("-", "\\-").replace("'", "\\(aq")


def commands(parser: argparse.ArgumentParser,
             prefix: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = commands(sub, f"{prefix}{name} ")
                out.extend(nested or [(f"{prefix}{name}", sub)])
    return out


def options(sub: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in sub._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        names = ", ".join(action.option_strings) or (action.metavar or action.dest)
        metavar = "" if not action.option_strings or action.nargs == 0 else \
            f" {action.metavar or action.dest.upper()}"
        lines += [".TP", f"\\fB{esc(str(names))}\\fR{esc(str(metavar))}",
                  esc(action.help or "")]
    return lines


def main() -> None:
    parser = build_parser()
    out = [f'.TH SYNWATCH 1 "{date.today():%Y-%m-%d}" "synwatch {__version__}" "User Commands"',
           ".SH NAME", "synwatch \\- SYN\\-flood and listen\\-queue overflow watcher",
           ".SH SYNOPSIS", ".B synwatch", "[\\fB\\-\\-debug\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
           ".SH DESCRIPTION",
           esc("synwatch reads the kernel's own state (counters, SYN-RECV sockets, listener "
               "queues, sampled SYNs) and its log lines, explains SYN floods and listen-queue "
               "overflows (capacity, concentrated, spoofed), responds (SYN cookies, bans, "
               "notifications) and keeps a queryable history. The service runs as "
               "synwatch.service; its configuration is /etc/synwatch/synwatch.toml."),
           ".SH COMMANDS"]
    for name, sub in commands(parser):
        out += [".SS", f"synwatch {esc(name)}", esc(sub.description or ""), *options(sub)]
    out += [".SH EXIT STATUS", "0 ok, 1 runtime failure, 2 usage or configuration error, "
            "3 (status) not running.",
            ".SH FILES", ".TP", "/etc/synwatch/synwatch.toml", "the configuration",
            ".TP", "/var/lib/synwatch/synwatch.db", "the history (SQLite)",
            ".SH SEE ALSO", "systemctl(1), journalctl(1), nft(8), ss(8)"]
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
