"""Frozen records that cross the boundaries between steps of the data flow.

sources -> LogRecord -> filters -> KernelEvent -> correlate ...
No I/O and no ORM here; every stage reads these and makes new ones, never mutates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

EventKind = Literal["syn_flood", "drop_open_request"]
Mode = Literal["cookies", "drop"]


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One log entry with its envelope taken apart.

    ``message`` is the kernel's own text. ``trusted`` is true only where the record itself proves
    it came from the kernel (journal _TRANSPORT=kernel with facility 0, a kmsg record of facility 0)
    *and* the reader is allowed to believe it (a text file never is).
    """

    line: str
    sink: str
    message: str
    time: datetime | None
    host: str | None
    trusted: bool
    source: str = "scan"
    # Where the record sits in its source (journal cursor, kmsg sequence, file offset): sources use
    # it to resume and to record every entry exactly once.
    position: str | None = None


@dataclass(frozen=True, slots=True)
class KernelEvent:
    """A kernel message a filter recognised, with what it says."""

    kind: EventKind
    family: int | None
    address: str | None  # listener address as printed, without brackets (6.2+ only)
    port: int | None  # listener port; None where not printed or redacted
    mode: Mode | None
    source_ip: str | None  # drop_open_request only: the client address, compressed
    source_port: int | None
    filter: str
    pattern: str
    record: LogRecord

    @property
    def time(self) -> datetime | None:
        return self.record.time

    @property
    def trusted(self) -> bool:
        return self.record.trusted
