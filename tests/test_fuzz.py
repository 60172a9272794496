"""Any line in, a record or a typed rejection out, never another exception: the sink parsers
(every log format, journal JSON, raw kmsg records), the filters, and the time parsers.

A local user can write anything into a followed syslog file (`logger`), so one line must never
stop synwatch. Property-based tests shrink what they find; a deterministic run of 100,000
mutated real lines (the corpus and every annotated sample, with digit runs blown up, bytes
flipped, lines cut and joined) covers the shapes a random string rarely hits. Crashing inputs
found once stay below as regression samples.
"""

from __future__ import annotations

import csv
import json
import random
import re
from datetime import timezone
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synwatch.lines import journalfold
from synwatch.lines.catalogue import Catalogue
from synwatch.lines.match import match_record
from synwatch.lines.sinks import BAD_LINES, BadLines, parse_line
from synwatch.records import KernelEvent, LogRecord
from tests.support import NOW, REPO

MUTATED_LINES = 100_000
# Inputs that once raised (issue: "nothing a local user writes can stop synwatch").
REGRESSIONS = [
    "Nov 21 12:00:00 web01 kernel: TCP: request_sock_TCP: Possible SYN flooding on port "
    "0.0.0.0:" + "9" * 5000 + ". Sending cookies.",
    json.dumps({"MESSAGE": "TCP: request_sock_TCP: Possible SYN flooding on port 0.0.0.0:80. "
                "Sending cookies.", "_TRANSPORT": "kernel", "SYSLOG_FACILITY": "0",
                "__REALTIME_TIMESTAMP": "9" * 40}),
    json.dumps({"MESSAGE": "x", "_TRANSPORT": "kernel", "__REALTIME_TIMESTAMP": "9" * 5000}),
    "<" + "6" * 5000 + ">Nov 21 12:00:00 web01 kernel: TCP: Possible SYN flooding on port 80. "
    "Sending cookies.",
    "[" * 100_000 + "]" * 100_000,
    "6," + "1" * 5000 + "," + "2" * 5000 + ",-;TCP: request_sock_TCP: Possible SYN flooding on "
    "port 0.0.0.0:80. Sending cookies.",
    "TCP: drop open request from 203.0.113.7/" + "5" * 5000,
]


def _check(line: str, catalogue: Catalogue) -> None:
    """Rejected by design, not by an exception the isolation swallowed (BAD_LINES counts those:
    they are for bugs still unknown, and a fuzz test is how they become known)."""
    before = sum(BAD_LINES.counts.values())
    record = parse_line(line, catalogue, NOW, timezone.utc)
    assert record is None or isinstance(record, LogRecord)
    if record is not None:
        event = match_record(record, catalogue)
        assert event is None or isinstance(event, KernelEvent)
        if event is not None and event.port is not None:
            assert 0 <= event.port <= 65535
    assert sum(BAD_LINES.counts.values()) == before, line[:300]


@pytest.mark.parametrize("line", REGRESSIONS, ids=range(len(REGRESSIONS)))
def test_lines_that_once_raised_are_rejected(line: str, catalogue: Catalogue) -> None:
    _check(line, catalogue)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_any_text_is_a_record_or_nothing(catalogue: Catalogue, line: str) -> None:
    _check(line, catalogue)


_FIELD = st.one_of(st.text(max_size=40), st.integers(), st.floats(), st.none(), st.booleans(),
                   st.lists(st.integers(-5, 300), max_size=10),
                   st.text(alphabet="0123456789", min_size=1, max_size=6000))


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["MESSAGE", "_TRANSPORT", "SYSLOG_FACILITY",
                                        "SYSLOG_IDENTIFIER", "__REALTIME_TIMESTAMP",
                                        "__CURSOR", "_HOSTNAME", "PRIORITY"]), _FIELD))
def test_any_journal_entry_is_a_record_or_nothing(catalogue: Catalogue,
                                                  entry: dict[str, object]) -> None:
    _check(json.dumps(entry), catalogue)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet="0123456789,;-c", max_size=40), st.text(max_size=120))
def test_any_kmsg_record_is_a_record_or_nothing(catalogue: Catalogue, head: str,
                                               message: str) -> None:
    _check(f"{head};{message}", catalogue)


def _seed_lines(catalogue: Catalogue) -> list[str]:
    lines = [s.line for s in catalogue.samples]
    corpus = REPO / "tests" / "data" / "corpus" / "kernel-lines.tsv"
    if corpus.is_file():  # its `line` column (quoted where it holds a '"')
        with corpus.open(newline="", encoding="utf-8") as f:
            lines.extend(row["line"] for row in csv.DictReader(f, delimiter="\t"))
    return [line for line in lines if line]


def _mutate(line: str, rng: random.Random) -> str:
    choice = rng.randrange(7)
    if choice == 0:  # a digit run blown up
        digits = [i for i, c in enumerate(line) if c.isdigit()]
        if digits:
            i = rng.choice(digits)
            return line[:i] + "9" * rng.choice((6, 50, 5000)) + line[i:]
    if choice == 1:  # bytes flipped
        chars = list(line)
        for _ in range(rng.randint(1, 4)):
            if chars:
                chars[rng.randrange(len(chars))] = chr(rng.randrange(0x20, 0x2FF))
        return "".join(chars)
    if choice == 2:  # cut short
        return line[:rng.randrange(len(line) + 1)]
    if choice == 3:  # two lines run together
        return line + line[rng.randrange(len(line) + 1):]
    if choice == 4:  # a field removed
        parts = line.split(" ")
        if len(parts) > 1:
            del parts[rng.randrange(len(parts))]
        return " ".join(parts)
    if choice == 5:  # a number made negative or huge
        return line.replace(":", ":-", 1) if rng.random() < 0.5 else line.replace(
            "port ", "port 99999999999999999999", 1)
    return line + rng.choice(["\x00", "\ufffd", "]]", "}", '"', "\\", " " * 300])


def test_a_hundred_thousand_mutated_lines(catalogue: Catalogue) -> None:
    rng = random.Random(20261202)  # fixed: a failure names its line and reproduces
    seeds = _seed_lines(catalogue)
    assert len(seeds) > 100
    matched, bad = 0, sum(BAD_LINES.counts.values())
    for n in range(MUTATED_LINES):
        line = _mutate(rng.choice(seeds), rng)
        try:
            record = parse_line(line, catalogue, NOW, timezone.utc)
            event = match_record(record, catalogue) if record is not None else None
        except Exception as exc:  # the test names the line that raised
            pytest.fail(f"line {n} raised {exc!r}: {line[:300]!r}")
        matched += event is not None
        if sum(BAD_LINES.counts.values()) != bad:
            pytest.fail(f"line {n} made a parser raise: {line[:300]!r}")
    assert 0 < matched < MUTATED_LINES  # the mutations kept some lines kernel lines


def _fragments() -> list[bytes]:
    """Whole entries and single lines of journalctl's record modes (tests/data/journal-modes),
    for folds to take apart."""
    out: list[bytes] = []
    for name, starts in (("journal-verbose", rb"\n(?=\S)"), ("journal-export", rb"(?<=\n\n)"),
                         ("journal-json-pretty", rb"\n(?=\{)")):
        data = (REPO / "tests" / "data" / "journal-modes" / f"{name}.txt").read_bytes()
        out.extend(entry.rstrip(b"\n") for entry in re.split(starts, data))
        out.extend(data.split(b"\n")[:40])
    return [*out, b"", b"-- Boot 5350d6e1587f421884e0bb3821052c03 --", b"MESSAGE", b"{", b"}",
            b"    MESSAGE=", b"       more", b"\x10\x00\x00\x00\x00\x00\x00\x00"]


FRAGMENTS = _fragments()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["verbose", "export", "json-pretty"]),
       st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=40), max_size=60),
       st.integers(1, 97))
def test_any_bytes_fold_the_same_whatever_the_chunks(kind: journalfold.Layout,
                                                    parts: list[bytes], chunk: int) -> None:
    """Whatever a file of a record mode holds, its folds are single lines holding a needle, the
    same however the reads cut it and whether or not the entries without one are skipped whole,
    and nothing raises."""
    data = b"\n".join(parts)
    needles = (b"SYN flooding on port",)
    whole = list(journalfold.fold([data], kind, needles))
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    assert list(journalfold.fold(pieces, kind, needles)) == whole
    with mock.patch.object(journalfold._Reader, "skip_quiet", return_value=False):
        assert list(journalfold.fold([data], kind, needles)) == whole
    for line_no, line in whole:
        assert b"\n" not in line and b"SYN flooding on port" in line
        assert 1 <= line_no <= data.count(b"\n") + 1


def test_scan_reports_and_skips_a_poison_line(tmp_path: Path) -> None:
    from tests.support.cli import synwatch

    log = tmp_path / "syslog"
    good = ("Nov 21 12:00:00 web01 kernel: TCP: request_sock_TCP: Possible SYN flooding on "
            "port 0.0.0.0:443. Sending cookies.")
    log.write_text("\n".join([good, REGRESSIONS[0], good]) + "\n")
    r = synwatch("scan", "--count", str(log))
    assert (r.code, r.out.strip()) == (0, "2"), r.err


def test_a_line_that_makes_a_parser_raise_is_counted_logged_once_and_skipped(
        catalogue: Catalogue, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """For the bugs no fuzzer found yet: the line is skipped, counted per source, and logged
    once a minute per source, and the reader goes on."""
    from synwatch.lines import sinks

    def explode(*_args: object, **_kw: object) -> None:
        raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")

    bad = BadLines()
    monkeypatch.setattr(sinks, "BAD_LINES", bad)
    monkeypatch.setattr(sinks, "_parse", explode)
    caplog.set_level("WARNING", logger="synwatch.lines.sinks")
    for _ in range(3):
        assert parse_line("poison", catalogue, NOW, timezone.utc, source="file:/x") is None
    assert parse_line("poison", catalogue, NOW, timezone.utc, source="kmsg") is None
    assert bad.counts == {"file:/x": 3, "kmsg": 1}
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2  # once per source within the minute
    assert warned[0].startswith("file:/x: a line that cannot be parsed is skipped (ValueError")


def test_scan_and_import_exit_1_when_lines_were_skipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The output is short of the lines a parser choked on: the exit status says so."""
    from synwatch import cli
    from synwatch.lines import sinks

    log = tmp_path / "syslog"
    good = ("Nov 21 12:00:00 web01 kernel: TCP: request_sock_TCP: Possible SYN flooding on "
            "port 0.0.0.0:443. Sending cookies.")
    log.write_text(f"{good}\n{good.replace('443', '444')}\n")
    real = sinks._parse

    def choke_on_444(line: str, *args: object, **kw: object) -> object:
        if "0.0.0.0:444" in line:
            raise ValueError("a bug no fuzzer found")
        return real(line, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(cli, "setup_logging", lambda _debug, **_kw: None)  # pytest's stays
    monkeypatch.setattr(sinks, "BAD_LINES", BadLines())
    monkeypatch.setattr(sinks, "_parse", choke_on_444)
    assert cli.main(["scan", "--count", str(log)]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == "1"
    assert "synwatch: scan: 1 lines could not be parsed and were skipped" in err
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/h.db"\n')
    assert cli.main(["import", "--config", str(config), str(log)]) == 1
    out, err = capsys.readouterr()
    assert "1 kernel lines, 1 new events" in out
    monkeypatch.setattr(sinks, "BAD_LINES", BadLines())
    monkeypatch.setattr(sinks, "_parse", real)
    assert cli.main(["scan", "--count", str(log)]) == 0


PROC_TEXT = st.text(alphabet="0123456789abcdefABCDEF: \n\tTcpExtentries drop_x", max_size=400)


@settings(max_examples=2000, deadline=None)
@given(PROC_TEXT | st.text(max_size=200))
def test_any_proc_table_is_numbers_or_nothing(text: str) -> None:
    """/proc/net/stat/nf_conntrack (hex rows per CPU) and /proc/net/netstat, snmp (header and
    value lines): whatever they hold, the parsers give numbers for what they understand and
    skip the rest."""
    from synwatch.probes.conntrack import parse_stat
    from synwatch.probes.procnet import COUNTERS, counters_in

    for parsed in (parse_stat(text), counters_in(text)):
        assert all(isinstance(k, str) and isinstance(v, int) for k, v in parsed.items())
    assert set(counters_in(text)) <= set(COUNTERS)


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=300))
def test_any_tool_output_gives_one_line_of_reason(output: str) -> None:
    from synwatch.system.runner import reason

    said = reason(output)
    assert isinstance(said, str) and "\n" not in said and said


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300) | st.builds(
    lambda q, t: json.dumps({"type": "settings", "quiet_period": q, "thresholds": t}),
    st.one_of(st.floats(allow_nan=True), st.text(max_size=5), st.none()),
    st.dictionaries(st.text(max_size=20), st.integers() | st.text(max_size=5), max_size=4)))
def test_any_recording_head_is_settings_nothing_or_a_usage_error(first: str) -> None:
    """A recording's first line, whatever it is: its settings, None, or a UsageError naming
    the file; never another exception."""
    import tempfile

    from synwatch.config import Thresholds
    from synwatch.detect.replay import recorded_settings
    from synwatch.errors import UsageError

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.jsonl"
        path.write_text(first + "\n", encoding="utf-8", errors="surrogatepass")
        refused: UsageError | None = None
        try:
            got = recorded_settings(str(path))
        except UsageError as exc:
            refused, got = exc, None
        if refused is not None:
            assert refused.subject == f"{path}:1"
        else:
            assert got is None or (isinstance(got[0], Thresholds) and isinstance(got[1], float))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200) | st.builds(
    lambda now, gone: json.dumps({"type": "probe_failed", "now": now, "gone": gone}),
    st.one_of(st.text(max_size=30), st.integers(), st.none(),
              st.datetimes(timezones=st.just(timezone.utc)).map(lambda d: d.isoformat())),
    st.one_of(st.booleans(), st.integers(), st.text(max_size=5), st.none())))
def test_any_recording_line_is_an_item_or_a_usage_error(line: str) -> None:
    """A recording line after the settings, a failed probe's included: an item for the replay,
    or a UsageError naming the file and line; never another exception."""
    import tempfile

    from synwatch.detect.replay import read
    from synwatch.errors import UsageError

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.jsonl"
        path.write_text(line + "\n", encoding="utf-8", errors="surrogatepass")
        refused: UsageError | None = None
        try:
            items = list(read(str(path)))
        except UsageError as exc:
            refused, items = exc, []
        if refused is not None:  # splitlines() also splits at \x1c-\x1e, \x85, \u2028 ...
            assert re.fullmatch(rf"{re.escape(str(path))}:\d+", refused.subject), refused.subject
        assert len(items) <= len(line.splitlines())


@settings(max_examples=1500, deadline=None)
@given(PROC_TEXT | st.text(max_size=300) | st.builds(
    lambda h, v: f"TcpExt: {h}\nTcpExt: {v}\nTcp: {h}\nTcp: {v}\n",
    st.text(alphabet="SyncookiesSentInSegsPassiveOpens 0123456789-x", max_size=80),
    st.text(alphabet="0123456789 -x+", max_size=80)))
def test_any_counter_file_of_a_quiet_namespace_is_numbers_or_nothing(text: str) -> None:
    """What a sweep reads of a quiet namespace (/proc/PID/net/netstat and snmp, as the kernel
    or anything in its place writes them): its counters, or None; never an exception, which
    would stop the service's loop."""
    import tempfile

    from synwatch.probes.procnet import segments_in, stirring

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "netstat"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        for got in (stirring(path), segments_in(path)):
            assert got is None or all(isinstance(n, int) for n in got)


@settings(max_examples=1500, deadline=None)
@given(st.text(max_size=300) | st.builds(
    lambda n, c, p: f"{n}:{c}:{p}\n",
    st.text(alphabet="0123456789", max_size=3), st.text(alphabet="cpu,memory=name", max_size=20),
    st.text(alphabet="/docker-libpod-cri-containerd.scopeslicekubepods0123456789abcdef_:",
            max_size=160)))
def test_any_cgroup_file_is_a_container_or_none(text: str) -> None:
    """/proc/PID/cgroup of any process, a container's own included: a (runtime, id) or None."""
    from synwatch.system.owners import container_in_cgroup

    got = container_in_cgroup(text)
    assert got is None or (isinstance(got[0], str) and isinstance(got[1], str) and got[1])
