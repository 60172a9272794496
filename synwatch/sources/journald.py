"""journald: the only place where kernel lines come with proof of origin.

Reads entries matching ``_TRANSPORT=kernel`` AND ``SYSLOG_FACILITY=0`` (root's /dev/kmsg writes
and journald's own lines also use the kernel transport, with other facilities), through
systemd-python when installed, else ``journalctl -o json``. The cursor is stored with the events
it covers; on start we seek to it and skip that entry. A cursor the journal no longer has
(vacuumed, a volatile journal after a reboot) is detected and we fall back to the time of the
last entry we stored, which we say in the log. A journald that stops answering makes stream()
raise, so the supervisor restarts us with backoff; we resume from the cursor, without a gap.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from synwatch.errors import SourceUnavailable
from synwatch.lines.catalogue import Catalogue
from synwatch.lines.sinks import journal_entry_is_kernels
from synwatch.lines.timeparse import from_epoch_micros
from synwatch.records import LogRecord
from synwatch.sources.base import Batch, Emit, journal_reader

log = logging.getLogger(__name__)
MATCH = {"_TRANSPORT": "kernel", "SYSLOG_FACILITY": "0"}
JOURNALD_SOCKET = "/run/systemd/journal/socket"
BATCH = 500
LIVENESS_EVERY = 5.0


class Reader(Protocol):
    """One journal reader: systemd-python or journalctl, the same to the source."""

    name: str

    def start(self, cursor: str | None, since_usec: int | None) -> bool:
        """Position after ``cursor`` (True if the journal still has it), else at
        ``since_usec``, else at the start of this boot."""
        ...

    def entries(self) -> Iterator[dict[str, str]]:
        """Entries available now, as strings."""
        ...

    def wait(self, timeout: float) -> None: ...

    def close(self) -> None: ...


def _text(value: Any) -> str:
    if isinstance(value, datetime):
        return str(int(value.timestamp() * 1_000_000))
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class SystemdReader:
    name = "systemd-python"

    def __init__(self, directory: str | None = None) -> None:
        from systemd import journal  # noqa: PLC0415 - optional binding

        self._journal = journal
        self._reader = journal.Reader(path=directory) if directory else journal.Reader()
        self._reader.add_match(**MATCH)

    def start(self, cursor: str | None, since_usec: int | None) -> bool:
        r = self._reader
        if cursor:
            try:
                r.seek_cursor(cursor)
                if r.get_next() and r.test_cursor(cursor):
                    return True  # we are on the stored entry; entries() continues after it
            except (ValueError, OSError):  # a malformed cursor: treat it as gone
                pass
        if since_usec is not None:
            r.seek_realtime(since_usec / 1e6)
        else:
            r.this_boot()
            r.seek_head()
        return False

    def entries(self) -> Iterator[dict[str, str]]:
        while True:
            entry = self._reader.get_next()
            if not entry:
                return
            yield {k: _text(v) for k, v in entry.items()
                   if k in ("MESSAGE", "__CURSOR", "__REALTIME_TIMESTAMP", "_HOSTNAME",
                            "_TRANSPORT", "SYSLOG_FACILITY")}

    def wait(self, timeout: float) -> None:
        self._reader.wait(timeout)

    def close(self) -> None:
        self._reader.close()


class JournalctlReader:
    """``journalctl -o json --follow``; journalctl, not us, handles rotation and new files."""

    name = "journalctl -o json"

    def __init__(self, directory: str | None = None) -> None:
        self._dir = ["--directory", directory] if directory else []
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self._lines: deque[bytes] = deque()

    def _cursor_present(self, cursor: str) -> bool:
        try:
            out = subprocess.run(["journalctl", *self._dir, "-o", "json", "--cursor", cursor,
                                  "--output-fields=__CURSOR", "--no-pager", *self._matches()],
                                 capture_output=True, timeout=30, check=False).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SourceUnavailable("journald", f"journalctl: {exc}") from exc
        first = out.split(b"\n", 1)[0]
        try:
            return bool(first) and json.loads(first).get("__CURSOR") == cursor
        except ValueError:
            return False

    @staticmethod
    def _matches() -> list[str]:
        return [f"{k}={v}" for k, v in MATCH.items()]

    def start(self, cursor: str | None, since_usec: int | None) -> bool:
        found = bool(cursor) and self._cursor_present(cursor or "")
        if found:
            where = ["--after-cursor", cursor or ""]
        elif since_usec is not None:
            where = ["--since", f"@{since_usec / 1e6:.6f}"]
        else:
            where = ["--boot"]
        argv = ["journalctl", *self._dir, "-o", "json", "--follow", "--no-tail", "--all",
                "--no-pager", *where, *self._matches()]
        try:
            # its own session: Ctrl-C in a terminal (the process group's SIGINT) stops
            # synwatch, which then closes journalctl, instead of killing journalctl first and
            # logging that as a failed source (the unit's KillMode=mixed does the same for a
            # stop by systemd)
            self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise SourceUnavailable("journald", f"cannot run journalctl: {exc}") from exc
        return found

    def entries(self) -> Iterator[dict[str, str]]:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        fd = proc.stdout.fileno()
        while True:
            # lines are taken off the reader one by one: the source stops at a full batch
            # and asks again, and a line read but not yet handed over must still be there
            while self._lines:
                line = self._lines.popleft()
                if line.strip():
                    yield {k: _text(v) for k, v in json.loads(line).items()
                           if isinstance(v, str | int)}
            if not select.select([fd], [], [], 0)[0]:
                return
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise SourceUnavailable("journald", f"journalctl exited with status {proc.wait()}")
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\n")
            self._lines.extend(lines)

    def wait(self, timeout: float) -> None:
        if self._proc is not None and self._proc.stdout is not None:
            select.select([self._proc.stdout.fileno()], [], [], timeout)

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()


def make_reader(directory: str | None = None) -> Reader:
    which = journal_reader()
    if which == SystemdReader.name:
        return SystemdReader(directory)
    if which == JournalctlReader.name:
        return JournalctlReader(directory)
    raise SourceUnavailable("journald", "neither systemd-python nor journalctl is installed")


def journald_alive(socket_path: str = JOURNALD_SOCKET) -> bool:
    """Is a journald listening? (Reading the files gives no error when it has died.)"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(socket_path)
        except OSError:
            return False
    return True


class KernelWake:
    """Wakes the journal reader when the kernel logs something.

    journald writes an entry at once but tells readers (inotify) up to 250 ms later, as it
    batches its change notifications. /dev/kmsg becomes readable the moment the kernel prints,
    so after a kernel record we look at the journal every 10 ms for half a second instead.
    Without /dev/kmsg (not root, dmesg_restrict) the journal's own notification is used.
    """

    EAGER_FOR = 0.5
    EAGER_EVERY = 0.01

    def __init__(self, path: str = "/dev/kmsg") -> None:
        self._eager_until = 0.0
        try:
            self.fd: int | None = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.fd = None
        self._poll = select.poll()
        if self.fd is not None:
            self._poll.register(self.fd, select.POLLIN)

    def _drain(self) -> None:
        assert self.fd is not None
        while True:
            try:
                os.read(self.fd, 8192)
            except BlockingIOError:
                return
            except BrokenPipeError:  # records overwritten before we read them: read on
                continue

    def wait(self, reader: Reader, timeout: float) -> None:
        if self.fd is None:
            reader.wait(timeout)
            return
        eager = time.monotonic() < self._eager_until
        if self._poll.poll((self.EAGER_EVERY if eager else timeout) * 1000):
            self._drain()
            self._eager_until = time.monotonic() + self.EAGER_FOR
        reader.wait(0)  # let the reader take in new journal files (rotation)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class JournaldSource:
    name = "journald"

    def __init__(self, catalogue: Catalogue, position: dict[str, Any] | None = None, *,
                 directory: str | None = None, socket_path: str = JOURNALD_SOCKET,
                 reader_factory: Any = make_reader) -> None:
        self.catalogue = catalogue
        self.position: dict[str, Any] = dict(position or {})
        self.directory = directory
        self.socket_path = socket_path
        self.reader_factory = reader_factory
        self._needles = catalogue.text_needles

    def check_available(self) -> None:
        if not journald_alive(self.socket_path):
            raise SourceUnavailable("journald", f"not running (nothing listens on "
                                                f"{self.socket_path})")
        if self.directory is None and not any(
                Path(d).is_dir() for d in ("/run/log/journal", "/var/log/journal")):
            raise SourceUnavailable("journald", "no journal files")

    def _record(self, entry: dict[str, str]) -> LogRecord | None:
        message = entry.get("MESSAGE", "")
        if not any(n in message for n in self._needles):
            return None
        realtime = entry.get("__REALTIME_TIMESTAMP")
        return LogRecord(
            line=message, sink="journald", message=message,
            time=from_epoch_micros(realtime) if realtime else None,  # bounded: never raises
            host=entry.get("_HOSTNAME"),
            trusted=journal_entry_is_kernels(entry.get("_TRANSPORT"),
                                             entry.get("SYSLOG_FACILITY")),
            source=self.name, position=f"journal:{entry.get('__CURSOR', '')}")

    def stream(self, emit: Emit, stop: threading.Event) -> None:
        reader = self.reader_factory(self.directory)
        # journalctl has its own notification delay, which waking us early cannot shorten
        wake = KernelWake() if reader.name == SystemdReader.name and self.directory is None \
            else None
        try:
            cursor = self.position.get("cursor")
            since = self.position.get("realtime")
            found = reader.start(cursor, since)
            if cursor and not found:
                log.warning("journald: the stored cursor is no longer in the journal (vacuumed, "
                            "or a volatile journal after a reboot); reading from the time of "
                            "the last entry read, %s", _when(since))
            log.info("journald: reading with %s %s", reader.name,
                     "after the stored cursor" if found else
                     (f"from {_when(since)}" if since else "from the start of this boot"))
            next_liveness = time.monotonic() + LIVENESS_EVERY
            while not stop.is_set():
                records: list[LogRecord] = []
                last: dict[str, str] | None = None
                for entry in reader.entries():
                    last = entry
                    record = self._record(entry)
                    if record is not None:
                        records.append(record)
                    if len(records) >= BATCH:
                        break
                if last is not None:
                    self.position = {"cursor": last.get("__CURSOR"),
                                     "realtime": int(last.get("__REALTIME_TIMESTAMP", "0"))}
                    emit(Batch(self.name, tuple(records), dict(self.position)))
                    continue
                if time.monotonic() >= next_liveness:
                    next_liveness = time.monotonic() + LIVENESS_EVERY
                    if not journald_alive(self.socket_path):
                        raise SourceUnavailable("journald", "stopped answering on "
                                                            f"{self.socket_path}")
                if wake is not None:
                    wake.wait(reader, 0.5)
                else:
                    reader.wait(0.5)
        finally:
            reader.close()
            if wake is not None:
                wake.close()


def _when(usec: int | None) -> str:
    if not usec:
        return "the start of this boot"
    return datetime.fromtimestamp(usec / 1e6, timezone.utc).isoformat()
