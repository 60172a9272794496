"""/dev/kmsg: the kernel's ring buffer, one record per read.

Trusted for records of facility 0 (the kernel forces facility user on writes from userspace).
Resumes by sequence number within a boot; a record overwritten before we read it (EPIPE) is
counted and reported, never silently skipped.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from synwatch.clock import local_timezone
from synwatch.errors import SourceUnavailable
from synwatch.lines.catalogue import Catalogue
from synwatch.lines.sinks import parse_line
from synwatch.records import LogRecord
from synwatch.sources.base import Batch, Emit

BATCH = 256


def current_boot_id(proc: Path = Path("/proc")) -> str:
    try:
        return (proc / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class KmsgSource:
    name = "kmsg"

    def __init__(self, catalogue: Catalogue, path: str = "/dev/kmsg",
                 position: dict[str, Any] | None = None, proc: Path = Path("/proc"),
                 opener: Callable[[], int] | None = None) -> None:
        self.catalogue = catalogue
        self.path = path
        self.opener = opener or (lambda: os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))
        self.proc = proc
        self.position: dict[str, Any] = dict(position or {})
        self._needles = catalogue.text_needles

    def check_available(self) -> None:
        if self.path == "/dev/kmsg" and not os.access(self.path, os.R_OK):
            raise SourceUnavailable(self.path, "not readable (needs root or CAP_SYSLOG)")

    def _boot_wall_clock(self) -> datetime:
        # kmsg stamps are microseconds of the monotonic clock since boot
        return datetime.now(timezone.utc) - timedelta(seconds=time.monotonic())

    def stream(self, emit: Emit, stop: threading.Event) -> None:
        boot = current_boot_id(self.proc)
        last_seq = self.position.get("seq") if self.position.get("boot") == boot else None
        try:
            fd = self.opener()
        except OSError as exc:
            raise SourceUnavailable(self.path, exc.strerror or str(exc)) from exc
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        boot_wall, tz = self._boot_wall_clock(), local_timezone()
        try:
            while not stop.is_set():
                records: list[LogRecord] = []
                notes: list[str] = []
                for _ in range(BATCH):
                    try:
                        raw = os.read(fd, 8192)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno == errno.EPIPE:  # overwritten; the next read goes on
                            continue
                        raise
                    head = raw.split(b"\n", 1)[0].decode("utf-8", "replace")
                    fields = head.split(",", 3)
                    try:
                        seq, usec = int(fields[1]), int(fields[2])
                    except (IndexError, ValueError):
                        continue
                    if last_seq is not None and seq <= last_seq:
                        continue  # read before the restart
                    if last_seq is not None and seq > last_seq + 1:
                        notes.append(f"{seq - last_seq - 1} kernel records were overwritten "
                                     "in the ring buffer before they could be read")
                    last_seq = seq
                    if not any(n in head for n in self._needles):
                        continue
                    record = parse_line(head, self.catalogue, boot_wall, tz, source=self.name)
                    if record is not None:
                        records.append(replace(
                            record, time=boot_wall + timedelta(microseconds=usec),
                            position=f"kmsg:{boot}:{seq}"))
                if last_seq is not None and (records or notes
                                             or last_seq != self.position.get("seq")):
                    self.position = {"boot": boot, "seq": last_seq}
                    emit(Batch(self.name, tuple(records), dict(self.position), tuple(notes)))
                    continue
                poller.poll(500)
        finally:
            os.close(fd)
