"""The journalctl reader under a backlog: a boot's journal with more SYN-flood lines than one
batch holds is read whole, in order, each line once (a full batch once dropped the rest of the
chunk it was read from, and with it the newest line of a busy boot)."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

from synwatch.lines.catalogue import load_catalogue
from synwatch.sources.base import Batch
from synwatch.sources.journald import BATCH, JournalctlReader, JournaldSource


class _JournalFile(JournalctlReader):
    """journalctl's ``-o json`` output, replayed by a real process (``cat``) from a file:
    the reader's own pipe handling, with the journal's entries chosen by the test."""

    path = ""

    def start(self, cursor: str | None, since_usec: int | None) -> bool:
        # journalctl --follow stays: so does this, once the file is out
        self._proc = subprocess.Popen(["sh", "-c", 'cat "$0"; exec sleep 600', self.path],
                                      stdout=subprocess.PIPE)
        return False


def test_a_backlog_larger_than_a_batch_is_read_whole(tmp_path: Path) -> None:
    count = 3 * BATCH + 7
    lines = []
    for n in range(count):
        lines.append(json.dumps({
            "__CURSOR": f"s=0;i={n}", "__REALTIME_TIMESTAMP": str(1_700_000_000_000_000 + n),
            "_TRANSPORT": "kernel", "SYSLOG_FACILITY": "0", "_HOSTNAME": "web01",
            "MESSAGE": f"TCP: request_sock_TCP: Possible SYN flooding on port "
                       f"10.0.0.1:{1000 + n}. Sending cookies.  Check SNMP counters."}))
        lines.append(json.dumps({"__CURSOR": f"s=0;j={n}", "_TRANSPORT": "kernel",
                                 "SYSLOG_FACILITY": "0", "MESSAGE": "eth0: link up"}))
    journal = tmp_path / "journal.json"
    journal.write_text("\n".join(lines) + "\n")
    _JournalFile.path = str(journal)
    batches: list[Batch] = []
    stop = threading.Event()

    def emit(batch: Batch) -> None:
        batches.append(batch)
        if sum(len(b.records) for b in batches) >= count:
            stop.set()

    thread = threading.Thread(target=JournaldSource(
        load_catalogue(), reader_factory=_JournalFile).stream, args=(emit, stop))
    thread.start()
    thread.join(30)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    ports = [int(r.message.split(":")[-1].split(".")[0]) for b in batches for r in b.records]
    assert ports == [1000 + n for n in range(count)]
    assert max(len(b.records) for b in batches) == BATCH
    assert all(r.trusted for b in batches for r in b.records)
