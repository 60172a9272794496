"""Finds kernel lines in big logs fast.

Most lines of a log are not kernel SYN-flood lines. So the scanner does not look at lines: it
searches the raw bytes for the catalogue's needles (``bytes.find``, which runs at memory speed),
and only the lines around a hit are decoded, taken apart by their sink and matched.

The output of journalctl's record modes (``-o verbose``, ``-o export``, ``-o json-pretty``: one
entry over several lines) is known by its first line and read entry by entry instead, each
entry folded into one journal-JSON line (journalfold): a needle's line alone says nothing of
its entry's time or host.
"""

from __future__ import annotations

import gzip
import io
import itertools
import mmap
import os
import stat
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import BinaryIO, Protocol

from synwatch.errors import SynwatchError, UsageError
from synwatch.lines import journalfold, sinks
from synwatch.lines.catalogue import Catalogue
from synwatch.lines.match import match_record
from synwatch.lines.sinks import parse_line
from synwatch.records import KernelEvent, LogRecord

CHUNK = 8 << 20

Progress = Callable[[int], None]  # called with the number of input bytes consumed so far


@dataclass(frozen=True, slots=True)
class Hit:
    path: str
    line_no: int
    event: KernelEvent


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


class _Buffer(Protocol):
    def find(self, sub: bytes, start: int = ..., end: int = ..., /) -> int: ...
    def rfind(self, sub: bytes, start: int = ..., end: int = ..., /) -> int: ...


def needle_line_starts(buf: _Buffer, end: int, needles: tuple[bytes, ...],
                 progress: Progress | None = None) -> list[int]:
    """Offsets of the lines in ``buf[:end]`` that hold a needle, each once, in order."""
    starts: set[int] = set()
    for i, needle in enumerate(needles):
        if progress is not None:  # one pass over the buffer per needle
            progress(end * i // len(needles))
        pos = buf.find(needle, 0, end)
        while pos != -1:
            starts.add(buf.rfind(b"\n", 0, pos) + 1)
            stop = buf.find(b"\n", pos, end)
            if stop == -1:
                break
            pos = buf.find(needle, stop, end)
    return sorted(starts)


def _mapped_candidates(fd: int, needles: tuple[bytes, ...], line_numbers: bool,
                       progress: Progress | None) -> Iterator[tuple[int, bytes]]:
    """A regular file, mapped: no copies, and the kernel's page cache is searched in place."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as buf:
        starts = needle_line_starts(buf, size, needles, progress)
        if progress is not None:
            progress(size)
        counted_to, line_no = 0, 1
        for start in starts:
            if line_numbers:
                line_no += buf[counted_to:start].count(b"\n")
                counted_to = start
            stop = buf.find(b"\n", start)
            yield line_no, buf[start:stop if stop != -1 else size]


def candidate_lines(stream: Readable, needles: tuple[bytes, ...],
                    progress: Progress | None = None, line_numbers: bool = True,
                    on_overlong: journalfold.OnOverlong | None = None,
                    ) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) for every line holding one of ``needles``, in order. An
    entry of journalctl's record modes that holds one is one journal-JSON line, numbered by its
    needle's line; ``on_overlong`` hears of one too long to hold (journalfold).

    Without ``line_numbers`` the numbers are 0 (counting newlines is a third of the work).
    """
    fd = _regular_file_fd(stream)
    if fd is not None and journalfold.layout(os.pread(fd, journalfold.SNIFF, 0)) is None:
        yield from _mapped_candidates(fd, needles, line_numbers, progress)
        return
    chunks = _chunks(stream, progress)
    head: list[bytes] = []
    held = 0
    for chunk in chunks:  # enough of the start to know its layout
        head.append(chunk)
        held += len(chunk)
        if held >= journalfold.SNIFF:
            break
    start = b"".join(head)
    kind = journalfold.layout(start)
    rest = itertools.chain([start] if start else [], chunks)
    if kind is None:
        yield from _streamed_candidates(rest, needles)
    else:
        yield from journalfold.fold(rest, kind, needles, on_overlong)


def _chunks(stream: Readable, progress: Progress | None) -> Iterator[bytes]:
    """The stream's bytes, CHUNK at a time, with the progress told after every read."""
    consumed = 0
    while True:
        chunk = stream.read(CHUNK)
        consumed += len(chunk)
        if progress is not None:  # a .gz reports how far into the compressed file it is
            progress(stream.compressed_position() if isinstance(stream, _Input) else consumed)
        if not chunk:
            return
        yield chunk


def _streamed_candidates(chunks: Iterator[bytes],
                         needles: tuple[bytes, ...]) -> Iterator[tuple[int, bytes]]:
    carry = b""
    line_base = 1  # number of the first line in ``buf``
    for chunk in itertools.chain(chunks, [b""]):  # the empty chunk is the end
        at_eof = not chunk
        buf = carry + chunk if carry else chunk
        if at_eof:
            end = len(buf)
        else:
            end = buf.rfind(b"\n") + 1
            if end == 0:  # no newline yet: keep reading (one very long line)
                carry = buf
                continue
        counted_to, line_no = 0, line_base
        for start in needle_line_starts(buf, end, needles):
            line_no += buf.count(b"\n", counted_to, start)
            counted_to = start
            stop = buf.find(b"\n", start, end)
            yield line_no, buf[start:stop if stop != -1 else end]
        if at_eof:
            return
        line_base = line_no + buf.count(b"\n", counted_to, end)
        carry = buf[end:]


def _regular_file_fd(stream: Readable) -> int | None:
    raw = stream.stream if isinstance(stream, _Input) else stream
    fileno = getattr(raw, "fileno", None)
    if fileno is None or isinstance(raw, gzip.GzipFile):
        return None
    try:
        fd = int(fileno())
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (OSError, ValueError, io.UnsupportedOperation):
        return None


class _Input:
    """A readable input that reports read failures (a corrupt .gz, EIO) as errors naming it."""

    def __init__(self, path: str, stream: BinaryIO, size: int | None) -> None:
        self.path, self.stream, self.size = path, stream, size

    def read(self, n: int) -> bytes:
        try:
            return self.stream.read(n)
        except (OSError, EOFError, zlib.error) as exc:
            raise SynwatchError(self.path, f"cannot read: {exc}") from exc

    def compressed_position(self) -> int:
        raw = getattr(self.stream, "fileobj", self.stream)
        try:
            return int(raw.tell())
        except (OSError, ValueError):
            return 0

    def close(self) -> None:
        if self.stream is not sys.stdin.buffer:
            self.stream.close()


def open_input(path: str) -> _Input:
    """``path`` opened for reading: ``-`` is stdin, gzip data is decompressed."""
    if path == "-":
        return _Input(path, sys.stdin.buffer, None)
    try:
        raw = Path(path).open("rb")  # noqa: SIM115 - closed through _Input.close
        size = Path(path).stat().st_size
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
    except OSError as exc:
        raise UsageError(path, exc.strerror or str(exc)) from exc
    if gzipped:
        return _Input(path, gzip.GzipFile(fileobj=raw, mode="rb"), size)  # type: ignore[arg-type]
    return _Input(path, raw, size)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A line holding a needle, taken apart (``record``: None when it is not a kernel line)
    and matched (``event``: None when no pattern matches its message)."""

    line_no: int
    raw: bytes
    record: LogRecord | None
    event: KernelEvent | None


def candidates(stream: Readable, catalogue: Catalogue, *, now: datetime, tz: tzinfo,
               source: str = "scan", allow_trust: bool = True, progress: Progress | None = None,
               line_numbers: bool = True) -> Iterator[Candidate]:
    """The one loop of every reader of log files (scan, test-filter, import): candidate lines
    by their needles, each parsed by its sink and matched by the filters."""
    def overlong(line_no: int, head: bytes) -> None:  # counted like a line a parser refused
        sinks.BAD_LINES.add(source, head.decode("utf-8", "replace"), ValueError(
            f"the journal entry at line {line_no} is longer than {journalfold.MAX_RECORD} "
            "bytes"))

    for line_no, raw in candidate_lines(stream, catalogue.needles, progress, line_numbers,
                                        overlong):
        record = parse_candidate(raw, catalogue, now, tz, source=source, allow_trust=allow_trust)
        event = match_record(record, catalogue) if record is not None else None
        yield Candidate(line_no, raw, record, event)


def parse_candidate(raw: bytes, catalogue: Catalogue, now: datetime, tz: tzinfo, *,
                    source: str, allow_trust: bool) -> LogRecord | None:
    """A candidate line's bytes taken apart by its sink (the file source's step too, which
    hands records on and leaves the matching to the recorder)."""
    return parse_line(raw.decode("utf-8", "replace"), catalogue, now, tz, source=source,
                      allow_trust=allow_trust)


def scan_stream(stream: Readable, path: str, catalogue: Catalogue, *, now: datetime, tz: tzinfo,
                progress: Progress | None = None, line_numbers: bool = True,
                kinds: frozenset[str] | None = None) -> Iterator[Hit]:
    """The events in ``stream`` (of ``kinds`` only, when given)."""
    for c in candidates(stream, catalogue, now=now, tz=tz, progress=progress,
                        line_numbers=line_numbers):
        if c.event is not None and (kinds is None or c.event.kind in kinds):
            yield Hit(path, c.line_no, c.event)
