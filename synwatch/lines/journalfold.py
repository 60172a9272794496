"""journalctl's record modes folded into journal-JSON lines, for `scan` and `import`.

Three `journalctl -o` modes print one journal entry over several lines (man journalctl, -o):

* ``verbose``: a header line with the entry's time and cursor (``Sun 2026-12-06 10:24:10.050143
  UTC [s=...;t=661f48286ca5f;x=...]``), then one ``    KEY=VALUE`` line per field: four
  spaces; a value's further lines indented past its ``=``; a value too long or not printable
  shown as ``KEY=[1.2K blob data]`` (systemd src/shared/logs-show.c, output_verbose);
* ``export``, systemd's Journal Export Format (https://systemd.io/JOURNAL_EXPORT_FORMATS/):
  ``KEY=VALUE`` lines; a value holding a newline or a control character as ``KEY``, a newline,
  its size as a little-endian 64-bit integer, its bytes and a newline; an empty line after each
  entry;
* ``json-pretty``: one JSON object over several lines, ``{`` and ``}`` alone on theirs.

An entry whose lines hold a needle becomes the one line ``journalctl -o json`` prints for it
(``__CURSOR``, ``__REALTIME_TIMESTAMP`` and the fields; a field given twice as the list of its
values, a value that is not UTF-8 as the list of its bytes: man journalctl, json), so the
journal-JSON sink takes it apart as it takes a ``-o json`` line: the same time, host and trust.

Fast where it can be: the entries before the next needle hold nothing to fold, so they are
skipped whole (``bytes.find``, as the plain scanner does), and only the entry of a needle is read
line by line.

Pure and streaming: the chunks are read as they come, an entry is held until its end and never
past MAX_RECORD bytes. A longer one is dropped (``on_overlong`` is told when it held a needle,
so that it is counted like a line a parser could not take) and the rest is read on. The layout
is the first line's (``layout``); a line of another shape (``-- Boot ... --``, anything) ends
the entry being read and is passed on as it is, like any line of a log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

Layout = Literal["verbose", "export", "json-pretty"]
FieldValue = str | list[int]

# Enough of a file's start to find its first entry (an export entry of the kernel's is ~800 bytes)
SNIFF = 64 << 10
# An entry held at most this long. A kernel entry is ~1 KiB in any mode (printk's lines are under
# 1 KiB); what is longer (a core dump stored in the journal) is no kernel line.
MAX_RECORD = 64 << 10
# A binary export field claiming more than this is no field (journald stores none over 768 MiB,
# DATA_SIZE_MAX): its line is taken as a plain line, and nothing is skipped on its word.
MAX_BINARY = 1 << 30

# journal_field_valid(): upper-case letters, digits and "_", not a digit first, at most 64
_NAME = rb"[A-Z_][A-Z0-9_]{0,63}"
# A cursor is key=hex pairs joined by ";" (sd_journal_get_cursor(3): s=, i=, b=, m=, t=, x=)
_CURSOR = rb"[a-z]=[0-9a-f]+(?:;[a-z]=[0-9a-f]+)+"
_VERBOSE_HEAD = re.compile(rb"\S.* \[(" + _CURSOR + rb")\]")
_VERBOSE_FIELD = re.compile(rb"    (" + _NAME + rb")=")
_EXPORT_FIELD = re.compile(rb"(" + _NAME + rb")=")
_EXPORT_BINARY = re.compile(_NAME)
_EXPORT_BINARY_LINE = re.compile(rb"^" + _NAME + rb"$", re.MULTILINE)
_CURSOR_TIME = re.compile(rb"(?:^|;)t=([0-9a-f]{1,16})(?:;|$)")


def layout(head: bytes) -> Layout | None:
    """The record layout of a file that starts with ``head``, by its first line that is not
    empty nor one of journalctl's own ``-- ... --`` lines ("-- Logs begin at", "-- Boot",
    "-- No entries --"); None for a log of one line per entry."""
    for raw in head.split(b"\n", 64):
        line = raw.rstrip(b"\r")
        if not line.strip() or line.startswith(b"-- "):
            continue
        if line == b"{":
            return "json-pretty"
        if _VERBOSE_HEAD.fullmatch(line):
            return "verbose"
        if _EXPORT_FIELD.match(line):
            return "export"
        return None
    return None


class _Reader:
    """Lines (and an export field's counted bytes) from chunks, holding one chunk and at most
    ``limit`` bytes more whatever the lines: a longer line comes back as its first
    ``limit + 1`` bytes (too long for any entry), the rest read past."""

    def __init__(self, chunks: Iterable[bytes], limit: int) -> None:
        self._chunks = iter(chunks)
        self._buf = b""
        self._pos = 0
        self.limit = limit
        self.line_no = 0  # the number of the line last returned
        self._next: dict[bytes, int] = {}  # each needle's next place in the buffer (none: its end)
        self._hit = -1  # the nearest of them, as last looked for
        self._quiet_to = 0  # where the entry of that needle starts (nothing to skip: <= _pos)

    def _more(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._buf = self._buf[self._pos:] + chunk
                self._pos = 0
                self._next.clear()
                self._hit = -1
                return True
        return False

    def skip_quiet(self, needles: tuple[bytes, ...], kind: Layout) -> bool:
        """Past the whole lines ahead, in the buffer, that come before the entry holding the
        next needle (before the last entry begun, when none is there); True if any.

        Called between entries, or in one without a needle: whatever is skipped holds no needle,
        so nothing is lost, and it ends where an entry starts (or where one would end), so the
        lines read next are read as they would have been. Export's binary values are counted
        bytes that may hold an empty line: no skip crosses the name of one."""
        buf, pos = self._buf, self._pos
        if pos > self._hit:
            for n in needles:  # each looked for again only once passed: no buffer read twice
                if self._next.get(n, -1) < pos:
                    found = buf.find(n, pos)
                    self._next[n] = found if found != -1 else len(buf)
            self._hit = min(self._next.values(), default=len(buf))
            self._quiet_to = self._entry_start(self._hit, kind)
            if kind == "export" and _EXPORT_BINARY_LINE.search(buf, pos, self._quiet_to):
                self._quiet_to = pos
        if self._quiet_to <= pos:
            return False
        self.line_no += buf.count(b"\n", pos, self._quiet_to)
        self._pos = self._quiet_to
        return True

    def _entry_start(self, hit: int, kind: Layout) -> int:
        """The start of the line, at or before the one holding ``hit`` and after ``_pos``, where
        the entry holding ``hit`` starts; ``_pos`` when there is none within MAX_RECORD."""
        buf, pos = self._buf, self._pos
        floor = max(pos, hit - MAX_RECORD)
        start = max(pos, buf.rfind(b"\n", pos, hit) + 1)
        while start > floor:
            if start < len(buf):  # the line after the buffer is not known yet
                first = buf[start:start + 1]
                if kind == "export" and buf[start - 2:start] == b"\n\n":
                    return start  # after an empty line
                if kind == "verbose" and first != b" ":
                    return start  # a header, or a line that ends an entry
                if kind == "json-pretty" and first not in (b" ", b"\t", b"}"):
                    return start  # "{", or a line that ends an object
            start = max(pos, buf.rfind(b"\n", pos, start - 1) + 1)
        return pos

    def line(self) -> bytes | None:
        """The next line without its newline; None at the end."""
        searched = self._pos
        while True:
            newline = self._buf.find(b"\n", searched)
            if newline != -1:
                line = self._buf[self._pos:min(newline, self._pos + self.limit + 1)]
                self._pos = newline + 1
                self.line_no += 1
                return line
            held = len(self._buf) - self._pos
            if held > self.limit:
                return self._cut_line()
            if not self._more():
                if not held:
                    return None
                line = self._buf[self._pos:]  # the last line, without its newline
                self._pos = len(self._buf)
                self.line_no += 1
                return line
            searched = held

    def _cut_line(self) -> bytes:
        head = self._buf[self._pos:self._pos + self.limit + 1]
        self.line_no += 1
        while True:
            newline = self._buf.find(b"\n", self._pos)
            if newline != -1:
                self._pos = newline + 1
                return head
            self._pos = len(self._buf)
            if not self._more():
                return head

    def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes ahead, not consumed."""
        while len(self._buf) - self._pos < n and self._more():
            pass
        return self._buf[self._pos:self._pos + n]

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer at the end); ``n`` is at most ``limit``."""
        data = self.peek(n)
        self._pos += len(data)
        self.line_no += data.count(b"\n")
        return data

    def skip(self, n: int) -> None:
        """Past the next ``n`` bytes, held a chunk at a time."""
        while n > 0:
            if self._pos >= len(self._buf) and not self._more():
                return
            step = min(n, len(self._buf) - self._pos)
            self.line_no += self._buf.count(b"\n", self._pos, self._pos + step)
            self._pos += step
            n -= step


def _value(data: bytes) -> FieldValue:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)  # as journalctl -o json prints a value that is not UTF-8


@dataclass
class _Entry:
    first_line: int
    head: bytes
    needle_line: int = 0  # the first of its lines that holds a needle (0: none)
    size: int = 0
    overlong: bool = False
    fields: dict[str, list[FieldValue]] = field(default_factory=dict)
    lines: list[bytes] = field(default_factory=list)  # json-pretty: the object's lines
    last_key: str | None = None  # verbose: the field a continuation line belongs to

    def grow(self, n: int) -> bool:
        """Count ``n`` more bytes; False once the entry is past MAX_RECORD (then it holds
        nothing more)."""
        self.size += n
        if self.size > MAX_RECORD:
            self.overlong = True
            self.fields.clear()
            self.lines.clear()
        return not self.overlong

    def add(self, key: str, value: FieldValue) -> None:
        self.fields.setdefault(key, []).append(value)

    def folded(self) -> bytes:
        if self.lines:  # JSON already: its lines joined (a JSON string holds no raw newline)
            return b" ".join(line.strip() for line in self.lines)
        entry = {k: v[0] if len(v) == 1 else v for k, v in self.fields.items()}
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode()


Folded = tuple[int, bytes]  # (number of the line holding the needle, one line)
OnOverlong = Callable[[int, bytes], None]  # (first line of the entry, its first bytes)


def fold(chunks: Iterable[bytes], kind: Layout, needles: tuple[bytes, ...],
         on_overlong: OnOverlong | None = None) -> Iterator[Folded]:
    """Every entry of ``chunks`` that holds a needle, as one journal-JSON line, and every other
    line that holds one as it is; in order, each with the number of its (first) needle line."""
    reader = _Reader(chunks, MAX_RECORD)
    entry: _Entry | None = None

    def finish() -> Iterator[Folded]:
        nonlocal entry
        done, entry = entry, None
        if done is None or not done.needle_line:
            return
        if done.overlong:
            if on_overlong is not None:
                on_overlong(done.first_line, done.head)
            return
        yield done.needle_line, done.folded()

    def begin(line: bytes) -> _Entry:
        return _Entry(reader.line_no, line[:200])

    while True:
        if (entry is None or not entry.needle_line) and reader.skip_quiet(needles, kind):
            entry = None  # it holds no needle: nothing to fold
        line = reader.line()
        if line is None:
            break
        has_needle = any(n in line for n in needles)
        if kind == "verbose":
            head = _VERBOSE_HEAD.fullmatch(line)
            if head is not None:
                yield from finish()
                entry = begin(line)
                entry.grow(len(line) + 1)
                entry.add("__CURSOR", head.group(1).decode())
                realtime = _CURSOR_TIME.search(head.group(1))
                if realtime is not None:  # the cursor's t= is __REALTIME_TIMESTAMP, in hex
                    entry.add("__REALTIME_TIMESTAMP", str(int(realtime.group(1), 16)))
            elif entry is not None and (f := _VERBOSE_FIELD.match(line)) is not None:
                entry.last_key = f.group(1).decode()
                if entry.grow(len(line) + 1):
                    entry.add(entry.last_key, _value(line[f.end():]))
            elif entry is not None and entry.last_key and line.startswith(b"     "):
                # a value's next line, indented to just past "    KEY="
                if entry.grow(len(line) + 1):
                    values = entry.fields[entry.last_key]
                    indent = 4 + len(entry.last_key) + 1
                    more = line[indent:] if not line[:indent].strip() else line.lstrip()
                    last = values[-1]
                    if isinstance(last, str):
                        values[-1] = last + "\n" + more.decode("utf-8", "replace")
            else:
                yield from finish()
                if has_needle:
                    yield reader.line_no, line
                continue
        elif kind == "export":
            if not line:
                yield from finish()
                continue
            f = _EXPORT_FIELD.match(line)
            size = None
            if f is None and _EXPORT_BINARY.fullmatch(line):
                counted = reader.peek(8)
                size = int.from_bytes(counted, "little") if len(counted) == 8 else None
                if size is not None and size > MAX_BINARY:
                    size = None
            if f is None and size is None:
                yield from finish()
                if has_needle:
                    yield reader.line_no, line
                continue
            if entry is None:
                entry = begin(line)
            if f is not None:
                if entry.grow(len(line) + 1):
                    entry.add(f.group(1).decode(), _value(line[f.end():]))
            elif size is not None:
                line_no = reader.line_no
                reader.take(8)
                if entry.grow(len(line) + 1 + 8 + size + 1):
                    data = reader.take(size)
                    has_needle = any(n in data for n in needles)
                    entry.add(line.decode(), _value(data))
                else:
                    reader.skip(size)
                if reader.peek(1) == b"\n":
                    reader.take(1)
                if has_needle and not entry.needle_line:
                    entry.needle_line = line_no
                continue
        else:  # json-pretty
            if line.rstrip(b"\r") == b"{":
                yield from finish()  # an object cut short is passed on as it is, and fails
                entry = begin(line)
            elif entry is not None and (line[:1].isspace() or line.rstrip(b"\r") == b"}"):
                pass
            else:
                yield from finish()
                if has_needle:
                    yield reader.line_no, line
                continue
            assert entry is not None
            if entry.grow(len(line) + 1):
                entry.lines.append(line)
            if line.rstrip(b"\r") == b"}":
                if has_needle and not entry.needle_line:
                    entry.needle_line = reader.line_no
                yield from finish()
                continue
        if entry is not None and has_needle and not entry.needle_line:
            entry.needle_line = reader.line_no
    yield from finish()
