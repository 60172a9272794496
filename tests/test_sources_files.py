"""The file source on real files with real inotify: every line written across rename,
copytruncate and delete rotations, a partial line and a restart is recorded exactly once."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from synwatch.clock import SystemClock
from synwatch.daemon.recorder import Recorder
from synwatch.lines.catalogue import Catalogue
from synwatch.records import LogRecord
from synwatch.sources.base import Batch
from synwatch.sources.files import FileSource
from synwatch.store import History
from tests.support.cli import synwatch
from tests.support.harness import NotifySocket, host_config, log_of, start_service, stop_service
from tests.support.wait import eventually


def kernel_line(n: int) -> str:
    return (f"Mar  7 09:17:14 web01 kernel: [{n:7d}.000000] TCP: request_sock_TCP: Possible SYN "
            f"flooding on port {1 + n % 65000}. Sending cookies.  Check SNMP counters.\n")


NOISE = "Mar  7 09:17:14 web01 CRON[42]: (root) CMD (true)\n"


class Harness:
    def __init__(self, tmp: Path, catalogue: Catalogue) -> None:
        self.store = History.open(f"sqlite:///{tmp}/h.db")
        self.recorder = Recorder(self.store, catalogue, SystemClock())
        self.catalogue = catalogue
        self.lock = threading.Lock()

    def emit(self, batch: Batch) -> None:
        with self.lock:
            self.recorder.record(batch)

    @contextmanager
    def running(self, path: Path, **kw: object) -> Iterator[FileSource]:
        options: dict[str, object] = {"poll_interval": 0.2, "drain_grace": 1.0, **kw}
        source = FileSource(self.catalogue, str(path), self.store.get_position(f"file:{path}"),
                            **options)  # type: ignore[arg-type]
        stop = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                source.stream(self.emit, stop)
            except BaseException as exc:  # surfaced in the test thread
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        self.wait(lambda: source.rounds > 0, errors)  # it has opened the file, or found none
        try:
            yield source
        finally:
            self.wait(lambda: self.caught_up(source, path), errors)
            rounds = source.rounds
            self.wait(lambda: source.rounds > rounds, errors)  # its batch is recorded too
            stop.set()
            thread.join(10)
            assert not errors, errors

    @staticmethod
    def wait(condition: Callable[[], bool], errors: list[BaseException],
             timeout: float = 20) -> None:
        def there() -> bool:
            assert not errors, errors
            return condition()

        eventually(there, "the file source there", timeout, every=0.02)

    @staticmethod
    def caught_up(source: FileSource, path: Path) -> bool:
        """Everything written is read (the position is past it), and rotated files are drained
        and closed (after drain_grace without growth): what a stop may safely cut."""
        files = source.position.get("files", [])
        size = path.stat().st_size if path.exists() else None
        current = [f for f in files if not f["draining"]]
        return (not any(f["draining"] for f in files)
                and (size is None or (len(current) == 1 and current[0]["offset"] == size)))


def numbers_recorded(h: Harness) -> list[int]:
    events = h.store.events()
    keys, msgs = [e.dedup_key for e in events], [e.message for e in events]
    assert len(set(keys)) == len(keys)
    return sorted(int(m.split("port ")[1].split(".")[0]) for m in msgs)


def write(path: Path, numbers: range, fh: object = None) -> None:
    with path.open("a") if fh is None else fh as f:  # type: ignore[attr-defined]
        for n in numbers:
            f.write(kernel_line(n))
            if n % 50 == 0:
                f.write(NOISE)
                f.flush()


@pytest.fixture
def harness(tmp_path: Path, catalogue: Catalogue) -> Harness:
    return Harness(tmp_path, catalogue)


def test_every_rotation_and_a_restart_lose_nothing_and_repeat_nothing(
        tmp_path: Path, harness: Harness) -> None:
    log = tmp_path / "log" / "syslog"
    log.parent.mkdir()
    log.write_text(kernel_line(99999))  # before the first start: not ours (we start at the end)
    written: list[int] = []
    with harness.running(log):
        write(log, range(1, 1001))  # 1. plain appends
        written += range(1, 1001)
        # 2. logrotate "create": rename, the writer goes on with the old file for a while
        old = log.open("a")
        log.rename(log.with_suffix(".1"))
        write(log, range(1001, 1021), old)
        old = (log.with_suffix(".1")).open("a")
        log.write_text("")
        write(log, range(1021, 1041), old)
        old.close()
        write(log, range(1041, 2041))
        written += range(1001, 2041)
        time.sleep(0.5)
        # 3. copytruncate: copy, truncate in place, go on writing
        shutil.copy(log, log.with_suffix(".2"))
        with log.open("r+") as f:
            f.truncate(0)
        write(log, range(2041, 3041))
        written += range(2041, 3041)
        time.sleep(0.5)
    # 4. down for a while: a rename rotation happens, and writes to both files
    write(log, range(3041, 3141))
    log.rename(log.with_suffix(".3"))
    write(log.with_suffix(".3"), range(3141, 3161))
    write(log, range(3161, 3261))
    written += range(3041, 3261)
    with harness.running(log):
        # 5. delete and recreate; a partial last line completed later
        time.sleep(0.5)
        log.unlink()
        write(log, range(3261, 4261))
        line = kernel_line(4261)
        with log.open("a") as f:
            f.write(line[:40])
            f.flush()
            time.sleep(0.5)
            f.write(line[40:])
        written += range(3261, 4262)
    got = numbers_recorded(harness)
    expected = sorted(1 + n % 65000 for n in written)
    missing = sorted(set(expected) - set(got))
    assert got == expected, f"{len(got)} of {len(expected)} recorded; missing {missing[:10]}"


def test_a_file_that_does_not_exist_yet_and_the_stat_fallback(
        tmp_path: Path, harness: Harness) -> None:
    log = tmp_path / "kern.log"
    with harness.running(log, use_inotify=False):  # only the periodic stat
        write(log, range(1, 301))
    assert numbers_recorded(harness) == list(range(2, 302))


def test_syslog_and_kern_log_carrying_the_same_line_record_it_once(
        tmp_path: Path, harness: Harness) -> None:
    syslog, kern = tmp_path / "syslog", tmp_path / "kern.log"
    repeated = kernel_line(7)
    with harness.running(syslog), harness.running(kern):
        for f in (syslog, kern):
            with f.open("a") as out:
                out.write(kernel_line(1) + kernel_line(2) + repeated + repeated)
    # lines 1 and 2 once each; the repeated line twice (it was printed twice), not four times
    assert numbers_recorded(harness) == [2, 3, 8, 8]


def test_forged_json_in_a_text_file_is_not_trusted(tmp_path: Path, harness: Harness) -> None:
    log = tmp_path / "syslog"
    with harness.running(log):
        log.write_text('{"_TRANSPORT":"kernel","SYSLOG_FACILITY":"0","SYSLOG_IDENTIFIER":'
                       '"kernel","MESSAGE":"TCP: request_sock_TCP: Possible SYN flooding on '
                       'port 0.0.0.0:443. Sending cookies."}\n')
    events = harness.store.events()
    assert [(e.port, e.trusted) for e in events] == [(443, False)]


def test_copytruncate_seen_by_the_first_line_when_the_file_regrew_past_our_offset(
        tmp_path: Path, harness: Harness) -> None:
    log = tmp_path / "syslog"
    log.write_text("")
    # no inotify and a slow poll: truncate and regrow happen between two looks
    with harness.running(log, use_inotify=False, poll_interval=2.0):
        write(log, range(1, 51))
        time.sleep(2.5)
        with log.open("r+") as f:
            f.truncate(0)
        write(log, range(1000, 1200))  # longer than before: the size alone would not tell
    assert numbers_recorded(harness) == [*range(2, 52), *range(1001, 1201)]


def test_a_backlog_of_events_is_logged_as_one_summary_line(
        tmp_path: Path, catalogue: Catalogue, caplog: pytest.LogCaptureFixture) -> None:
    """A first start reads the whole boot's history: one line says so, not one per event."""
    recorder = Recorder(History.open(f"sqlite:///{tmp_path}/h.db"), catalogue, SystemClock())

    def batch(numbers: range) -> Batch:
        records = tuple(LogRecord(line=kernel_line(n), sink="rsyslog", time=None,
                                  message=kernel_line(n).split("] ", 1)[1].strip(),
                                  host="web01", trusted=False, source="file:x",
                                  position=f"line:{n}") for n in numbers)
        return Batch("file:x", records, {"offset": 0})

    caplog.set_level(logging.INFO, logger="synwatch.daemon.recorder")
    assert len(recorder.record(batch(range(20)))) == 20
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["source file:x: 20 kernel events (0 trusted)"]
    caplog.clear()
    assert len(recorder.record(batch(range(18, 21)))) == 1  # 18 and 19 were recorded already
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    new = batch(range(20, 21)).records[0].message
    assert infos == [f"kernel event from file:x (untrusted): {new}"]


def test_a_line_without_end_is_skipped_not_buffered(tmp_path: Path, harness: Harness) -> None:
    """Anyone who can write to a followed file could grow synwatch's memory with one endless
    line; past MAX_LINE it is skipped to its newline, and the lines after it still count."""
    from synwatch.sources.files import MAX_LINE

    log = tmp_path / "syslog"
    log.write_text("")
    with harness.running(log) as source, log.open("a") as f:
        for _ in range(8):
            f.write("x" * (MAX_LINE // 2))
            f.flush()
            time.sleep(0.25)
            assert all(len(o.partial) <= MAX_LINE for o in source._files)
        f.write(kernel_line(7).replace("\n", "") + "\n")  # the end of the long line
        f.write(kernel_line(8))
    assert numbers_recorded(harness) == [9]  # kernel_line(8)'s port, not the skipped one's


def _cpu_seconds(pid: int) -> float:
    """The process's CPU time so far (all its threads, user and system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_until(what: str, condition: Callable[[], bool], proc: subprocess.Popen[str],
                config: Path, timeout: float = 20) -> None:
    eventually(condition, what, timeout, alive=proc, seen=log_of(config).read_text)


@pytest.mark.parametrize("replacement", ["symlink to /dev/zero", "FIFO"])
def test_a_followed_path_that_is_not_a_regular_file_is_refused_and_costs_nothing(
        tmp_path: Path, replacement: str) -> None:
    """Anyone who can write the log's directory can put a symlink to /dev/zero (read for ever
    at a whole core, the stop never looked at) or a FIFO (its open blocks until a writer
    comes) in the followed file's place. `synwatch run` refuses it with one WARNING, idles,
    follows a regular file put back there, and stops at once."""
    syslog = tmp_path / "syslog"
    syslog.write_text("")
    config = host_config(tmp_path, f'[sources]\njournald = false\nkmsg = false\n'
                                   f'files = ["{syslog}"]\n')
    notify = NotifySocket(tmp_path / "notify.sock")

    def ports() -> list[int]:
        out = synwatch("events", "list", "--format", "json", "--config", str(config)).out
        return [e["port"] for e in json.loads(out)]

    def replace_with(make: Callable[[Path], object]) -> None:
        new = tmp_path / "syslog.new"
        make(new)
        new.replace(syslog)  # rename(2): the path changes in one step, as a rotation's does

    def refusals() -> int:
        return log_of(config).read_text().count("not a regular file")

    proc = start_service(config, notify)
    try:
        notify.wait_for("READY=1")
        def appended() -> bool:  # it is opened at its end: append until a line is recorded
            with syslog.open("a") as f:
                f.write(kernel_line(7000))
            return 7001 in ports()

        _wait_until("the first event", appended, proc, config)
        if replacement == "FIFO":
            replace_with(os.mkfifo)
        else:
            replace_with(lambda p: p.symlink_to("/dev/zero"))
        _wait_until("WARNING", lambda: refusals() > 0, proc, config)
        # two seconds of the service's life with the path refused: it stays idle (reading
        # /dev/zero took a whole core: 2 s of CPU)
        cpu, start = _cpu_seconds(proc.pid), time.monotonic()
        while (wall := time.monotonic() - start) < 2.0:
            used = _cpu_seconds(proc.pid) - cpu
            assert used < 0.5, f"{used:.2f} s of CPU in {wall:.2f} s"
            assert proc.poll() is None, log_of(config).read_text()
            time.sleep(0.1)
        used = _cpu_seconds(proc.pid) - cpu
        assert used < 0.5, f"{used:.2f} s of CPU in {wall:.2f} s"
        # a regular file again (a rotation): read from its start
        replace_with(lambda p: p.write_text(kernel_line(8000)))
        _wait_until("the event of the regular file", lambda: 8001 in ports(), proc, config)
    finally:
        began = time.monotonic()
        code, err = stop_service(proc)
        took = time.monotonic() - began
        notify.sock.close()
    assert code == 0, err
    assert took < 2.0, f"SIGTERM took {took:.1f} s"
    assert err.count("not a regular file") == 1, err
    warning = next(line for line in err.splitlines() if "not a regular file" in line)
    assert "WARNING" in warning and ("FIFO" if replacement == "FIFO" else
                                     "character device") in warning, warning
    assert f"{syslog}: a regular file again" in err
    assert "Traceback" not in err and f"source file:{syslog} failed" not in err, err
