"""`synwatch import`: old logs into the history, untrusted and historical, idempotent."""

from __future__ import annotations

import gzip
from pathlib import Path

from synwatch.store import History
from tests.support.cli import synwatch

LINE = ("Jul 28 18:57:32 PC kernel: [538538.407269] TCP: request_sock_TCP: Possible SYN flooding "
        "on port {}. Sending cookies.  Check SNMP counters.\n")


def test_import_is_idempotent_untrusted_and_historical(tmp_path: Path,
                                                        store_config: Path) -> None:
    rotated = tmp_path / "kern.log.2.gz"
    rotated.write_bytes(gzip.compress((LINE.format(80) + "noise\n" + LINE.format(443)).encode()))
    current = tmp_path / "kern.log.1"
    current.write_text(LINE.format(443) + LINE.format(8080))  # 443 again: the same line
    cfg = ["--config", str(store_config)]
    first = synwatch("import", str(rotated), str(current), *cfg)
    assert first.code == 0, first.err
    assert first.out.splitlines() == [f"{rotated}: 2 kernel lines, 2 new events",
                                      f"{current}: 2 kernel lines, 1 new events"]
    again = synwatch("import", str(current), str(rotated), *cfg)
    assert again.out.splitlines() == [f"{current}: 2 kernel lines, 0 new events",
                                      f"{rotated}: 2 kernel lines, 0 new events"]
    store = History.open(f"sqlite:///{tmp_path}/history.db")
    rows = sorted(store.events(), key=lambda e: e.id)
    assert [(e.port, e.trusted, e.historical, e.source) for e in rows] == [
        (80, False, True, f"file:{rotated}"), (443, False, True, f"file:{rotated}"),
        (8080, False, True, f"file:{current}")]


def test_import_of_a_missing_file_is_exit_2(store_config: Path, tmp_path: Path) -> None:
    res = synwatch("import", str(tmp_path / "nope"), "--config", str(store_config))
    assert res.code == 2
    assert res.err == f"synwatch: {tmp_path / 'nope'}: No such file or directory\n"
