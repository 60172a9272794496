"""The catalogue's own samples, generated into one test each (fail2ban's samplestestcase idea):
every pattern has a sample, every sample an expectation, no line is matched by two patterns."""

from __future__ import annotations

import re
from datetime import timezone
from pathlib import Path

import pytest

from synwatch.errors import FilterError
from synwatch.lines.catalogue import AnnotatedLine, load_catalogue
from synwatch.lines.match import event_fields, match_record, try_pattern
from synwatch.lines.sinks import parse_line
from tests.support import NOW

CATALOGUE = load_catalogue()
SINK_SAMPLES = [s for s in CATALOGUE.samples if s.file == "sinks.toml"]
FILTER_SAMPLES = [s for s in CATALOGUE.samples if s.file != "sinks.toml"]


def _id(sample: AnnotatedLine) -> str:
    return f"{sample.file}#{sample.index}"


def _expect_value(value: object) -> object:
    return None if value == "" else value  # "" in TOML stands for null


@pytest.mark.parametrize("sample", SINK_SAMPLES, ids=_id)
def test_sink_sample(sample: AnnotatedLine) -> None:
    record = parse_line(sample.line, CATALOGUE, NOW, timezone.utc)
    expect = dict(sample.expect)
    if not expect.pop("match"):
        assert record is None, f"taken as a kernel line by sink {record and record.sink}"
        return
    assert record is not None
    for key, want in expect.items():
        got = record.time.isoformat() if key == "time" and record.time else getattr(record, key)
        assert got == _expect_value(want), key


@pytest.mark.parametrize("sample", FILTER_SAMPLES, ids=_id)
def test_filter_sample(sample: AnnotatedLine) -> None:
    record = parse_line(sample.line, CATALOGUE, NOW, timezone.utc)
    hits = [a for a in (try_pattern(p, record) for p in CATALOGUE.patterns) if a.event] \
        if record else []
    expect = dict(sample.expect)
    if not expect.pop("match"):
        assert hits == [], f"matched by {[h.pattern.qualified_id for h in hits]}"
        return
    assert len(hits) == 1, f"want exactly one pattern, got {[h.pattern.id for h in hits]}"
    event = hits[0].event
    assert event is not None
    assert f"{event.filter}.toml" == sample.file, "matched by a pattern of another filter"
    assert event.pattern == expect.pop("pattern")
    fields = event_fields(event)
    for key, want in expect.items():
        assert fields[key] == _expect_value(want), key


def test_every_pattern_has_a_matching_sample() -> None:
    hit: set[str] = set()
    for sample in FILTER_SAMPLES:
        record = parse_line(sample.line, CATALOGUE, NOW, timezone.utc)
        event = match_record(record, CATALOGUE) if record else None
        if event is not None:
            hit.add(f"{event.filter}/{event.pattern}")
    missing = {p.qualified_id for p in CATALOGUE.patterns} - hit
    assert not missing, f"patterns without a sample: {sorted(missing)}"


def test_every_sink_has_a_sample() -> None:
    used = {s.expect.get("sink") for s in CATALOGUE.samples}
    missing = {s.id for s in CATALOGUE.sinks} - used
    assert not missing, f"sinks without a sample: {sorted(missing)}"


def test_every_filter_file_has_near_miss_samples() -> None:
    for name in {s.file for s in FILTER_SAMPLES}:
        assert any(not s.expect["match"] for s in FILTER_SAMPLES if s.file == name), name


def test_every_matching_line_contains_its_needle() -> None:
    # The scanner only looks at lines with a needle; a pattern that can match without its
    # needle would silently lose lines in `scan`.
    for sample in FILTER_SAMPLES:
        record = parse_line(sample.line, CATALOGUE, NOW, timezone.utc)
        event = match_record(record, CATALOGUE) if record else None
        if event is not None:
            pattern = next(p for p in CATALOGUE.patterns if p.id == event.pattern
                           and p.filter == event.filter)
            assert pattern.needle in sample.line


@pytest.mark.parametrize(("text", "error"), [
    ('[filter]\nname = "f"\nkind = "syn_flood"\n[[pattern]]\nid = "p"\nneedle = "n"\n'
     'regex = "n"\n[[sample]]\nline = "x"\n', "needs expect"),
    ('[filter]\nname = "f"\nkind = "syn_flood"\n[[pattern]]\nid = "p"\nneedle = "n"\n'
     'regex = "{NOPE}"\n', "does not define"),
    ('[filter]\nname = "f"\nkind = "syn_flood"\n[[pattern]]\nid = "p"\nneedle = "n"\n'
     'regex = "(unclosed"\n', "bad regex"),
    ('[filter]\nname = "f"\nkind = "bogus"\n', "kind must be one of"),
    ('[filter]\nname = "f"\nkind = "syn_flood"\n', "defines no [[pattern]]"),
])
def test_malformed_filter_files_are_refused(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "sinks.toml").write_text(
        (Path(__file__).parent.parent / "filters" / "sinks.toml").read_text())
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(FilterError, match=error.replace("[", r"\[").replace("]", r"\]")):
        load_catalogue(tmp_path)


def test_the_conntrack_table_full_line_is_read_in_every_sink() -> None:
    """Every sink sample the sink takes as a SYN-flood line, with the flood's text swapped for
    "table full, dropping packet", yields a conntrack_full event through the same sink."""
    swapped = re.compile(r"TCP: request_sock_TCP(?:v6)?: Possible SYN flooding[^\"]*")
    sinks = set()
    for sample in SINK_SAMPLES:
        if not sample.expect.get("match") or not swapped.search(sample.line):
            continue
        line = swapped.sub("nf_conntrack: nf_conntrack: table full, dropping packet",
                           sample.line)
        before = parse_line(sample.line, CATALOGUE, NOW, timezone.utc)
        if before is None or match_record(before, CATALOGUE) is None:
            continue  # a sample of what is not the kernel's line (kernel[PID]: ...)
        record = parse_line(line, CATALOGUE, NOW, timezone.utc)
        assert record is not None and record.sink == before.sink, line
        event = match_record(record, CATALOGUE)
        assert event is not None and event.kind == "conntrack_full", line
        sinks.add(record.sink)
    assert sinks == {s.id for s in CATALOGUE.sinks}, sinks
