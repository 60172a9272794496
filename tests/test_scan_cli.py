"""`synwatch scan` as a user runs it: formats, --count, .gz, stdin, several paths, bad input."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest

from synwatch import scan as scan_module
from synwatch.scan import candidate_lines
from tests.conftest import synwatch

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
