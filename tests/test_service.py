"""`synwatch run` as systemd runs it: sd_notify over a real socket, SIGHUP, SIGTERM, watchdog."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import synwatch
from tests.support.harness import NotifySocket, host_config, log_of, start_service, stop_service
from tests.support.journald import Journald
from tests.support.wait import eventually


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.sock.close()


def test_ready_reload_and_clean_stop(tmp_path: Path, notify: NotifySocket) -> None:
    config = host_config(tmp_path, "[sources]\njournald = false\nkmsg = false\n")
    proc = start_service(config, notify)
    try:
        notify.wait_for("READY=1")
        assert (tmp_path / "h.db").exists(), "the store is opened and migrated at start"
        # the one-line summary `systemctl status` shows, also in the status file
        notify.wait_for("STATUS=watching the host: 0 sources, 0 open incidents, 0 bans")
        status = synwatch("status", "--config", str(config))
        assert status.code == 0 and f"running (pid {proc.pid})" in status.out, status
        # a good reload
        config.write_text(config.read_text() + '[incident]\nquiet_period = "2m"\n')
        proc.send_signal(signal.SIGHUP)
        seen = notify.wait_for("READY=1")
        assert any("RELOADING=1" in d and "MONOTONIC_USEC=" in d for d in seen)
        # a bad reload keeps the service running on the old configuration
        config.write_text(config.read_text() + "[nonsense]\n")
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1")
        assert proc.poll() is None
    finally:
        code, err = stop_service(proc)
    assert code == 0
    assert "STOPPING=1" in "".join(notify.wait_for("STOPPING=1"))
    config.write_text(config.read_text().replace("[nonsense]\n", ""))
    status = synwatch("status", "--config", str(config))
    assert status.code == 3 and "synwatch: not running" in status.out, status
    assert "configuration reloaded" in err
    assert "reload refused, keeping the running configuration" in err
    assert "nonsense: unknown section" in err


def test_watchdog_pings(tmp_path: Path, notify: NotifySocket) -> None:
    config = host_config(tmp_path)
    proc = start_service(config, notify, WATCHDOG_USEC="400000")
    try:
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", timeout=5)
        notify.wait_for("WATCHDOG=1", timeout=5)
    finally:
        assert stop_service(proc)[0] == 0


def test_bad_config_at_start_is_exit_2(tmp_path: Path, notify: NotifySocket) -> None:
    config = tmp_path / "synwatch.toml"
    config.write_text("[incident]\nquiet_period = 60\n")
    proc = start_service(config, notify)
    proc.wait(timeout=20)
    err = log_of(config).read_text()
    assert proc.returncode == 2
    assert err.startswith(f"synwatch: config {config}: incident.quiet_period: ")


def test_logs_which_sources_it_uses_and_why(tmp_path: Path, notify: NotifySocket) -> None:
    config = host_config(tmp_path, '[sources]\nfiles = ["/var/log/kern.log"]\n')
    proc = start_service(config, notify)
    try:
        notify.wait_for("READY=1")
    finally:
        _, err = stop_service(proc)
    assert "source file:/var/log/kern.log: configured (untrusted" in err
    assert "source journald" in err and "source kmsg" in err


def test_a_poison_line_in_a_followed_file_stops_nothing(tmp_path: Path,
                                                        notify: NotifySocket) -> None:
    """`logger` lets any local user put a line with a 5,000-digit port into syslog. It used to
    raise out of the filters, stop the service, and stop it again at every restart (its offset
    was never saved). It is skipped and counted; the lines after it are recorded."""
    import json

    from tests.support.cli import synwatch

    syslog = tmp_path / "syslog"
    syslog.write_text("")
    config = host_config(tmp_path, f'[sources]\njournald = false\nkmsg = false\n'
                                   f'files = ["{syslog}"]\n')

    def line(port: str) -> str:
        return (f"Nov 21 12:00:00 web01 kernel: TCP: request_sock_TCP: Possible SYN flooding "
                f"on port 0.0.0.0:{port}. Sending cookies.\n")

    def ports() -> list[int]:
        out = synwatch("events", "list", "--format", "json", "--config", str(config)).out
        return [e["port"] for e in json.loads(out)]

    def follow(want: int, write: str = "") -> None:
        def followed() -> bool:
            if want in ports():
                return True
            if write:
                with syslog.open("a") as f:
                    f.write(write)
            return False

        eventually(followed, f"port {want} followed", 20, every=0.5, alive=proc,
                   seen=log_of(config).read_text)

    proc = start_service(config, notify)
    notify.wait_for("READY=1")
    follow(7000, write=line("7000"))  # the source follows the file (it opens at its end)
    with syslog.open("a") as f:
        f.write(line("9" * 5000) + line("8080"))
    follow(8080)
    code, log = stop_service(proc)
    assert code == 0
    assert "Traceback" not in log and "internal error" not in log
    proc = start_service(config, notify)  # the restart does not choke on it either
    notify.wait_for("READY=1")
    with syslog.open("a") as f:
        f.write(line("9" * 5000) + line("8443"))
    follow(8443)
    code, _ = stop_service(proc)
    assert code == 0
    assert [p for p in ports() if p != 7000] == [8080, 8443]  # each once; the poison never


def test_logs_to_the_journal_carry_their_priority(tmp_path: Path, journald: Journald) -> None:
    """Under systemd, stderr is the journal (JOURNAL_STREAM says so): each line starts with its
    syslog priority, so `journalctl -p warning` shows the warnings and not the rest."""
    tag = f"synwatch-test-{os.getpid()}"
    config = host_config(tmp_path, "[sources]\njournald = false\nkmsg = false\n")
    # what systemd does for a unit: stderr connected to a journal stream, JOURNAL_STREAM set
    proc = subprocess.Popen(
        ["systemd-cat", "-t", tag, "sh", "-c",
         'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$@"', "sh",
         sys.executable, "-m", "synwatch", "run", "--config", str(config)])

    def journal(*args: str) -> str:
        return subprocess.run(["journalctl", "-t", tag, "-o", "cat", "--no-pager", *args],
                              capture_output=True, text=True, check=True).stdout

    try:
        eventually(lambda: "synwatch running" in journal(), "the start in the journal", 20,
                   alive=proc, seen=journal)
    finally:
        subprocess.run(["pkill", "-TERM", "-f", f"synwatch run --config {config}"], check=False)
        proc.wait(20)
    warnings = journal("-p", "warning")
    assert "synwatch: no log source to read; kernel state is still probed" in warnings
    assert "synwatch running" not in warnings and "INFO" not in journal()
    assert not any(line.startswith("<") for line in journal().splitlines())  # parsed, not shown
    # the journal has its own time for each line: none of ours
    assert not re.search(r"^\d{4}-\d\d-\d\d ", journal(), re.MULTILINE), journal()


def test_the_service_in_the_foreground_says_when(tmp_path: Path, notify: NotifySocket) -> None:
    """On a terminal or in a file, each line of `synwatch run` starts with its time, and the
    start says what it does in a few lines; a command's warning has no time (it is now)."""
    config = host_config(tmp_path, "[sources]\njournald = false\nkmsg = false\n")
    proc = start_service(config, notify)
    notify.wait_for("READY=1")
    code, log = stop_service(proc)
    assert code == 0
    lines = [line for line in log.splitlines()
             if re.search(r"\b(INFO|WARNING|ERROR) synwatch", line)]  # records, not their text
    stamped = [line for line in lines
               if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (INFO|WARNING) synwatch", line)]
    assert stamped and len(stamped) == len(lines), log
    # short: a dry run's setup in one line (its script is for --debug), the flood's sources
    # of evidence in one
    assert "action ban nftables setup: dry run, not done" in log, log
    assert "add table inet synwatch" not in log
    assert log.count("sources of a flood: ") == 1 and "SYN-RECV sockets" in log
    r = synwatch("check-config", "--config", str(config))
    assert not re.search(r"^\d{4}-", r.out + r.err, re.MULTILINE), r
