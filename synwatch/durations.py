"""Durations as people write them in config files and on the command line: 90s, 15m, 1h30m, 2d."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> float:
    """Seconds in ``text``; raises ValueError with a message fit for the user."""
    compact = text.strip().replace(" ", "")
    if not compact:
        raise ValueError('expected a duration like "90s", "15m", "1h30m" or "2d", got ""')
    pos, total = 0, 0.0
    for m in _PART.finditer(compact):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(compact):
        raise ValueError(
            f'expected a duration like "90s", "15m", "1h30m" or "2d", got "{text}"')
    return total


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
