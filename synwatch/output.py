"""Rendering for the CLI: JSON, JSON lines and plain aligned tables."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, TextIO


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
    """An aligned text table; the last column is not padded so long text is not cut."""
    head = [h.upper() for h in (headers or columns)]
    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(head[i])] + [len(b[i]) for b in body]) for i in range(len(columns))]
    for line in [head, *body]:
        out.write("  ".join(v.ljust(widths[i]) if i < len(line) - 1 else v
                            for i, v in enumerate(line)).rstrip() + "\n")


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
