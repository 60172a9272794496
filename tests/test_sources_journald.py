"""journald and /dev/kmsg on the real kernel: real SYN-flood lines recorded as trusted within a
second, forged lines never trusted, resume after a restart, a stale cursor, a dead journald."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from synwatch.lines.catalogue import Catalogue
from synwatch.records import LogRecord, RecordedEvent
from synwatch.sources.base import Batch
from synwatch.sources.journald import JournalctlReader, JournaldSource, SystemdReader
from synwatch.sources.kmsg import KmsgSource, current_boot_id
from synwatch.store import History
from tests.support.harness import NotifySocket, host_config, log_of, start_service, stop_service
from tests.support.journald import Journald
from tests.support.lab import Lab, lab, lab_port
from tests.support.wait import eventually

pytestmark = pytest.mark.needs_root


@pytest.fixture(scope="module")
def flood_lab() -> Iterator[Lab]:
    with lab() as the_lab:
        yield the_lab


def real_flood(the_lab: Lab) -> int:
    """A new listener, flooded: the kernel prints one line for it. Returns its port."""
    port = lab_port()
    the_lab.listen(port, backlog=8)
    the_lab.flood(port, 200)
    return port


def events_for(store: History, port: int, mark: Callable[[], int],
               timeout: float = 15) -> list[RecordedEvent]:
    """The events recorded for ``port``, once one is, and once a later line is too: ``mark()``
    sends one through the same source and returns its port. A duplicate of the first would
    have been recorded before the mark, so "exactly one" is asserted on a positive marker,
    not after a sleep."""

    def recorded(wanted: int) -> list[RecordedEvent]:
        try:
            return eventually(lambda: [e for e in store.events() if e.port == wanted],
                              f"port {wanted} recorded", timeout, every=0.05)
        except AssertionError:
            return []

    if not recorded(port):
        return []
    assert recorded(mark()), "the marker line was not recorded"
    return [e for e in store.events() if e.port == port]


def in_journal(port: int, timeout: float = 15) -> None:
    """Wait until journald has stored the kernel's line for ``port``."""
    eventually(lambda: f":{port}." in subprocess.run(
        ["journalctl", "-k", "-o", "cat", "--no-pager", "-n", "50"],
        capture_output=True, text=True, check=False).stdout,
        f"the line for port {port} in the journal", timeout)


def wait_log(tmp_path: Path, text: str, timeout: float) -> None:
    log = log_of(tmp_path / "synwatch.toml")
    eventually(lambda: text in log.read_text(), repr(text), timeout, seen=log.read_text)


def _config(tmp_path: Path, files: list[str] | None = None) -> Path:
    return host_config(tmp_path, "[sources]\njournald = true\nkmsg = false\n"
                                 f"files = {json.dumps(files or [])}\n")


def test_real_flood_is_recorded_trusted_within_a_second_and_forgeries_are_not(
        tmp_path: Path, journald: Journald, flood_lab: Lab) -> None:
    notify = NotifySocket(tmp_path / "n.sock")
    proc = start_service(_config(tmp_path), notify)
    store = History.open(f"sqlite:///{tmp_path}/h.db")
    try:
        notify.wait_for("READY=1")
        forged_logger, forged_send = random.randint(1, 9999), random.randint(10000, 19999)
        text = "TCP: request_sock_TCP: Possible SYN flooding on port 0.0.0.0:{}. Sending cookies."
        subprocess.run(["logger", "--socket", "/run/systemd/journal/dev-log", "-t", "kernel",
                        text.format(forged_logger)], check=True)
        from systemd import journal
        journal.send(text.format(forged_send), SYSLOG_IDENTIFIER="kernel", SYSLOG_FACILITY="0")
        port = real_flood(flood_lab)
        events = events_for(store, port, lambda: real_flood(flood_lab))
        assert len(events) == 1, "the real kernel line, exactly once"
        event = events[0]
        assert event.source == "journald" and event.trusted and event.kind == "syn_flood"
        assert event.time is not None
        delay = event.recorded_at - event.time
        assert delay < timedelta(seconds=1), f"recorded {delay} after journald stored it"
        ports = {e.port for e in store.events()}
        assert forged_logger not in ports and forged_send not in ports
        # the forgeries are in the journal, and `scan` shows them for what they are
        dump = subprocess.run(["journalctl", "-o", "json", "--no-pager", "SYSLOG_IDENTIFIER=kernel",
                               "-n", "200"], capture_output=True, text=True, check=True).stdout
        scanned = subprocess.run([sys.executable, "-m", "synwatch",
                                  "scan", "--format", "json", "-"], input=dump,
                                 capture_output=True, text=True, check=True).stdout
        by_port = {json.loads(x)["port"]: json.loads(x)["trusted"] for x in scanned.splitlines()}
        assert by_port.get(port) is True
        assert by_port.get(forged_send) is False  # facility 0 claimed, but not the kernel's
        assert forged_logger not in by_port  # facility user: not a kernel line at all
        # down for a while: a flood meanwhile is read after the restart, nothing twice
        assert stop_service(proc)[0] == 0
        missed = real_flood(flood_lab)
        in_journal(missed)
        proc = start_service(_config(tmp_path), notify)
        assert len(events_for(store, missed, lambda: real_flood(flood_lab))) == 1
        assert len([e for e in store.events() if e.port == port]) == 1
    finally:
        code, err = stop_service(proc)
    assert code == 0, err
    assert "reading with systemd-python after the stored cursor" in err


def test_dead_journald_is_restarted_with_backoff_while_files_keep_working(
        tmp_path: Path, journald: Journald, flood_lab: Lab) -> None:
    if journald.proc is None:  # pytest run by hand on a machine with its own journald
        pytest.skip("the tests may stop only a journald of their own: run ./scripts/test, "
                    "which gives them a private /run")
    log = tmp_path / "syslog"
    notify = NotifySocket(tmp_path / "n.sock")
    proc = start_service(_config(tmp_path, [str(log)]), notify)
    store = History.open(f"sqlite:///{tmp_path}/h.db")
    try:
        notify.wait_for("READY=1")
        before = real_flood(flood_lab)
        assert len(events_for(store, before, lambda: real_flood(flood_lab))) == 1
        journald.stop()
        # the liveness check runs every 5 s; then restarts at 1 s, 2 s, ...
        wait_log(tmp_path, "restarting in 2 s", timeout=20)
        def file_line(port: int) -> int:
            with log.open("a") as f:
                f.write("Mar  7 09:17:14 web01 kernel: TCP: request_sock_TCP: Possible SYN "
                        f"flooding on port {port}. Sending cookies.\n")
            return port

        file_line(4444)
        assert len(events_for(store, 4444, lambda: file_line(4445))) == 1, \
            "the file source went on"
        during = real_flood(flood_lab)  # printed while journald is down
        journald.start()
        assert len(events_for(store, during, lambda: real_flood(flood_lab), timeout=30)) == 1, \
            "no gap after journald is back"
        subprocess.run(["journalctl", "--rotate"], check=True, timeout=30)  # new journal files
        after = real_flood(flood_lab)
        assert len(events_for(store, after, lambda: real_flood(flood_lab), timeout=30)) == 1
        assert len([e for e in store.events() if e.port == before]) == 1, "no repeat"
    finally:
        if not journald.alive():
            journald.start()
        _, err = stop_service(proc)
    assert "source journald failed: journald: stopped answering" in err
    assert "restarting in 1 s" in err and "restarting in 2 s" in err


@pytest.mark.parametrize("reader", [SystemdReader, JournalctlReader])
def test_both_readers_and_a_stale_cursor(reader: type, journald: Journald, flood_lab: Lab,
                                         catalogue: Catalogue, caplog: pytest.LogCaptureFixture,
                                         ) -> None:
    port = real_flood(flood_lab)
    in_journal(port)
    batches: list[Batch] = []
    source = JournaldSource(catalogue, reader_factory=reader)

    def mine_read() -> list[LogRecord]:
        return [r for b in list(batches) for r in b.records if f":{port}." in r.message]

    _run_for(source, batches, 10, until=lambda: bool(mine_read()))
    mine = mine_read()
    assert len(mine) == 1 and mine[0].trusted and mine[0].position
    cursor = mine[0].position.removeprefix("journal:")
    assert mine[0].time is not None
    realtime = int(mine[0].time.timestamp() * 1_000_000)
    # the same cursor from another journal (a vacuum or a reboot of a volatile journal)
    stale = "s=" + "0" * 32 + cursor[cursor.index(";"):]
    batches.clear()
    caplog.set_level(logging.INFO)
    _run_for(JournaldSource(catalogue, {"cursor": stale, "realtime": realtime - 1},
                            reader_factory=reader), batches, 10,
             until=lambda: any(b.records for b in list(batches)))
    assert "the stored cursor is no longer in the journal" in caplog.text
    again = [r.position for b in batches for r in b.records]
    # read on from the time of the last entry stored: that entry comes again (its cursor is the
    # event's identity, so the store records it once), nothing before it does
    assert again[0] == mine[0].position


def _run_for(source: JournaldSource | KmsgSource, batches: list[Batch], seconds: float,
             until: Callable[[], bool] | None = None) -> None:
    """Stream for ``seconds``, or until ``until()`` holds (a loaded CI machine is slow). The
    source runs on a thread, and what it raises is raised here: a source that crashed must not
    pass a test that asserts it read nothing."""
    stop = threading.Event()
    failure: list[BaseException] = []

    def stream() -> None:
        try:
            source.stream(batches.append, stop)
        except BaseException as exc:  # handed to the test's thread
            failure.append(exc)

    thread = threading.Thread(target=stream)
    thread.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and until()) and thread.is_alive():
        time.sleep(0.05)
    if until:
        time.sleep(0.2)  # what follows in the same read
    stop.set()
    thread.join(10)
    assert not thread.is_alive(), "the source did not stop when asked"
    if failure:
        raise failure[0]


def test_kmsg_resumes_by_sequence_without_repeats(catalogue: Catalogue, flood_lab: Lab) -> None:
    boot = current_boot_id()
    batches: list[Batch] = []
    source = KmsgSource(catalogue)
    _run_for(source, batches, 0.5)  # reads the whole ring from the start
    assert source.position["boot"] == boot
    port = real_flood(flood_lab)
    _run_for(source, batches, 1)
    first = [r for b in batches for r in b.records if f":{port}." in r.message]
    assert len(first) == 1 and first[0].trusted and first[0].position.startswith(f"kmsg:{boot}:")
    # a new process resuming from the stored position reads nothing twice, and it does read:
    # a flood after the position is its positive marker (a source that read nothing at all
    # would otherwise pass)
    later: list[Batch] = []
    marker = real_flood(flood_lab)

    def read_marker() -> bool:
        return any(f":{marker}." in r.message for b in list(later) for r in b.records)

    _run_for(KmsgSource(catalogue, position=dict(source.position)), later, 10, until=read_marker)
    assert read_marker()
    assert not [r for b in later for r in b.records if f":{port}." in r.message]


def test_kmsg_counts_records_lost_between_reads(catalogue: Catalogue, tmp_path: Path) -> None:
    # /dev/kmsg hands out one record per read(); a SEQPACKET socket does the same, which lets
    # the sequence gap be made at will. Only the transport is stood in for.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    source = KmsgSource(catalogue, path="seqpacket", opener=lambda: os.dup(ours.fileno()),
                        position={"boot": current_boot_id(), "seq": 10})
    for seq, text in ((11, "x"), (12, "TCP: request_sock_TCP: Possible SYN flooding on port "
                                      "0.0.0.0:80. Sending cookies."), (20, "y")):
        theirs.send(f"6,{seq},1000,-;{text}\n".encode())
    batches: list[Batch] = []
    _run_for(source, batches, 0.5)
    records = [r for b in batches for r in b.records]
    notes = [n for b in batches for n in b.notes]
    assert [r.message for r in records] == [
        "TCP: request_sock_TCP: Possible SYN flooding on port 0.0.0.0:80. Sending cookies."]
    assert notes == ["7 kernel records were overwritten in the ring buffer before they could "
                     "be read"]
    assert source.position["seq"] == 20


class _CountingReader:
    name = "fake"

    def __init__(self) -> None:
        self.waits: list[float] = []

    def wait(self, timeout: float) -> None:
        self.waits.append(timeout)


@pytest.mark.needs_root
def test_a_kernel_record_wakes_the_journal_reader_at_once() -> None:
    """journald notifies readers up to 250 ms late; a /dev/kmsg record wakes us instead, and
    for half a second after it the journal is looked at every 10 ms."""
    from synwatch.sources.journald import KernelWake

    wake = KernelWake()
    reader = _CountingReader()
    try:
        assert wake.fd is not None
        with Path("/dev/kmsg").open("w") as kmsg:
            kmsg.write("<6>synwatch-test: wake the journal reader\n")
        started = time.monotonic()
        wake.wait(reader, 30)  # returns on the record, not after 30 s
        wake.wait(reader, 30)  # eager: returns after 10 ms
        assert time.monotonic() - started < 5
        assert reader.waits == [0, 0]  # the reader only takes in its notifications
    finally:
        wake.close()
    unreadable = KernelWake("/nonexistent/kmsg")
    unreadable.wait(reader, 0.01)  # falls back to the reader's own wait
    assert reader.waits[-1] == 0.01


def test_journalctl_is_out_of_reach_of_the_terminals_signals(journald: Journald) -> None:
    """Ctrl-C (or systemd's SIGTERM to the process group) used to kill journalctl before
    synwatch itself, which then logged 'journalctl exited with status -15; restarting'. It runs
    in a session of its own now, and synwatch closes it."""
    reader = JournalctlReader(None)
    reader.start(None, None)
    try:
        assert reader._proc is not None
        assert os.getsid(reader._proc.pid) != os.getsid(0)
        assert os.getpgid(reader._proc.pid) != os.getpgid(0)
    finally:
        reader.close()
    assert reader._proc is None or reader._proc.poll() is not None


def test_auto_reads_the_kernel_ring_when_journald_is_not_running(tmp_path: Path) -> None:
    """Journal files left by a journald that is not running (a container, a rescue shell)
    get no new line: "auto" reads the kernel's ring instead of a journal nothing writes to."""
    from synwatch.config import parse_config
    from synwatch.sources import plan_sources

    journal = tmp_path / "journal" / "machine"
    journal.mkdir(parents=True)
    (journal / "system.journal").write_bytes(b"")
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")
    config = parse_config("", "test")  # journald and kmsg "auto"
    socket_path = tmp_path / "socket"
    plans, skipped = plan_sources(config, str(kmsg), (tmp_path / "journal",), socket_path)
    assert [p.name for p in plans] == ["kmsg"]
    assert f"journald: auto: journald is not running (no {socket_path})" in skipped
    socket_path.touch()  # journald runs
    plans, _ = plan_sources(config, str(kmsg), (tmp_path / "journal",), socket_path)
    assert [p.name for p in plans] == ["journald"]
