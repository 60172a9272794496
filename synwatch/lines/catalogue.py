"""Loads the filter catalogue (filters/*.toml): sinks, kernel message patterns and their samples.

The catalogue is data; this module only reads it, expands ``{NAME}`` fragments from ``[define]``,
compiles the regexes and checks that each entry has the fields it needs.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from synwatch.errors import FilterError
from synwatch.lines.timeparse import TIME_FORMATS
from synwatch.records import EventKind

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_FRAGMENT = re.compile(r"\{([A-Z][A-Z0-9_]*)\}")
_KINDS: tuple[EventKind, ...] = ("syn_flood", "drop_open_request", "conntrack_full")
_PARSERS = ("journal-json", "kmsg")


@dataclass(frozen=True, slots=True)
class Sink:
    id: str
    description: str
    regex: re.Pattern[str]
    parser: str | None
    time_format: str


@dataclass(frozen=True, slots=True)
class Pattern:
    filter: str
    kind: EventKind
    id: str
    kernels: str
    needle: str
    family: int | None
    regex: re.Pattern[str]

    @property
    def qualified_id(self) -> str:
        return f"{self.filter}/{self.id}"


@dataclass(frozen=True, slots=True)
class AnnotatedLine:
    file: str
    index: int
    line: str
    expect: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Catalogue:
    sinks: tuple[Sink, ...]
    patterns: tuple[Pattern, ...]
    samples: tuple[AnnotatedLine, ...]

    @property
    def needles(self) -> tuple[bytes, ...]:
        """The distinct literals a matching line must contain, for the substring pre-filter."""
        return tuple(dict.fromkeys(p.needle.encode() for p in self.patterns))

    @property
    def text_needles(self) -> tuple[str, ...]:
        """The same needles, for sources that see decoded text."""
        return tuple(n.decode() for n in self.needles)


def default_filter_dir() -> Path:
    """``synwatch/filters`` in an installed wheel, else ``filters/`` at the top of a checkout."""
    here = Path(__file__).resolve().parent.parent  # the synwatch package
    for candidate in (here / "filters", here.parent / "filters"):
        if (candidate / "sinks.toml").is_file():
            return candidate
    raise FilterError("filters", f"no filter catalogue next to {here}")


def _expand(text: str, defines: dict[str, str], where: str) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in defines:
            raise FilterError(where, f"regex uses {{{name}}}, which [define] does not define")
        return defines[name]

    return _FRAGMENT.sub(repl, text)


def _compile(text: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise FilterError(where, f"bad regex: {exc}") from exc


def _str(table: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise FilterError(where, f"{key} must be a non-empty string")
    return value


def _samples(doc: dict[str, Any], file: str) -> list[AnnotatedLine]:
    out = []
    for i, raw in enumerate(doc.get("sample", []), start=1):
        where = f"{file}: sample {i}"
        if not isinstance(raw, dict):
            raise FilterError(where, "must be a table")
        line = _str(raw, "line", where)
        expect = raw.get("expect")
        if not isinstance(expect, dict) or not isinstance(expect.get("match"), bool):
            raise FilterError(where, "needs expect = { match = true|false, ... }")
        out.append(AnnotatedLine(file, i, line, expect))
    return out


def _load_sinks(doc: dict[str, Any], file: str, defines: dict[str, str]) -> list[Sink]:
    sinks = []
    for i, raw in enumerate(doc.get("sink", []), start=1):
        where = f"{file}: sink {i}"
        sink_id = _str(raw, "id", where)
        where = f"{file}: sink {sink_id}"
        parser = raw.get("parser")
        if parser is not None and parser not in _PARSERS:
            raise FilterError(where, f"parser must be one of {', '.join(_PARSERS)}")
        time_format = raw.get("time_format", "none")
        if parser is None and time_format not in TIME_FORMATS:
            raise FilterError(where, f"time_format must be one of {', '.join(TIME_FORMATS)}")
        regex = _compile(_expand(_str(raw, "regex", where), defines, where), where)
        if parser != "journal-json" and "message" not in regex.groupindex:
            raise FilterError(where, "regex needs a (?P<message>...) group")
        sinks.append(Sink(sink_id, raw.get("description", ""), regex, parser, time_format))
    return sinks


def _load_patterns(doc: dict[str, Any], file: str, defines: dict[str, str]) -> list[Pattern]:
    head = doc.get("filter")
    if not isinstance(head, dict):
        raise FilterError(file, "needs a [filter] table with name and kind")
    name = _str(head, "name", f"{file}: [filter]")
    kind = head.get("kind")
    if kind not in _KINDS:
        raise FilterError(f"{file}: [filter]", f"kind must be one of {', '.join(_KINDS)}")
    patterns = []
    for i, raw in enumerate(doc.get("pattern", []), start=1):
        where = f"{file}: pattern {i}"
        pid = _str(raw, "id", where)
        where = f"{file}: pattern {pid}"
        needle = _str(raw, "needle", where)
        family = raw.get("family")
        if family not in (None, 4, 6):
            raise FilterError(where, "family must be 4 or 6")
        # Anchored at the start of the kernel text, so quoted text never matches.
        regex = _compile("(?:" + _expand(_str(raw, "regex", where), defines, where) + ")", where)
        patterns.append(Pattern(name, cast(EventKind, kind), pid, raw.get("kernels", ""), needle,
                                family, regex))
    if not patterns:
        raise FilterError(file, "defines no [[pattern]]")
    return patterns


@lru_cache(maxsize=4)
def load_catalogue(directory: Path | None = None) -> Catalogue:
    directory = directory or default_filter_dir()
    sinks: list[Sink] = []
    patterns: list[Pattern] = []
    samples: list[AnnotatedLine] = []
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise FilterError(str(directory), "holds no *.toml filter files")
    for path in files:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise FilterError(str(path), str(exc)) from exc
        defines = {k: str(v) for k, v in doc.get("define", {}).items()}
        if "sink" in doc:
            sinks.extend(_load_sinks(doc, path.name, defines))
        else:
            patterns.extend(_load_patterns(doc, path.name, defines))
        samples.extend(_samples(doc, path.name))
    if not sinks:
        raise FilterError(str(directory), "has no sinks.toml with [[sink]] entries")
    seen: set[str] = set()
    for p in patterns:
        if p.qualified_id in seen:
            raise FilterError(str(directory), f"pattern {p.qualified_id} is defined twice")
        seen.add(p.qualified_id)
    return Catalogue(tuple(sinks), tuple(patterns), tuple(samples))
