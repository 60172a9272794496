"""The kernel-line corpus (tests/data/corpus/kernel-lines.tsv, kept in the repository so a clone
is self-contained): every row yields what its columns say.

Flood rows: kind, port, address (without brackets), family and mode. drop-open-request rows: the
source address. suppressed and lookalike rows: no match. injected-userspace rows: no match, or a
match that is not trusted.
"""

from __future__ import annotations

import csv
import json
import os
from datetime import timezone
from pathlib import Path

import pytest

from synwatch.lines.match import event_fields, match_record
from synwatch.lines.sinks import parse_line
from tests.support import NOW, REPO
from tests.support.cli import synwatch

CORPUS = Path(os.environ.get("SYNWATCH_CORPUS",
                             REPO / "tests" / "data" / "corpus" / "kernel-lines.tsv"))


def _rows() -> list[dict[str, str]]:
    with CORPUS.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


ROWS = _rows()
ACCEPT = {"flood-cookies": "cookies", "flood-drop": "drop", "drop-open-request": None,
          "conntrack-full": None}
# Journal entries read as journal JSON (json-sse, json-seq, and the record modes folded into one
# line): a kernel entry is trusted as far as the reader allows, as -o json's is.
JOURNAL_FORMATS = {"journal-json", "journal-json-sse", "journal-json-seq", "journal-json-pretty",
                   "journal-export", "journal-verbose"}


def test_corpus_is_all_there() -> None:
    assert len(ROWS) >= 100
    assert {r["kind"] for r in ROWS} >= {*ACCEPT, "suppressed", "unrelated-lookalike",
                                         "injected-userspace"}


@pytest.mark.parametrize("row", ROWS, ids=[f"{i + 2}-{r['format']}-{r['kind']}"
                                           for i, r in enumerate(ROWS)])
def test_row(row: dict[str, str], catalogue: object) -> None:
    record = parse_line(row["line"], catalogue, NOW, timezone.utc)  # type: ignore[arg-type]
    event = match_record(record, catalogue) if record else None  # type: ignore[arg-type]
    kind = row["kind"]
    if kind == "injected-userspace":
        assert event is None or not event.trusted
        return
    if kind not in ACCEPT:
        assert event is None, f"{kind} line matched as {event and event.pattern}"
        return
    assert event is not None, "kernel line not recognised"
    f = event_fields(event)
    if kind == "conntrack-full":  # no port: the table is the namespace's (ip_conntrack: v4)
        family = int(row["family"]) if row["family"] else None
        assert (f["kind"], f["family"], f["port"]) == ("conntrack_full", family, None)
        return
    assert f["family"] == int(row["family"])
    if kind == "drop-open-request":
        assert f["kind"] == "drop_open_request"
        redacted = "redacted" in row["source_ip"]
        assert f["source_ip"] == (None if redacted else row["source_ip"])
        assert f["port"] is None
        return
    assert f["kind"] == "syn_flood"
    assert f["mode"] == ACCEPT[kind]
    assert f["port"] == (int(row["port"]) if row["port"] else None)
    assert f["address"] == (row["address"].strip("[]") or None)
    assert f["trusted"] == (row["format"] in JOURNAL_FORMATS)


def test_whole_corpus_through_scan(tmp_path: Path) -> None:
    log = tmp_path / "mixed.log"
    log.write_text("".join(r["line"] + "\n" for r in ROWS), encoding="utf-8")
    res = synwatch("scan", "--format", "json", str(log))
    assert res.code == 0, res.err
    hits = [json.loads(line) for line in res.out.splitlines()]
    expected_lines = [i for i, r in enumerate(ROWS, start=1)
                      if r["kind"] in ACCEPT and r["kind"] != "conntrack-full"]
    got_lines = [h["line_no"] for h in hits if ROWS[h["line_no"] - 1]["kind"] in ACCEPT
                 and ROWS[h["line_no"] - 1]["kind"] != "conntrack-full"]
    assert got_lines == expected_lines
    for h in hits:
        row = ROWS[h["line_no"] - 1]
        assert row["kind"] in ACCEPT or row["kind"] == "injected-userspace"
        assert set(h) == {"path", "line_no", "kind", "family", "address", "port", "mode",
                          "source_ip", "source_port", "time", "trusted"}
    count = synwatch("scan", "--count", str(log))
    assert count.out.strip() == str(len(hits))
    # scan's JSON names two kinds (the interface contract): the conntrack lines come with --all
    assert not any(h["kind"] == "conntrack_full" for h in hits)
    every = [json.loads(line) for line in synwatch("scan", "--all", "--format", "json",
                                                   str(log)).out.splitlines()]
    assert [h["line_no"] for h in every if h["kind"] == "conntrack_full"] == [
        i for i, r in enumerate(ROWS, start=1) if r["kind"] == "conntrack-full"]
