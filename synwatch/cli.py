"""The command line: parses arguments, calls the library, renders, maps errors to exit codes.

Heavy imports (SQLAlchemy, alembic) happen inside the commands that need them, so `scan` starts
in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from synwatch import __version__
from synwatch.errors import ConfigError, ExitStatus, SynwatchError, UsageError
from synwatch.records import endpoint

if TYPE_CHECKING:
    from synwatch.config import Config
    from synwatch.scan import Hit
    from synwatch.store import Store

# A progress bar on a terminal for inputs larger than this (the variable is for tests).
PROGRESS_THRESHOLD = int(os.environ.get("SYNWATCH_PROGRESS_BYTES", str(64 << 20)))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog.replace("synwatch ", "", 1) or "synwatch", message)


def _since(text: str) -> datetime:
    from synwatch.durations import parse_duration  # noqa: PLC0415

    try:
        return datetime.now(timezone.utc) - timedelta(seconds=parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


# -- commands ---------------------------------------------------------------------------------

def _load(args: argparse.Namespace) -> Config:
    from synwatch.config import load_config  # noqa: PLC0415

    return load_config(args.config)


def _open_store(args: argparse.Namespace) -> Store:
    from synwatch.store import Store  # noqa: PLC0415

    return Store.open(_load(args).storage_url)


def cmd_run(args: argparse.Namespace) -> int:
    from synwatch.service import Service  # noqa: PLC0415

    return Service(_load(args), args.config, record=args.record).run()


def cmd_replay(args: argparse.Namespace) -> int:
    from synwatch.output import dumps, table  # noqa: PLC0415
    from synwatch.replay import replay  # noqa: PLC0415
    from synwatch.store.views import change_view  # noqa: PLC0415

    config = _load(args)
    rows = [change_view(c) for c in replay(args.recording, config.thresholds,
                                           config.quiet_period)]
    if args.format == "json":
        print(dumps(rows))
        return 0
    for row in rows:
        row["listener"] = endpoint(row["address"], row["port"])
    table(rows, ["opened_at", "status", "verdict", "trigger", "listener", "peak_syn_recv"],
          sys.stdout, headers=["opened", "status", "verdict", "trigger", "listener", "peak"])
    for row in rows:
        for line in row["evidence"] + row["recommendations"]:
            print(f"  {row['listener']}: {line}")
    return 0


def _tcp_port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text[:6]) < 65536:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a TCP port (1-65535)")
    return int(text)


def cmd_check_config(args: argparse.Namespace) -> int:
    from synwatch.preflight import preflight  # noqa: PLC0415

    config = _load(args)  # a malformed file stops here, with one line naming the key
    checks = preflight(config)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if c.outcome == "fail"]
    if failed:
        first = failed[0]
        raise ConfigError(config.path, first.subject, first.text
                          + (f" (and {len(failed) - 1} more above)" if len(failed) > 1 else ""))
    print(f"{config.path}: OK")
    return 0


class _ProgressBar:
    def __init__(self, path: str, total: int) -> None:
        self.path, self.total, self.shown = path, total, -1

    def __call__(self, done: int) -> None:
        percent = min(100, done * 100 // max(self.total, 1))
        if percent != self.shown:
            self.shown = percent
            bar = "#" * (percent // 4)
            sys.stderr.write(f"\rscanning {self.path} [{bar:<25}] {percent:3d}%")
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


def _progress_bar(path: str, size: int | None, threshold: int) -> _ProgressBar | None:
    """A bar on stderr when it is a terminal and the input is bigger than ``threshold``."""
    if size and size > threshold and sys.stderr.isatty():
        return _ProgressBar(path, size)
    return None


def _scan_inputs(paths: Sequence[str], line_numbers: bool = True) -> Iterator[Hit]:
    """Every match in ``paths``, with a progress bar on a terminal."""
    from synwatch.catalogue import load_catalogue  # noqa: PLC0415
    from synwatch.clock import local_timezone  # noqa: PLC0415
    from synwatch.scan import open_input, scan_stream  # noqa: PLC0415

    catalogue = load_catalogue()
    now, tz = datetime.now(timezone.utc), local_timezone()
    for path in paths:
        stream = open_input(path)
        size = stream.size
        bar = _progress_bar(path, size, PROGRESS_THRESHOLD)
        try:
            yield from scan_stream(stream, path, catalogue, now=now, tz=tz, progress=bar,
                                   line_numbers=line_numbers)
        finally:
            if bar:
                bar.close()
            stream.close()


def _bad_lines_status(command: str, code: int) -> int:
    """Exit 1 when some lines made a parser raise: they were skipped (and logged), and the
    admin should know that the output is short of them."""
    from synwatch.sinks import BAD_LINES  # noqa: PLC0415

    bad = sum(BAD_LINES.counts.values())
    if bad and code == 0:
        sys.stderr.write(f"synwatch: {command}: {bad} lines could not be parsed and were "
                         "skipped (see the warnings above)\n")
        return int(ExitStatus.FAILURE)
    return code


def cmd_scan(args: argparse.Namespace) -> int:
    return _bad_lines_status("scan", _scan(args))


def _scan(args: argparse.Namespace) -> int:
    from synwatch.filters import event_fields  # noqa: PLC0415
    from synwatch.output import dumps, table  # noqa: PLC0415

    hits = _scan_inputs(args.paths, line_numbers=not args.count)
    if args.count:
        print(sum(1 for _ in hits))
        return 0
    if args.format == "json":
        for hit in hits:
            row = {"path": hit.path, "line_no": hit.line_no, **event_fields(hit.event)}
            sys.stdout.write(dumps(row) + "\n")
        return 0
    rows = []
    for hit in hits:
        f = event_fields(hit.event)
        f["where"] = f"{hit.path}:{hit.line_no}"
        f["source"] = (f"{f['source_ip']}/{f['source_port']}" if f["source_ip"] else None)
        rows.append(f)
    table(rows, ["where", "time", "kind", "family", "address", "port", "mode", "source",
                 "trusted"], sys.stdout)
    return 0


def cmd_test_filter(args: argparse.Namespace) -> int:
    from synwatch import testfilter  # noqa: PLC0415

    target = args.target
    try:
        is_file = target == "-" or Path(target).is_file()
    except OSError:  # a log line longer than a file name may be (ENAMETOOLONG)
        is_file = False
    if is_file:
        return testfilter.explain_file(target, sys.stdout, show_misses=args.max_misses)
    return testfilter.explain_line(target, sys.stdout)


def cmd_import(args: argparse.Namespace) -> int:
    from synwatch.catalogue import load_catalogue  # noqa: PLC0415
    from synwatch.importer import import_paths  # noqa: PLC0415

    store = _open_store(args)
    bars: list[_ProgressBar] = []

    def progress_for(path: str, size: int | None) -> _ProgressBar | None:
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


def cmd_snapshot(args: argparse.Namespace) -> int:
    from synwatch.output import dumps, table  # noqa: PLC0415
    from synwatch.probes.snapshot import as_json, take  # noqa: PLC0415

    view = as_json(take(args.netns))
    if args.format == "json":
        print(dumps(view))
        return 0
    print(f"netns: {view['netns'] or '(own)'}   " + "  ".join(
        f"{k.rsplit('.', 1)[1]}={v}" for k, v in view["sysctls"].items()))
    rows = [{**li, "listener": endpoint(li["address"], li["port"]),
             "prefixes": ", ".join(f"{p['prefix']} ({p['count']})" for p in li["top_prefixes"])
             or None} for li in view["listeners"]]
    table(rows, ["listener", "backlog", "accept_queue", "syn_recv", "prefixes"], sys.stdout,
          headers=["listener", "backlog", "accept-q", "syn-recv", "top source prefixes"])
    print("counters: " + "  ".join(f"{k.split('.', 1)[1]}={v}"
                                   for k, v in sorted(view["counters"].items())))
    for line in view["diagnosis"]:
        print(f"diagnosis: {line}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import time  # noqa: PLC0415

    from synwatch.doctor import examine  # noqa: PLC0415
    from synwatch.output import dumps  # noqa: PLC0415
    from synwatch.probes.snapshot import take  # noqa: PLC0415

    config = _load(args)
    netns = config.netns if args.netns is None else args.netns
    history = {}
    try:
        history = _open_store(args).port_history(netns)
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


def cmd_events_list(args: argparse.Namespace) -> int:
    from synwatch.output import dumps, table  # noqa: PLC0415
    from synwatch.store.views import event_view  # noqa: PLC0415

    store = _open_store(args)
    rows = [event_view(e) for e in store.events(since=args.since, limit=args.limit)]
    if args.format == "json":
        print(dumps(rows))
    else:
        table(rows, ["id", "time", "source", "trusted", "kind", "family", "address", "port",
                     "mode", "source_ip", "incident_id"], sys.stdout,
              headers=["id", "time", "source", "trusted", "kind", "fam", "address", "port",
                       "mode", "source_ip", "incident"])
    return 0


def cmd_incidents_list(args: argparse.Namespace) -> int:
    from synwatch.output import dumps, table  # noqa: PLC0415
    from synwatch.store.views import incident_view  # noqa: PLC0415

    store = _open_store(args)
    incidents = store.incidents(since=args.since, port=args.port, verdict=args.verdict,
                                limit=args.limit)
    runs = store.actions_by_incident([i.id for i in incidents])
    rows = [incident_view(i, runs[i.id]) for i in incidents]
    if args.format == "json":
        print(dumps(rows))
        return 0
    for row in rows:
        row["listener"] = endpoint(row["address"], row["port"])
        row["prefixes"] = ", ".join(p["prefix"] for p in row["top_prefixes"][:3]) or None
    table(rows, ["id", "opened_at", "closed_at", "status", "verdict", "trigger", "listener",
                 "peak_syn_recv", "prefixes"], sys.stdout,
          headers=["id", "opened", "closed", "status", "verdict", "trigger", "listener",
                   "peak", "top prefixes"])
    return 0


def cmd_incidents_show(args: argparse.Namespace) -> int:
    from synwatch.output import cell, dumps, table  # noqa: PLC0415
    from synwatch.store.views import incident_view, sample_view  # noqa: PLC0415

    store = _open_store(args)
    incident, runs = store.incident(args.id)
    view = incident_view(incident, runs)
    samples = [sample_view(x) for x in store.samples(args.id)]
    if args.format == "json":
        # phases: a flood that changed character, each phase with its verdict ([]: one phase)
        extra = ({"evidence": list(incident.evidence.get("reasons", [])), "timeline": samples,
                  "phases": list(incident.evidence.get("phases", []))}
                 if args.evidence else {})
        print(dumps({**view, **extra}))
        return 0
    for key in ("id", "host", "netns", "address", "port", "family", "status", "verdict",
                "trigger", "opened_at", "closed_at", "first_evidence_at", "detected_at",
                "peak_syn_recv"):
        print(f"{key + ':':<19}{cell(view[key])}")
    if view["top_prefixes"]:
        print("top prefixes:")
        table(view["top_prefixes"], ["prefix", "count", "share"], sys.stdout)
    for reason in incident.evidence.get("reasons", []):
        print(f"evidence: {reason}")
    for phase in incident.evidence.get("phases", []):
        print(f"phase:             {phase['verdict']} from {phase['at']}")
    _timeline(samples)
    for rec in view["recommendations"]:
        print(f"recommendation: {rec}")
    if view["actions"]:
        print("actions:")
        table(view["actions"], ["at", "action", "target", "status"], sys.stdout)
    return 0


def _timeline(samples: list[dict[str, Any]]) -> None:
    """The evidence over time, one sparkline per measure."""
    from synwatch.output import sparkline  # noqa: PLC0415

    if not samples:
        return
    print(f"timeline:          {len(samples)} probes, {samples[0]['at']} to {samples[-1]['at']}")
    rows: list[tuple[str, list[float | None]]] = [
        ("SYN-RECV", [x["syn_recv"] for x in samples]),
        ("accept queue", [x["accept_queue"] for x in samples]),
        ("SYN overflow/s", [x["rates"].get("syns_overflowed") for x in samples]),
        ("accept overflow/s", [x["rates"].get("listen_overflows") for x in samples]),
        ("cookies back/s", [x["rates"].get("cookies_recv") for x in samples]),
    ]
    for name, values in rows:
        peak = max((v for v in values if v is not None), default=None)
        if peak:
            print(f"  {name:<18}{sparkline(values)}  peak {peak:.0f}")


def cmd_bans_list(args: argparse.Namespace) -> int:
    from synwatch.output import dumps, table  # noqa: PLC0415
    from synwatch.store.views import ban_view  # noqa: PLC0415

    store = _open_store(args)
    now = datetime.now(timezone.utc)
    rows = [ban_view(b, now) for b in store.bans()]
    if args.format == "json":
        print(dumps(rows))
    else:
        table(rows, ["prefix", "backend", "incident_id", "created_at", "expires_at", "active"],
              sys.stdout)
    return 0


def cmd_unban(args: argparse.Namespace) -> int:
    from synwatch.actions.ban import unban  # noqa: PLC0415
    from synwatch.store import Store  # noqa: PLC0415

    config = _load(args)
    store = Store.open(config.storage_url)
    for done in unban(config, store, args.prefix, datetime.now(timezone.utc)):
        ban = done.ban
        print(f"unbanned {ban.prefix} ({ban.backend}, incident {ban.incident_id})")
        if done.kept:
            print(f"  {args.prefix} was inside it; the rest stays banned until "
                  f"{ban.expires_at.isoformat()}: {', '.join(done.kept)}")
        if args.verbose:
            print(done.rendered)
    return 0


# -- parser -----------------------------------------------------------------------------------

def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="F",
                   help="config file (default: $SYNWATCH_CONFIG, /etc/synwatch/synwatch.toml, "
                        "else the embedded default)")


def _add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("table", "json"), default="table")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="synwatch", description="SYN-flood and listen-queue watcher.")
    parser.add_argument("--version", action="version", version=f"synwatch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    def command(name: str, func: Callable[[argparse.Namespace], int], helptext: str,
                parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(func=func)
        return p

    p = command("run", cmd_run, "run the service in the foreground")
    p.add_argument("--record", metavar="FILE",
                   help="append every probe and kernel event to FILE (JSON lines) for replay")
    _add_config(p)
    p = command("replay", cmd_replay,
                "the incidents a recording (run --record) leads to with the configured "
                "thresholds; records nothing")
    p.add_argument("recording", metavar="FILE")
    _add_format(p)
    _add_config(p)
    p = command("check-config", cmd_check_config, "check a configuration file")
    _add_config(p)
    p = command("scan", cmd_scan, "find kernel SYN-flood lines in log files; records nothing")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--count", action="store_true", help="print only the number of matches")
    p.add_argument("paths", nargs="+", metavar="PATH", help="log file, .gz, or - for stdin")
    p = command("test-filter", cmd_test_filter,
                "show which pattern hits a line or a file, what it extracts, and what missed")
    p.add_argument("target", metavar="PATH|LINE")
    p.add_argument("--max-misses", type=int, default=20, metavar="N",
                   help="near misses to list for a file (default 20)")

    p = command("snapshot", cmd_snapshot,
                "listeners, their queues and SYN-RECV sources, counters, sysctls, a diagnosis")
    p.add_argument("--netns", default="", metavar="NAME", help="an `ip netns` name")
    _add_format(p)

    p = command("doctor", cmd_doctor,
                "judge the listeners, sysctls and counters of a namespace, with tuning advice "
                "(backlogs below the peaks in the history, listen(0), cookies off, somaxconn)")
    p.add_argument("--netns", default=None, metavar="NAME",
                   help="an `ip netns` name (default: watch.netns of the config)")
    p.add_argument("--seconds", type=float, default=1.0, metavar="S",
                   help="measure counter rates over S seconds (default 1)")
    _add_format(p)
    _add_config(p)

    p = command("import", cmd_import,
                "read old logs (.1, .gz) into the event history, untrusted and historical; "
                "importing twice adds nothing")
    p.add_argument("paths", nargs="+", metavar="PATH")
    _add_config(p)

    events = sub.add_parser("events", help="recorded kernel events").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    p = command("list", cmd_events_list, "list recorded kernel events, oldest first", events)
    p.add_argument("--since", type=_since, metavar="DUR", help="only the last DUR (e.g. 1h)")
    p.add_argument("--limit", type=_positive, metavar="N", help="only the newest N")
    _add_format(p)
    _add_config(p)

    incidents = sub.add_parser("incidents", help="incidents").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    p = command("list", cmd_incidents_list, "list incidents, oldest first", incidents)
    p.add_argument("--since", type=_since, metavar="DUR")
    p.add_argument("--port", type=_tcp_port, metavar="N")
    p.add_argument("--verdict", choices=("capacity", "concentrated", "spoofed", "unknown"))
    p.add_argument("--limit", type=_positive, metavar="N", help="only the newest N")
    _add_format(p)
    _add_config(p)
    p = command("show", cmd_incidents_show, "one incident with its evidence and actions",
                incidents)
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("--evidence", action="store_true",
                   help='with --format json: add "evidence" (the verdict\'s reasons), "phases" and '
                        '"timeline" (every probe while it lasted)')
    _add_format(p)
    _add_config(p)

    bans = sub.add_parser("bans", help="bans").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    p = command("list", cmd_bans_list, "list bans with their expiry", bans)
    _add_format(p)
    _add_config(p)
    p = command("unban", cmd_unban, "lift the active bans covering a prefix or an address")
    p.add_argument("prefix", metavar="PREFIX")
    p.add_argument("-v", "--verbose", action="store_true", help="print the commands run")
    _add_config(p)
    return parser


def _setup_logging(debug: bool) -> None:
    # Our own messages at INFO; libraries (alembic announces every plugin) only when they warn.
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("synwatch").setLevel(logging.DEBUG if debug else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _setup_logging(debug)
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except SynwatchError as exc:
        if debug:
            raise
        sys.stderr.write(f"synwatch: {exc.subject}: {exc.why}\n")
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
