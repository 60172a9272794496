"""Syslog files: followed across every kind of rotation, resumed without replay or loss.

watchdog watches the *directory* (so renames, creations and deletions are seen) and wakes the
follower; a periodic stat catches whatever inotify missed (queue overflow). Rotation by rename
keeps the old descriptor open and drains it, since the writer may go on writing to it for a
while; copytruncate is detected by size and by a changed first line; a deleted file is drained
and a recreated one read from the start. The position (inode, offset after the last complete
line, first-line hash, for every file still being read) is stored with the events it covers.

Nothing read from a text file is trusted: any local user can write kernel-looking lines. Nor is
the path itself: anyone who can write the log's directory can put a symlink to /dev/zero, a
device or a FIFO in its place. Only a regular file is read (the path is opened with O_PATH and
checked before it is opened for reading, so a device's open is never called and a FIFO never
blocks us); anything else is refused with one WARNING until a regular file is back. Reading is
bounded per turn (READ_TURN), so a fast-growing file cannot keep the thread from its stop.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from synwatch.clock import local_timezone
from synwatch.errors import SourceUnavailable
from synwatch.lines.catalogue import Catalogue
from synwatch.lines.scan import needle_line_starts, parse_candidate
from synwatch.records import LogRecord
from synwatch.sources.base import Batch, Emit, OccurrenceCounter

log = logging.getLogger(__name__)
READ = 1 << 20
READ_TURN = 16 * READ  # at most this much of one file per turn; the next turn comes at once
STOP_CHECK = 0.2  # the longest wait between two looks at the stop event
# A kernel line is under 1 KiB (printk's LOG_LINE_MAX); a "line" without a newline past this
# is skipped, not buffered: a local user could otherwise grow our memory without bound.
MAX_LINE = 64 << 10
HEAD = 512  # bytes of the first line that identify a file's content


def _head_hash(fd: int) -> str | None:
    first = os.pread(fd, HEAD, 0)
    end = first.find(b"\n")
    if end == -1 and len(first) < HEAD:
        return None  # no complete first line yet
    return hashlib.sha1(first[: end if end != -1 else HEAD],
                        usedforsecurity=False).hexdigest()[:16]


@dataclass
class _Open:
    """One open file: the followed path's current file, or a rotated one being drained."""

    fd: int
    ino: int
    dev: int
    offset: int
    head: str | None
    generation: int = 0
    partial: bytes = b""
    overlong: bool = False  # inside a line longer than MAX_LINE: skipped to its newline
    last_growth: float = field(default_factory=time.monotonic)
    draining: bool = False

    def state(self) -> dict[str, Any]:
        return {"ino": self.ino, "dev": self.dev, "offset": self.offset, "head": self.head,
                "gen": self.generation, "draining": self.draining}


class FileSource:
    def __init__(self, catalogue: Catalogue, path: str, position: dict[str, Any] | None = None,
                 *, poll_interval: float = 1.0, drain_grace: float = 30.0,
                 use_inotify: bool = True) -> None:
        self.catalogue = catalogue
        self.path = path
        self.name = f"file:{path}"
        self.position: dict[str, Any] = dict(position or {})
        self.poll_interval = poll_interval
        self.drain_grace = drain_grace
        self.use_inotify = use_inotify
        self._counter = OccurrenceCounter(self.position.get("counts"))
        self._files: list[_Open] = []
        self._records: list[LogRecord] = []
        self._notes: list[str] = []
        self._now = datetime.now(timezone.utc)
        self._tz = local_timezone()
        self._refused: str | None = None  # the kind of the non-regular file warned about
        self._behind = False  # a read stopped at READ_TURN: the next turn comes at once
        self.rounds = 0  # checks done (and their batches emitted): a caller can wait on it

    def check_available(self) -> None:
        directory = Path(self.path).parent
        if not directory.is_dir():
            raise SourceUnavailable(self.name, f"directory {directory} does not exist")
        if Path(self.path).exists() and not os.access(self.path, os.R_OK):
            raise SourceUnavailable(self.name, "not readable")

    # -- opening ------------------------------------------------------------------------------

    def _open(self, path: str, offset: int | None, generation: int = 0) -> _Open | None:
        """``path`` opened for reading if it is a regular file (through a symlink too). It is
        first opened with O_PATH, which calls no driver's open and never blocks on a FIFO, and
        the very file checked is then opened for reading through /proc: no race between the
        check and the open."""
        try:
            handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a symlink loop, a path through a file
            self._refuse(path, exc.strerror or str(exc))
            return None
        try:
            st = os.fstat(handle)
            if not stat.S_ISREG(st.st_mode):
                self._refuse(path, _kind(st.st_mode))
                return None
            fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        finally:
            os.close(handle)
        if path == self.path and self._refused is not None:
            log.info("%s: a regular file again; following it", path)
            self._refused = None
        start = st.st_size if offset is None else offset
        return _Open(fd, st.st_ino, st.st_dev, start, _head_hash(fd), generation)

    def _refuse(self, path: str, kind: str) -> None:
        """One WARNING while the followed path is not a regular file, however long it lasts."""
        if path != self.path or self._refused is not None:
            return
        self._refused = kind
        log.warning("%s: not a regular file (%s); not read until a regular file is there again",
                    path, kind)

    def _find_by_inode(self, ino: int, dev: int) -> str | None:
        """Where a file we were reading went while we were down (syslog -> syslog.1)."""
        directory = Path(self.path).parent
        base = Path(self.path).name
        for candidate in sorted(directory.glob(base + "*")):
            try:
                st = candidate.stat()
            except OSError:
                continue
            if st.st_ino == ino and st.st_dev == dev:
                return str(candidate)
        return None

    def _resume(self) -> None:
        saved = self.position.get("files") or []
        current = None
        for entry in saved:
            where = self._find_by_inode(entry["ino"], entry["dev"])
            if where is None:
                self._notes.append(f"{self.path}: a file being read before the restart "
                                   "(inode {}) is gone; its unread tail is lost".format(
                                       entry["ino"]))
                continue
            opened = self._open(where, entry["offset"], entry.get("gen", 0))
            if opened is None:
                continue
            if (opened.head != entry.get("head") and entry.get("head") is not None) or \
                    os.fstat(opened.fd).st_size < entry["offset"]:
                # truncated (copytruncate) while we were down: read it again from the start
                opened.offset, opened.generation = 0, entry.get("gen", 0) + 1
                opened.head = _head_hash(opened.fd)
            opened.draining = where != self.path
            if not opened.draining:
                current = opened
            self._files.append(opened)
        if current is None:
            # A first start begins at the end (`synwatch import` reads the past); a file that
            # appeared after we stopped, or while we were reading its predecessor, from the start.
            fresh = self._open(self.path, None if not saved else 0)
            if fresh is not None and not any(f.ino == fresh.ino for f in self._files):
                self._files.append(fresh)
            elif fresh is not None:
                os.close(fresh.fd)

    # -- reading ------------------------------------------------------------------------------

    def _read(self, f: _Open) -> None:
        """Read what ``f`` has, up to READ_TURN (``_behind`` says when there is more)."""
        budget = READ_TURN
        while True:
            if budget <= 0:
                self._behind = True
                return
            chunk = os.pread(f.fd, READ, f.offset + len(f.partial))
            if not chunk:
                return
            budget -= len(chunk)
            f.last_growth = time.monotonic()
            data = f.partial + chunk
            if f.overlong:
                newline = data.find(b"\n")
                f.offset += len(data) if newline < 0 else newline + 1
                f.partial, f.overlong = b"", newline < 0
                if newline < 0:
                    continue
                data = data[newline + 1:]
            end = data.rfind(b"\n") + 1
            for start in needle_line_starts(data, end, self.catalogue.needles):
                stop = data.find(b"\n", start, end)
                self._take(data[start:stop])
            f.offset += end
            f.partial = data[end:]
            if len(f.partial) > MAX_LINE:
                log.warning("%s: a line longer than %d bytes at offset %d is skipped (no kernel "
                            "line is that long)", self.path, MAX_LINE, f.offset)
                f.offset += len(f.partial)
                f.partial, f.overlong = b"", True
            if f.head is None:
                f.head = _head_hash(f.fd)

    def _take(self, raw: bytes) -> None:
        identity = self._counter.identity(raw)
        record = parse_candidate(raw, self.catalogue, self._now, self._tz, source=self.name,
                                 allow_trust=False)
        if record is not None:  # allow_trust=False: never trusted
            self._records.append(replace(record, position=identity))

    def _finish(self, f: _Open) -> None:
        if f.partial:  # the writer is gone: a last line without its newline is still a line
            if any(n in f.partial for n in self.catalogue.needles):
                self._take(f.partial)
            f.offset += len(f.partial)
            f.partial = b""
        os.close(f.fd)
        self._files.remove(f)

    def _check(self) -> None:
        self._now = datetime.now(timezone.utc)
        self._behind = False
        try:
            st: os.stat_result | None = Path(self.path).stat()
        except FileNotFoundError:
            st = None
        except OSError as exc:  # a symlink loop, a path through a file
            self._refuse(self.path, exc.strerror or str(exc))
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            self._refuse(self.path, _kind(st.st_mode))
            st = None  # what was read before is drained as after a rotation; nothing is opened
        current = next((f for f in self._files if not f.draining), None)
        if current is not None and (st is None or st.st_ino != current.ino
                                    or st.st_dev != current.dev):
            current.draining = True  # renamed or deleted: keep reading what is left
            current = None
        if current is None and st is not None:
            current = self._open(self.path, 0)
            if current is not None:
                self._files.append(current)
        for f in list(self._files):
            if not f.draining:
                size = os.fstat(f.fd).st_size
                head = _head_hash(f.fd) if f.head is not None else None
                if size < f.offset or (f.head is not None and head != f.head):
                    log.info("%s: truncated (copytruncate); reading it again from the start",
                             self.path)
                    f.offset, f.partial, f.head = 0, b"", _head_hash(f.fd)
                    f.generation += 1
            self._read(f)
            if f.draining and time.monotonic() - f.last_growth > self.drain_grace:
                self._finish(f)

    # -- the stream ---------------------------------------------------------------------------

    def _batch(self) -> Batch | None:
        position = {"files": [f.state() for f in self._files],
                    "counts": dict(self._counter.counts)}
        if not self._records and not self._notes and position == self.position:
            return None
        self.position = position
        batch = Batch(self.name, tuple(self._records), position, tuple(self._notes))
        self._records, self._notes = [], []
        return batch

    def stream(self, emit: Emit, stop: threading.Event) -> None:
        poke = threading.Event()
        observer = _watch(Path(self.path).parent, poke) if self.use_inotify else None
        try:
            if not self._files:
                self._resume()
            while not stop.is_set():
                self._check()
                batch = self._batch()
                if batch is not None:
                    emit(batch)
                self.rounds += 1
                if not self._behind:
                    self._wait(poke, stop)
                poke.clear()
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)

    def _wait(self, poke: threading.Event, stop: threading.Event) -> None:
        """Until poked or poll_interval has passed, looking at ``stop`` every STOP_CHECK."""
        deadline = time.monotonic() + self.poll_interval
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or poke.wait(min(left, STOP_CHECK)):
                return


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _watch(directory: Path, poke: threading.Event) -> Any:
    from watchdog.events import (  # noqa: PLC0415 - only the file source needs it
        FileCreatedEvent,
        FileDeletedEvent,
        FileModifiedEvent,
        FileMovedEvent,
        FileSystemEventHandler,
    )
    from watchdog.observers import Observer  # noqa: PLC0415

    class Poke(FileSystemEventHandler):
        def on_any_event(self, event: Any) -> None:
            poke.set()  # the follower does the work on its own thread

    observer = Observer()
    observer.schedule(Poke(), str(directory), recursive=False,
                      event_filter=[FileModifiedEvent, FileCreatedEvent, FileMovedEvent,
                                    FileDeletedEvent])
    observer.start()
    return observer
