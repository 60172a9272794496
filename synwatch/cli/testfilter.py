"""`synwatch test-filter`: like fail2ban-regex, shows what the catalogue makes of a line or file.

For a line: the sink that took it apart, every pattern tried, what the hit extracted and why the
others missed. For a file: hits per pattern and sink, and the near misses (lines holding a
needle that did not become a kernel event), which is where a new kernel format would show up.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from typing import TextIO

from synwatch.cli.render import cell
from synwatch.clock import local_timezone
from synwatch.lines.catalogue import Catalogue, load_catalogue
from synwatch.lines.match import explain
from synwatch.lines.scan import candidates, open_input
from synwatch.lines.sinks import parse_line
from synwatch.records import KernelEvent


def _fields(event: KernelEvent) -> str:
    return (f"kind={event.kind} family={cell(event.family)} address={cell(event.address)} "
            f"port={cell(event.port)} mode={cell(event.mode)} "
            f"source_ip={cell(event.source_ip)} source_port={cell(event.source_port)}")


def explain_line(line: str, out: TextIO, catalogue: Catalogue | None = None) -> int:
    catalogue = catalogue or load_catalogue()
    now, tz = datetime.now(timezone.utc), local_timezone()
    out.write(f"line:     {line}\n")
    record = parse_line(line, catalogue, now, tz)
    if record is None:
        out.write("sink:     none: a sink recognised the line but it is not a kernel line "
                  "(a non-kern facility, a journal entry from userspace, bad JSON)\n")
        out.write("result:   no match\n")
        return 0
    sink = next(s for s in catalogue.sinks if s.id == record.sink)
    out.write(f"sink:     {sink.id} ({sink.description})\n")
    out.write(f"          time={cell(record.time.isoformat() if record.time else None)} "
              f"host={cell(record.host)} trusted={cell(record.trusted)}\n")
    out.write(f"message:  {record.message}\n")
    out.write("patterns:\n")
    hit: KernelEvent | None = None
    for attempt in explain(record, catalogue):
        p = attempt.pattern
        if attempt.event is not None:
            hit = hit or attempt.event
            out.write(f"  HIT   {p.qualified_id}  [{p.kernels}]\n")
            out.write(f"        {_fields(attempt.event)}\n")
        else:
            out.write(f"  miss  {p.qualified_id}: {attempt.why}\n")
    if hit is None:
        out.write("result:   no match\n")
    else:
        trust = "trusted" if hit.trusted else "untrusted (text can be written by any local user)"
        out.write(f"result:   {hit.kind}, {trust}\n")
    return 0


def explain_file(path: str, out: TextIO, show_misses: int = 20,
                 catalogue: Catalogue | None = None) -> int:
    catalogue = catalogue or load_catalogue()
    now, tz = datetime.now(timezone.utc), local_timezone()
    per_pattern: Counter[str] = Counter()
    per_sink: Counter[str] = Counter()
    trusted = seen = 0
    misses: list[tuple[int, str, str]] = []
    stream = open_input(path)
    try:
        for c in candidates(stream, catalogue, now=now, tz=tz):
            seen += 1
            line, record, event = c.raw.decode("utf-8", "replace"), c.record, c.event
            line_no = c.line_no
            if event is None:
                why = (f"sink {record.sink}: no pattern matches the message" if record
                       else "not a kernel line (facility, userspace journal entry)")
                misses.append((line_no, why, line))
                continue
            per_pattern[f"{event.filter}/{event.pattern}"] += 1
            per_sink[record.sink if record else "?"] += 1
            trusted += event.trusted
    finally:
        stream.close()
    matched = sum(per_pattern.values())
    out.write(f"Lines with a needle: {seen}, matched: {matched} "
              f"({trusted} trusted), near misses: {len(misses)}\n\n")
    out.write("Patterns:\n")
    width = max(len(p.qualified_id) for p in catalogue.patterns)
    for p in catalogue.patterns:
        out.write(f"  {p.qualified_id:<{width}}  {per_pattern[p.qualified_id]:>8}  "
                  f"[{p.kernels}]\n")
    out.write("\nSinks:\n")
    for sink_id, count in per_sink.most_common():
        out.write(f"  {sink_id:<{width}}  {count:>8}\n")
    if misses:
        shown = misses[:show_misses]
        out.write(f"\nNear misses (lines with a needle that are not kernel events), "
                  f"{len(shown)} of {len(misses)}:\n")
        for line_no, why, line in shown:
            out.write(f"  line {line_no}: {why}\n    {line}\n")
    return 0
