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
