"""What the command modules share: argument types, the --config and --format options, loading
the configuration and opening the store. Heavy imports stay inside the functions."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, NoReturn

from synwatch.errors import NotFound, UsageError

if TYPE_CHECKING:
    from synwatch.config import Config
    from synwatch.store import History

Handler = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """Usage errors become UsageError: one line, exit 2, never a traceback."""

    def error(self, message: str) -> NoReturn:
        # prog is "synwatch incidents list": the subject is the command without "synwatch"
        raise UsageError(self.prog.removeprefix("synwatch").strip(), message)


def add_common(p: argparse.ArgumentParser) -> None:
    # accepted after the command too (`synwatch incidents list --debug`); main() reads it
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def command(parent: Any, name: str, func: Handler, helptext: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = parent.add_parser(name, help=helptext, description=helptext)
    p.set_defaults(func=func)
    add_common(p)
    return p


def group(sub: Any, name: str, helptext: str) -> Any:
    """A noun with verbs under it: `synwatch incidents list`."""
    p = sub.add_parser(name, help=helptext, description=helptext)
    add_common(p)
    return p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=Parser)


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="F",
                   help="config file (default: $SYNWATCH_CONFIG, /etc/synwatch/synwatch.toml, "
                        "else the embedded default)")


def add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("table", "json"), default="table")


# The largest row id, --limit and count the history holds: SQLite's and PostgreSQL's integers
# are 64-bit (a larger one is an OverflowError in the driver, not an empty answer).
LARGEST_INT = 2**63 - 1
# --since goes back at most a century: further back than that is every row, and a datetime ends
# at year 1 (what "99999999999d" ago would be before).
LONGEST_SINCE = "36500d"


def since(text: str) -> datetime:
    from synwatch.durations import parse_duration  # noqa: PLC0415

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not seconds <= parse_duration(LONGEST_SINCE):  # inf too: a digit run beyond a float
        raise argparse.ArgumentTypeError(f"at most {LONGEST_SINCE} (a century; leave --since "
                                         f"out for everything), got {_short(text)}")
    return datetime.now(timezone.utc) - timedelta(seconds=seconds)


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else f"{text[:40]}...")


def whole(low: int, high: int = LARGEST_INT) -> Callable[[str], int]:
    """A whole number from ``low`` to ``high`` (a row id, --limit, a count)."""
    def check(text: str) -> int:
        try:
            value = int(text) if len(text) <= 40 else None  # no 4300-digit conversions
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, "
                                             f"got {_short(text)}")
        return value
    check.__name__ = "whole number"  # argparse names the type in its own messages
    return check


positive = whole(1)


def seconds_in(low: float, high: float) -> Callable[[str], float]:
    """Seconds as a number (``--seconds 0.5``) from ``low`` to ``high``: never negative, nan or
    inf, which time.sleep and select refuse or never return from."""
    def check(text: str) -> float:
        try:
            value = float(text) if len(text) <= 40 else None
        except ValueError:
            value = None
        if value is None or not low <= value <= high:  # nan fails both
            raise argparse.ArgumentTypeError(f"expected seconds from {low:g} to {high:g}, "
                                             f"got {_short(text)}")
        return value
    check.__name__ = "seconds"
    return check


def netns_name(text: str) -> str:
    """An `ip netns` name ("" = our own namespace), or the name synwatch gives a container's
    or a process's namespace ("docker:web1", `synwatch namespaces` lists them)."""
    from synwatch.config.validators import GLOB, Invalid, netns_choice  # noqa: PLC0415

    if GLOB.search(text):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is a pattern; one namespace's name "
                                         "is needed here")
    try:
        chosen = netns_choice([text] if ":" in text or "#" in text else text)
    except Invalid as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return chosen if isinstance(chosen, str) else chosen[0]


def enter_name(name: str) -> str:
    """Make a container's or a process's namespace name enterable (probes, commands) and
    return it; an `ip netns` name or "" as it is. NotFound when no namespace has the name."""
    if ":" not in name:
        return name
    from synwatch.system import netns  # noqa: PLC0415
    from synwatch.system.netnsfind import find_namespaces  # noqa: PLC0415

    for found in find_namespaces():
        if found.name == name:
            netns.bind(name, found.path, found.ident)
            return name
    raise NotFound(f"netns {name}", "no such namespace now (`synwatch namespaces` lists them)")


def tcp_port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text[:6]) < 65536:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a TCP port (1-65535)")
    return int(text)


def load(args: argparse.Namespace) -> Config:
    from synwatch.config import load_config  # noqa: PLC0415

    return load_config(args.config)


def open_store(args: argparse.Namespace) -> History:
    """The history to write to (`import`): created and migrated when needed."""
    from synwatch.store import History  # noqa: PLC0415

    config = load(args)
    return History.open(config.storage_url, host=config.host)


def existing_store(config: Config, *, write: bool = False) -> History | None:
    """The history to read (or, ``write``, to lift bans in), or None when there is none yet:
    a command that only looks at what is there never creates or migrates it, only the
    service does."""
    from synwatch.store import History  # noqa: PLC0415

    return History.open_existing(config.storage_url, host=config.host, write=write)


def open_history(args: argparse.Namespace) -> tuple[History | None, str]:
    """The history for the lists, read-only (None: nothing recorded yet, so an empty list),
    and this node's name in it (storage.host)."""
    config = load(args)
    return existing_store(config), config.host


def add_hosts(p: argparse.ArgumentParser) -> None:
    """--host H / --all-hosts: whose rows a fleet's shared history shows (default: ours)."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--host", metavar="H", help="this node of the fleet (default: this "
                       "host, storage.host)")
    which.add_argument("--all-hosts", action="store_true", help="every node of the fleet")


def chosen_host(args: argparse.Namespace, host: str) -> str | None:
    """The host to show (this node: ``host``), None for all of them."""
    if args.all_hosts:
        return None
    return str(args.host) if args.host else host
