"""Takes a raw log line apart: which sink wrote it, the kernel text, time, host, trust.

Pure: the clock's ``now`` and the local zone are parameters (syslog dates have no year or zone).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, tzinfo
from typing import Any

from synwatch.lines.catalogue import Catalogue, Sink
from synwatch.lines.timeparse import TIME_FORMATS, from_epoch_micros
from synwatch.records import LogRecord

log = logging.getLogger(__name__)
# What one malformed line may raise in a parser; anything else is a bug and propagates.
LINE_ERRORS = (ValueError, OverflowError, RecursionError, LookupError, TypeError, UnicodeError)
BAD_LINE_LOG_EVERY = 60.0  # seconds: one warning per source this often, however many lines


class BadLines:
    """Lines that made a parser raise: counted per source, logged once a minute per source, and
    skipped, so one line written by anyone can never stop a reader (its position moves on)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def add(self, source: str, line: str, exc: BaseException) -> None:
        self.counts[source] = self.counts.get(source, 0) + 1
        now = time.monotonic()
        if now - self._logged.get(source, -BAD_LINE_LOG_EVERY) >= BAD_LINE_LOG_EVERY:
            self._logged[source] = now
            log.warning("%s: a line that cannot be parsed is skipped (%s: %s; %d so far): %.120r",
                        source, type(exc).__name__, exc, self.counts[source], line)


BAD_LINES = BadLines()


def _facility_is_kern(pri: str | None) -> bool:
    return pri is None or int(pri) >> 3 == 0


def _journal_field(entry: dict[str, Any], key: str) -> str | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, list):  # journalctl prints non-UTF-8 fields as arrays of byte values
        try:
            return bytes(value).decode("utf-8", "replace")
        except (TypeError, ValueError):
            return None
    return str(value)


def journal_entry_is_kernels(transport: str | None, facility: str | None) -> bool:
    """Is a journal entry the kernel's own line? Only journald's kernel transport (what it read
    from /dev/kmsg) with facility kern: any client can set SYSLOG_FACILITY and
    SYSLOG_IDENTIFIER, none can set a field starting with "_" (systemd.journal-fields(7))."""
    return transport == "kernel" and facility == "0"


def _from_journal_json(line: str, sink: Sink, source: str, allow_trust: bool) -> LogRecord | None:
    # The object starts at the first "{": before it is only the sink's prefix (json-sse's
    # "data: ", json-seq's record separator; man journalctl), which is not JSON.
    try:
        entry = json.loads(line[line.find("{"):])
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    message = _journal_field(entry, "MESSAGE")
    facility = _journal_field(entry, "SYSLOG_FACILITY")
    transport = _journal_field(entry, "_TRANSPORT")
    identifier = _journal_field(entry, "SYSLOG_IDENTIFIER")
    if message is None or facility not in (None, "0"):
        return None  # a record that names its facility must name kern
    if transport != "kernel" and identifier != "kernel":
        return None
    trusted = allow_trust and journal_entry_is_kernels(transport, facility)
    realtime = _journal_field(entry, "__REALTIME_TIMESTAMP")
    return LogRecord(
        line=line, sink=sink.id, message=message,
        time=from_epoch_micros(realtime) if realtime else None,
        host=_journal_field(entry, "_HOSTNAME"), trusted=trusted, source=source,
        position=_journal_field(entry, "__CURSOR"),
    )


def parse_line(line: str, catalogue: Catalogue, now: datetime, tz: tzinfo, *,
               source: str = "scan", allow_trust: bool = True) -> LogRecord | None:
    """The LogRecord for ``line``, or None if it is not a kernel line in any sink we know.

    ``allow_trust=False`` is for readers of text files, where even a journal-JSON or kmsg-shaped
    line may have been written by anyone.
    """
    line = line.rstrip("\r\n")
    try:
        return _parse(line, catalogue, now, tz, source=source, allow_trust=allow_trust)
    except LINE_ERRORS as exc:
        BAD_LINES.add(source, line, exc)
        return None


def _parse(line: str, catalogue: Catalogue, now: datetime, tz: tzinfo, *, source: str,
           allow_trust: bool) -> LogRecord | None:
    for sink in catalogue.sinks:
        m = sink.regex.match(line)
        if m is None:
            continue
        if sink.parser == "journal-json":
            return _from_journal_json(line, sink, source, allow_trust)
        groups = m.groupdict()
        if not _facility_is_kern(groups.get("pri")):
            return None  # user.notice "kernel" lines, root's writes to /dev/kmsg
        facname = groups.get("facname")
        if facname is not None and facname != "kern":
            return None
        if sink.parser == "kmsg":
            return LogRecord(line=line, sink=sink.id, message=groups["message"], time=None,
                             host=None, trusted=allow_trust, source=source,
                             position=groups.get("seq"))
        raw_time = groups.get("time")
        time = TIME_FORMATS[sink.time_format](raw_time, now, tz) if raw_time else None
        return LogRecord(line=line, sink=sink.id, message=groups["message"], time=time,
                         host=groups.get("host"), trusted=False, source=source)
    return None
