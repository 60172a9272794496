"""Rendering for the CLI: JSON, JSON lines, plain aligned tables, and each command's text view
(the commands in ``synwatch/cli/`` parse and call; what a user reads is drawn here)."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from synwatch.records import endpoint

if TYPE_CHECKING:
    from synwatch.cli.trial import Judged
    from synwatch.lines.scan import Hit


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(cell(v) for v in value) or "-"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], out: TextIO,
          headers: Sequence[str] | None = None) -> None:
    """An aligned table (rich's), as wide as its widest row: nothing is wrapped or cut, on a
    terminal (bold headers) or in a pipe (plain text a script can split on spaces). Rich
    wraps at 80 columns where it cannot see a terminal, so the width is the table's own."""
    from rich.cells import cell_len  # noqa: PLC0415 - only for text output
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415 - cells are text, never markup ("[::]:443")

    head = [h.upper() for h in (headers or columns)]
    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([cell_len(head[i])] + [cell_len(b[i]) for b in body])
              for i in range(len(columns))]
    grid = Table(box=None, padding=(0, 2, 0, 0), pad_edge=False, show_edge=False,
                 header_style="bold")
    for h in head:
        grid.add_column(Text(h), no_wrap=True, overflow="ignore")
    for b in body:
        grid.add_row(*(Text(v) for v in b))
    buffer = io.StringIO()
    tty = out.isatty()
    Console(file=buffer, width=sum(widths) + 2 * len(widths) + 1, force_terminal=tty,
            no_color=not tty, color_system="standard" if tty else None, highlight=False,
            emoji=False).print(grid)
    for line in buffer.getvalue().splitlines():
        out.write(line.rstrip() + "\n")


def json_lines(rows: Iterable[dict[str, Any]], out: TextIO) -> None:
    for row in rows:
        out.write(dumps(row) + "\n")


BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None], width: int = 60) -> str:
    """One character per value (the largest of each group beyond ``width``); blank for None."""
    if len(values) > width:
        step = -(-len(values) // width)
        values = [max((v for v in values[i:i + step] if v is not None), default=None)
                  for i in range(0, len(values), step)]
    top = max((v for v in values if v is not None), default=0) or 1
    return "".join(" " if v is None else BARS[min(len(BARS) - 1, int(v / top * len(BARS)))]
                   for v in values)


class ProgressBar:
    """``scanning PATH ━━━━━━━━━╺━━━━━━━  40%`` on a terminal (rich), cleared when done."""

    def __init__(self, path: str, total: int, out: TextIO) -> None:
        from rich.console import Console  # noqa: PLC0415 - only on a terminal
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn  # noqa: PLC0415

        self.progress = Progress(TextColumn("scanning {task.description}"), BarColumn(30),
                                 TaskProgressColumn(),
                                 # the terminal's width, 80 where it reports none (a new pty)
                                 console=Console(file=out,
                                                 width=shutil.get_terminal_size().columns),
                                 transient=True)
        # the file's name: a long path would leave the bar and the percentage no room
        self.task = self.progress.add_task(path.rsplit("/", 1)[-1], total=max(total, 1))
        self.progress.start()

    def __call__(self, done: int) -> None:
        self.progress.update(self.task, completed=done)

    def close(self) -> None:
        self.progress.refresh()
        self.progress.stop()


def print_hits(hits: Iterable[Hit], fmt: str, out: TextIO) -> None:
    """`synwatch scan`: JSON lines as they come, or a table."""
    from synwatch.lines.match import event_fields  # noqa: PLC0415

    if fmt == "json":
        for hit in hits:
            out.write(dumps({"path": hit.path, "line_no": hit.line_no,
                             **event_fields(hit.event)}) + "\n")
        return
    rows = []
    for hit in hits:
        f = event_fields(hit.event)
        f["where"] = f"{hit.path}:{hit.line_no}"
        f["source"] = (f"{f['source_ip']}/{f['source_port']}" if f["source_ip"] else None)
        rows.append(f)
    table(rows, ["where", "time", "kind", "family", "address", "port", "mode", "source",
                 "trusted"], out)


def print_snapshot(view: dict[str, Any], out: TextIO) -> None:
    out.write(f"netns: {view['netns'] or '(own)'}   " + "  ".join(
        f"{k.rsplit('.', 1)[1]}={v}" for k, v in view["sysctls"].items()) + "\n")
    rows = [{**li, "listener": endpoint(li["address"], li["port"]),
             "prefixes": ", ".join(f"{p['prefix']} ({p['count']})" for p in li["top_prefixes"])
             or None} for li in view["listeners"]]
    table(rows, ["listener", "backlog", "accept_queue", "syn_recv", "prefixes"], out,
          headers=["listener", "backlog", "accept-q", "syn-recv", "top source prefixes"])
    out.write("counters: " + "  ".join(f"{k.split('.', 1)[1]}={v}"
                                       for k, v in sorted(view["counters"].items())) + "\n")
    for line in view["diagnosis"]:
        out.write(f"diagnosis: {line}\n")


def print_incident_rows(rows: list[dict[str, Any]], out: TextIO, with_ids: bool = False,
                        with_hosts: bool = False) -> None:
    """`incidents list` (stored, with ids; with hosts for a fleet) or `replay` (what a
    recording leads to, with each incident's evidence and recommendations below the table)."""
    for row in rows:
        row["listener"] = endpoint(row["address"], row["port"])
    if with_ids:
        for row in rows:
            row["prefixes"] = ", ".join(p["prefix"] for p in row["top_prefixes"][:3]) or None
        hosts = ["host"] if with_hosts else []
        table(rows, ["id", *hosts, "opened_at", "closed_at", "status", "verdict", "trigger",
                     "listener", "peak_syn_recv", "prefixes"], out,
              headers=["id", *hosts, "opened", "closed", "status", "verdict", "trigger",
                       "listener", "peak", "top prefixes"])
        return
    table(rows, ["opened_at", "status", "verdict", "trigger", "listener", "peak_syn_recv"],
          out, headers=["opened", "status", "verdict", "trigger", "listener", "peak"])
    for row in rows:
        for line in row["evidence"] + row["recommendations"]:
            out.write(f"  {row['listener']}: {line}\n")


def print_incident(view: dict[str, Any], reasons: list[str], phases: list[dict[str, Any]],
                   samples: list[dict[str, Any]], out: TextIO, *,
                   details: Sequence[tuple[str, str]] = ()) -> None:
    """`incidents show`: the incident, its evidence, its timeline, its actions."""
    for key in ("id", "host", "netns", "address", "port", "family", "status", "verdict",
                "trigger", "opened_at", "closed_at", "first_evidence_at", "detected_at",
                "peak_syn_recv"):
        out.write(f"{key + ':':<19}{cell(view[key])}\n")
    if view["top_prefixes"]:
        out.write("top prefixes:\n")
        table(view["top_prefixes"], ["prefix", "count", "share", "completed"], out)
    for reason in reasons:
        out.write(f"evidence: {reason}\n")
    for phase in phases:
        out.write(f"phase:             {phase['verdict']} from {phase['at']}\n")
    timeline(samples, out)
    for rec in view["recommendations"]:
        out.write(f"recommendation: {rec}\n")
    if view["actions"]:
        out.write("actions:\n")
        table(view["actions"], ["at", "action", "target", "status"], out)
    for target, detail in details:
        out.write(f"  {target}: {detail}\n")


def timeline(samples: list[dict[str, Any]], out: TextIO) -> None:
    """The evidence over time, one sparkline per measure."""
    if not samples:
        return
    out.write(f"timeline:          {len(samples)} probes, {samples[0]['at']} to "
              f"{samples[-1]['at']}\n")
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
            out.write(f"  {name:<18}{sparkline(values)}  peak {peak:.0f}\n")


def print_status(view: dict[str, Any], out: TextIO) -> None:
    """`synwatch status`: one line each, as `systemctl status` reads."""
    state = (f"running (pid {view['pid']}) since {view['since']}" if view["running"]
             else "not running")
    out.write(f"synwatch: {state}\n")
    if view.get("summary") and view["running"]:
        out.write(f"  {view['summary']}\n")
    for s in view["sources"]:
        lag = f", lag {s['lag_seconds']:.1f} s" if s.get("lag_seconds") is not None else ""
        out.write(f"source {s['name']}: {s['state']}{lag}\n")
    if view.get("store"):
        out.write(f"store: {view['store']} (this node: {view['host']})\n")
    heard = [h["host"] for h in view.get("hosts", []) if h["recent"]]
    if heard and heard != [view["host"]]:
        out.write(f"hosts heard from in the last 2 minutes: {', '.join(heard)}\n")
    spaces = view.get("namespaces") or {}
    if spaces.get("watched", 0) > 1:
        probed = [n["name"] or "(our own)" for n in spaces.get("probed", [])]
        out.write(f"namespaces: {spaces['watched']} watched; probed in full: "
                  f"{', '.join(probed) or 'none'}\n")
    ids = ", ".join(f"#{i}" for i in view["open_incidents"]) or "none"
    out.write(f"open incidents: {ids}\nactive bans: {view['active_bans']}\n")
    drift = view.get("bans_drift") or 0  # bans found not enforced in the kernel, put back
    out.write(f"ban drift: {drift} repaired, the last at {view.get('bans_drift_at')}\n"
              if drift else "ban drift: none\n")
    for e in view["last_errors"]:
        out.write(f"error {e['at'] or ''}: {e['what']}\n")


OPENED_BY = {"log": "the kernel's log line", "counters": "the counters",
             "half_open": "requests held half-open"}


def print_judged(n: int, j: Judged, out: TextIO) -> None:
    """One flood of `synwatch try` and what the service made of it."""
    out.write(f"\n{n}. {j.flood.name} to {endpoint(j.address, j.port)} (backlog "
              f"{j.flood.backlog}): {j.flood.what}\n")
    if not j.incidents:
        out.write(f"   nothing opened (a right judgement: {j.flood.expected})\n")
        return
    for incident, runs in j.incidents:
        mark = "as expected" if incident.verdict == j.flood.expected else \
            f"NOT as expected ({j.flood.expected})"
        out.write(f"   judged {incident.verdict}, {mark}; opened by "
                  f"{OPENED_BY.get(incident.trigger, incident.trigger)}, SYN-RECV peak "
                  f"{incident.peak_syn_recv}, {incident.status}\n")
        for line in (*incident.reasons, *incident.recommendations):
            out.write(f"     {line}\n")
        for run in runs:
            detail = f" ({run.detail})" if run.detail else ""
            out.write(f"     action {run.action} {run.target}: {run.status}{detail}\n")


def print_trial_end(judged: Sequence[Judged], out: TextIO) -> None:
    right = sum(j.as_expected for j in judged)
    out.write(f"\n{right} of {len(judged)} judged as expected.")
    wrong = [j for j in judged if not j.as_expected]
    if wrong:
        out.write(" " + "; ".join(
            f"the {j.flood.name} flood: {', '.join(j.verdicts) or 'nothing opened'} "
            f"(a right judgement: {j.flood.expected})" for j in wrong)
            + ". The [verdict] and [incident] settings of the configuration decide this "
            "(docs/incidents.md).")
    logged = [str(j.port) for j in judged if any(i.trigger == "log" for i, _ in j.incidents)]
    out.write("\nRemoved: the namespaces, their listeners and the throwaway history; nothing on "
              "this host was changed (a dry run).\n")
    if logged:
        ports = f"port{'s' if len(logged) > 1 else ''} {' and '.join(logged)}"
        out.write(f"The kernel's log has its SYN-flood line for {ports} (one per flooded "
                  "listener); a synwatch service watching this host records each as an event, "
                  "and nothing more.\n")
