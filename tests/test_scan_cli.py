"""`synwatch scan` as a user runs it: formats, --count, .gz, stdin, several paths, bad input."""

from __future__ import annotations

import csv
import gzip
import io
import json
import struct
from datetime import datetime, timezone
from pathlib import Path

import pytest

from synwatch.lines import journalfold
from synwatch.lines import scan as scan_module
from synwatch.lines.catalogue import Catalogue
from synwatch.lines.scan import candidate_lines, candidates, open_input
from synwatch.store import History
from tests.support import DATA
from tests.support.cli import synwatch

FLOOD = ("Mar  7 09:17:14 web01 kernel: TCP: request_sock_TCP: Possible SYN flooding on port "
         "0.0.0.0:443. Sending cookies.")
JOURNAL = ('{"__REALTIME_TIMESTAMP":"1747767878271828","_TRANSPORT":"kernel","SYSLOG_FACILITY":'
           '"0","SYSLOG_IDENTIFIER":"kernel","MESSAGE":"TCP: request_sock_TCPv6: Possible SYN '
           'flooding on port [::]:8443. Dropping request."}')
KMSG = "6,1234,5678901,-;TCP: drop open request from 2001:0db8:0000:0000:0000:0000:0000:0001/40404"
NOISE = "Mar  7 09:17:15 web01 sshd[42]: Accepted publickey for root from 192.0.2.1 port 5000"


@pytest.fixture
def mixed_log(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.log"
    path.write_text("\n".join([NOISE, FLOOD, NOISE, JOURNAL, NOISE, KMSG]) + "\n")
    return path


def test_json_lines_follow_the_contract(mixed_log: Path) -> None:
    res = synwatch("scan", "--format", "json", str(mixed_log))
    assert res.code == 0, res.err
    rows = [json.loads(line) for line in res.out.splitlines()]
    assert [r["line_no"] for r in rows] == [2, 4, 6]
    first, second, third = rows
    assert first == {"path": str(mixed_log), "line_no": 2, "kind": "syn_flood", "family": 4,
                     "address": "0.0.0.0", "port": 443, "mode": "cookies", "source_ip": None,
                     "source_port": None, "time": "2026-03-07T09:17:14+00:00", "trusted": False}
    assert second["address"] == "::" and second["family"] == 6 and second["mode"] == "drop"
    assert second["time"] == "2025-05-20T19:04:38.271828+00:00"
    assert second["trusted"] is True
    assert third["kind"] == "drop_open_request" and third["source_ip"] == "2001:db8::1"
    assert third["source_port"] == 40404 and third["trusted"] is True and third["time"] is None


def test_count_table_gz_and_stdin_agree(mixed_log: Path, tmp_path: Path) -> None:
    gz = tmp_path / "mixed.log.1.gz"
    gz.write_bytes(gzip.compress(mixed_log.read_bytes()))
    assert synwatch("scan", "--count", str(mixed_log)).out == "3\n"
    assert synwatch("scan", "--count", str(gz)).out == "3\n"
    assert synwatch("scan", "--count", "-", stdin=mixed_log.read_text()).out == "3\n"
    assert synwatch("scan", "--count", str(mixed_log), str(gz)).out == "6\n"
    table = synwatch("scan", str(gz)).out.splitlines()
    assert table[0].split()[:4] == ["WHERE", "TIME", "KIND", "FAMILY"]
    assert len(table) == 4 and f"{gz}:6" in table[3] and "2001:db8::1/40404" in table[3]
    stdin_json = synwatch("scan", "--format", "json", "-", stdin=mixed_log.read_text()).out
    assert json.loads(stdin_json.splitlines()[0])["path"] == "-"


def test_crlf_lines_and_a_missing_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "crlf.log"
    path.write_bytes(f"{NOISE}\r\n{FLOOD}\r\n{NOISE}\r\n{FLOOD}".encode())
    out = synwatch("scan", "--format", "json", str(path)).out
    rows = [json.loads(x) for x in out.splitlines()]
    assert [(r["line_no"], r["port"]) for r in rows] == [(2, 443), (4, 443)]


def test_binary_garbage_does_not_stop_the_scan(tmp_path: Path) -> None:
    path = tmp_path / "junk.log"
    path.write_bytes(b"\xff\xfe\x00garbage\n" + FLOOD.encode()
                     + b"\n\x80\x81 SYN flooding on port\n")
    assert synwatch("scan", "--count", str(path)).out == "1\n"


def test_missing_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    res = synwatch("scan", str(tmp_path / "nope.log"))
    assert res.code == 2
    assert res.err == f"synwatch: {tmp_path / 'nope.log'}: No such file or directory\n"


def test_corrupt_gzip_is_a_runtime_failure(tmp_path: Path) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 20)
    res = synwatch("scan", "--count", str(path))
    assert res.code == 1
    assert res.err.startswith(f"synwatch: {path}: ") and res.err.count("\n") == 1


def test_bad_usage_is_one_line_and_exit_2() -> None:
    res = synwatch("scan", "--format", "xml", "x")
    assert res.code == 2
    assert res.err.startswith("synwatch: scan: argument --format: invalid choice")
    assert res.err.count("\n") == 1
    assert synwatch("frobnicate").code == 2


@pytest.mark.parametrize("chunk", [1, 5, 64, 1 << 20])
def test_candidates_are_the_same_whatever_the_chunk_size(
        monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(scan_module, "CHUNK", chunk)
    data = (f"{NOISE}\n{FLOOD}\n" * 3 + "x" * 300 + "\n" + FLOOD).encode()
    found = list(candidate_lines(io.BytesIO(data), (b"SYN flooding on port",)))
    assert [n for n, _ in found] == [2, 4, 6, 8]
    assert all(line == FLOOD.encode() for _, line in found)


def test_a_line_with_two_needles_is_reported_once() -> None:
    line = b"kernel: TCP: drop open request from 1.2.3.4/5 SYN flooding on port"
    assert len(list(candidate_lines(io.BytesIO(line + b"\n"),
                                    (b"drop open request from", b"SYN flooding on port")))) == 1


@pytest.mark.parametrize("line_numbers", [True, False])
def test_mapped_file_and_stream_paths_agree(tmp_path: Path, line_numbers: bool) -> None:
    path = tmp_path / "big.log"
    body = "".join(f"{NOISE}\n{FLOOD}\n{JOURNAL}\n" if i % 7 == 0 else f"{NOISE}\n"
                   for i in range(5000)) + KMSG  # no final newline
    path.write_text(body)
    needles = (b"SYN flooding on port", b"drop open request from")
    with path.open("rb") as f:
        mapped = list(candidate_lines(f, needles, line_numbers=line_numbers))
    streamed = list(candidate_lines(io.BytesIO(path.read_bytes()), needles))
    assert [line for _, line in mapped] == [line for _, line in streamed]
    assert len(mapped) == 2 * 715 + 1
    if line_numbers:
        assert mapped == streamed


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.log").write_bytes(b"")
    assert synwatch("scan", "--count", str(tmp_path / "empty.log")).out == "0\n"


@pytest.mark.parametrize("gz", [False, True])
def test_progress_bar_on_a_terminal_only(tmp_path: Path, gz: bool) -> None:
    import os
    import pty
    import subprocess
    import sys

    path = tmp_path / ("big.log.gz" if gz else "big.log")
    data = "".join(f"{NOISE} {os.urandom(8).hex()}\n" for _ in range(3000)).encode()
    data += f"{FLOOD}\n".encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    env = {**os.environ, "SYNWATCH_PROGRESS_BYTES": "1000"}
    main, child = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "synwatch", "scan", "--count", str(path)],
                          stdout=subprocess.PIPE, stderr=child, env=env, timeout=60, check=True)
    os.close(child)
    shown = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    assert proc.stdout == b"1\n"
    assert b"scanning " in shown and b"100%" in shown
    # not a terminal: no bar
    assert synwatch("scan", "--count", str(path), env=env).err == ""


# -- every `journalctl -o` mode and `dmesg -T -x` --------------------------------------------
# Real output (tests/data/journal-modes/README.md): the last 8 entries of the journal after two
# floods in the lab, in each mode: journald's own "Received SIGTERM" line, then 7 SYN-flood lines.
MODES = DATA / "journal-modes"
FLOOD_PORTS = [26547, 34508, 29484, 28835, 42585, 45610, 36959]
STAMP, PRECISE = "2026-12-06T10:24:10+00:00", "2026-12-06T10:24:10.050143+00:00"
DMESG_STAMP = "2026-12-06T10:24:09+00:00"  # dmesg's own reckoning from the boot time
# file: (time of the 45610 line, or None where the mode prints none; its host)
CAPTURED: dict[str, tuple[str | None, str | None]] = {
    "journal-short": (STAMP, "vm"),
    "journal-short-full": (STAMP, "vm"),
    "journal-short-iso": (STAMP, "vm"),
    "journal-short-iso-precise": (PRECISE, "vm"),
    "journal-short-precise": (PRECISE, "vm"),
    "journal-short-monotonic": (None, "vm"),
    "journal-short-delta": (None, "vm"),
    "journal-short-unix": (PRECISE, "vm"),
    "journal-verbose": (PRECISE, "vm"),
    "journal-export": (PRECISE, "vm"),
    "journal-json": (PRECISE, "vm"),
    "journal-json-pretty": (PRECISE, "vm"),
    "journal-json-sse": (PRECISE, "vm"),
    "journal-json-seq": (PRECISE, "vm"),
    "journal-cat": (None, None),
    "journal-with-unit": (STAMP, "vm"),
    "dmesg-T-x": (DMESG_STAMP, None),
    "dmesg-x": (None, None),
    "dmesg-T": (DMESG_STAMP, None),
}
# Journal entries read as journal JSON: `scan` reports what a kernel entry claims, as for -o json
# (README: "trusted"); a reader that records (import, the file source) trusts no file.
JOURNAL_JSON = {"journal-verbose", "journal-export", "journal-json", "journal-json-pretty",
                "journal-json-sse", "journal-json-seq"}


def _needle_line_no(path: Path, port: int) -> int:
    """The line `grep -n` names for the port's flood line."""
    lines = path.read_bytes().split(b"\n")
    return next(i for i, line in enumerate(lines, 1) if f":{port}.".encode() in line)


def test_every_journalctl_mode_and_dmesg_t_x_are_scanned() -> None:
    assert {p.stem for p in MODES.glob("*.txt")} == set(CAPTURED)
    paths = [MODES / f"{name}.txt" for name in CAPTURED]
    res = synwatch("scan", "--format", "json", *map(str, paths))
    assert res.code == 0, res.err
    hits = [json.loads(line) for line in res.out.splitlines()]
    for name, (when, _host) in CAPTURED.items():
        path = MODES / f"{name}.txt"
        mine = [h for h in hits if h["path"] == str(path)]
        assert [h["port"] for h in mine] == FLOOD_PORTS, name
        flood = mine[FLOOD_PORTS.index(45610)]
        assert flood["line_no"] == _needle_line_no(path, 45610), name
        assert (flood["address"], flood["family"], flood["mode"]) == ("0.0.0.0", 4, "cookies")
        if name in ("journal-short", "journal-short-precise"):  # no year: the last Dec 6
            assert when is not None and flood["time"][4:] == when[4:], name
        else:
            assert flood["time"] == when, name
        assert flood["trusted"] is (name in JOURNAL_JSON), name
        v6 = mine[-1]
        assert (v6["address"], v6["port"], v6["family"]) == ("::", 36959, 6), name


@pytest.mark.parametrize("name", list(CAPTURED))
def test_every_mode_as_import_reads_it_never_trusted(name: str, catalogue: Catalogue) -> None:
    """The importer's reading (allow_trust=False, as the file source's): host and time as the
    mode prints them, nothing trusted."""
    when, host = CAPTURED[name]
    stream = open_input(str(MODES / f"{name}.txt"))
    try:
        found = [c for c in candidates(stream, catalogue, now=datetime.now(timezone.utc),
                                       tz=timezone.utc, allow_trust=False) if c.event]
    finally:
        stream.close()
    assert [c.event.port for c in found if c.event] == FLOOD_PORTS
    record = next(c.record for c in found if c.event and c.event.port == 45610)
    assert record is not None
    assert record.host == host
    assert (record.time is None) == (when is None)
    assert not any(c.record and c.record.trusted for c in found)


def test_import_of_every_mode_records_untrusted_events(store_config: Path) -> None:
    paths = [str(MODES / f"{name}.txt") for name in CAPTURED]
    res = synwatch("import", "--config", str(store_config), *paths)
    assert res.code == 0, res.err
    # with-unit prints a kernel line as short-full does (it has no unit): the same lines
    assert res.out.splitlines() == [
        f"{p}: 7 kernel lines, {0 if p.endswith('with-unit.txt') else 7} new events"
        for p in paths]
    store = History.open(f"sqlite:///{store_config.parent}/history.db")
    rows = store.events()
    assert len(rows) == 7 * (len(paths) - 1)
    assert not any(e.trusted for e in rows)


@pytest.mark.parametrize("name", ["journal-verbose", "journal-export", "journal-json-pretty"])
def test_the_corpus_holds_each_record_mode_folded_as_the_folder_folds_it(name: str) -> None:
    rows = {r["format"]: r for r in csv.DictReader(
        (DATA / "corpus" / "kernel-lines.tsv").open(newline="", encoding="utf-8"),
        delimiter="\t")}
    data = (MODES / f"{name}.txt").read_bytes()
    kind = journalfold.layout(data)
    assert kind is not None
    folded = [line for _, line in journalfold.fold([data], kind, (b"SYN flooding on port",))]
    assert rows[name]["line"].encode() in folded


@pytest.mark.parametrize("name", ["journal-verbose", "journal-export", "journal-json-pretty"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_folding_is_the_same_whatever_the_chunks(name: str, chunk: int) -> None:
    data = (MODES / f"{name}.txt").read_bytes()
    kind = journalfold.layout(data)
    assert kind is not None
    needles = (b"SYN flooding on port", b"Received SIGTERM")
    whole = list(journalfold.fold([data], kind, needles))
    assert len(whole) == 8
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    assert list(journalfold.fold(pieces, kind, needles)) == whole
    first = json.loads(whole[0][1])
    assert (first["SYSLOG_FACILITY"], first["_TRANSPORT"]) == ("5", "kernel")  # not the kernel's


def _export_binary(key: bytes, value: bytes) -> bytes:
    """A field as the Journal Export Format writes one with a newline or a control character:
    its name, a newline, its size as a little-endian 64-bit integer, its bytes, a newline."""
    return key + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"


FLOOD_TEXT = b"TCP: request_sock_TCP: Possible SYN flooding on port 0.0.0.0:8443. Sending cookies."


def test_export_binary_fields_are_read_by_their_size() -> None:
    # A binary value may hold anything, an empty line and a forged field included: only its
    # size says where it ends.
    forged = b"x\n\nMESSAGE=" + FLOOD_TEXT.replace(b"8443", b"9999") + b"\n\n\xff"
    data = (b"-- Logs begin at Sun 2026-12-06 10:00:00 UTC, end at Sun 2026-12-06 11:00:00 UTC."
            b" --\n__CURSOR=s=1;i=1;b=2;m=3;t=661f48286ca5f;x=4\n"
            b"__REALTIME_TIMESTAMP=1796552650050143\n"
            + _export_binary(b"SYSLOG_RAW", forged)
            + b"_TRANSPORT=kernel\nSYSLOG_FACILITY=0\n_HOSTNAME=web01\n"
            + _export_binary(b"MESSAGE", FLOOD_TEXT + b"\nsecond line") + b"\n"
            + b"__CURSOR=s=1;i=2;b=2;m=4;t=661f48286ca60;x=5\n_TRANSPORT=kernel\n"
            + b"SYSLOG_FACILITY=0\n_HOSTNAME=web01\nMESSAGE=" + FLOOD_TEXT.replace(b"8443", b"80")
            + b"\n\n")
    assert journalfold.layout(data) == "export"

    def line_of(marker: bytes) -> int:  # as an editor counts lines: by the newline bytes
        return data[:data.rindex(marker)].count(b"\n") + 1

    for chunk in (1, 5, len(data)):
        pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
        found = list(journalfold.fold(pieces, "export", (b"SYN flooding on port",)))
        # each entry once, at its first line with a needle (the forged value's, in the first)
        assert [n for n, _ in found] == [line_of(b"SYSLOG_RAW\n"), line_of(b"MESSAGE=TCP")]
        first, second = (json.loads(line) for _, line in found)
        assert first["MESSAGE"] == (FLOOD_TEXT + b"\nsecond line").decode()
        assert first["SYSLOG_RAW"] == list(forged)  # not UTF-8: its bytes, as -o json
        assert (first["_HOSTNAME"], first["__REALTIME_TIMESTAMP"]) == ("web01", "1796552650050143")
        assert second["MESSAGE"].endswith(":80. Sending cookies.")


def test_verbose_continuation_lines_boot_lines_and_a_cut_json_object() -> None:
    verbose = (b"-- Logs begin at Sun 2026-12-06 10:00:00 UTC. --\n"
               b"Sun 2026-12-06 10:24:10.050143 UTC [s=1;i=466;b=2;m=3;t=661f48286ca5f;x=4]\n"
               b"    _TRANSPORT=kernel\n    SYSLOG_FACILITY=0\n"
               b"    MESSAGE=" + FLOOD_TEXT + b"\n            and its second line\n"
               b"    _HOSTNAME=web01\n"
               b"-- Boot 5350d6e1587f421884e0bb3821052c03 --\n"
               b"Mar  7 09:17:14 web01 kernel: " + FLOOD_TEXT + b"\n")
    assert journalfold.layout(verbose) == "verbose"
    found = list(journalfold.fold([verbose], "verbose", (b"SYN flooding on port",)))
    assert [n for n, _ in found] == [5, 9]
    entry = json.loads(found[0][1])
    assert entry["MESSAGE"] == FLOOD_TEXT.decode() + "\nand its second line"
    assert entry["__REALTIME_TIMESTAMP"] == "1796552650050143"  # the cursor's t=, in hex
    assert entry["_HOSTNAME"] == "web01"
    assert found[1][1].startswith(b"Mar  7 09:17:14 web01 kernel: ")  # a plain line, as it is
    pretty = (b'{\n\t"_TRANSPORT" : "kernel",\n\t"MESSAGE" : "' + FLOOD_TEXT + b'",\n'
              b'{\n\t"_TRANSPORT" : "kernel",\n\t"MESSAGE" : "' + FLOOD_TEXT + b'"\n}\n')
    found = list(journalfold.fold([pretty], "json-pretty", (b"SYN flooding on port",)))
    assert [n for n, _ in found] == [3, 6]  # the object cut short is passed on, and fails
    assert json.loads(found[1][1])["MESSAGE"] == FLOOD_TEXT.decode()


def test_an_overlong_entry_is_dropped_and_counted_and_the_rest_read(tmp_path: Path) -> None:
    big = b"A" * (journalfold.MAX_RECORD + 1)
    entry = (b"__CURSOR=s=1;i=1;b=2;m=3;t=661f48286ca5f;x=4\n_TRANSPORT=kernel\n"
             b"SYSLOG_FACILITY=0\nMESSAGE=" + FLOOD_TEXT + b"\n")
    core = b"__CURSOR=s=1;i=9;b=2;m=3;t=1;x=4\n" + _export_binary(b"COREDUMP", b"\0" * (1 << 20))
    path = tmp_path / "export"
    path.write_bytes(core + b"\n"  # a core dump in the journal: long, but no kernel line
                     + entry.replace(b"_TRANSPORT", b"BIG=" + big + b"\n_TRANSPORT") + b"\n"
                     + entry.replace(b"8443", b"80") + b"\n")
    res = synwatch("scan", "--format", "json", str(path))
    assert res.code == 1
    assert [json.loads(line)["port"] for line in res.out.splitlines()] == [80]
    assert "longer than 65536 bytes" in res.err
    assert "synwatch: scan: 1 lines could not be parsed and were skipped" in res.err
    path.write_bytes(core + b"\n" + entry)
    res = synwatch("scan", "--count", str(path))
    assert (res.code, res.out, res.err) == (0, "1\n", "")
