"""What every source shares: the Batch it emits, the Source protocol, line identities.

The contract (CrowdSec's RestartableStreamer): ``stream()`` runs until ``stop`` is set and then
returns, or raises on failure. It never retries or sleeps on its own; the supervisor restarts
it, and it resumes from ``self.position``, which only ever covers records already emitted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from synwatch.records import LogRecord


@dataclass(frozen=True, slots=True)
class Batch:
    """Records read together, and the position a restart resumes from once they are stored."""

    source: str
    records: tuple[LogRecord, ...]
    position: dict[str, Any]
    notes: tuple[str, ...] = field(default=())  # e.g. "12 kmsg records were overwritten"


Emit = Callable[[Batch], None]


class Source(Protocol):
    name: str
    position: dict[str, Any]

    def check_available(self) -> None:
        """Raise SourceUnavailable if this source cannot run here now."""
        ...

    def stream(self, emit: Emit, stop: threading.Event) -> None:
        """Emit batches until ``stop`` is set (return) or something fails (raise)."""
        ...


def line_identity(line: str | bytes, occurrence: int) -> str:
    """The identity of the ``occurrence``-th copy of a text line, the same in every file.

    Debian's rsyslog writes each kernel line to syslog and kern.log: both readers give the first
    copy the same identity, so it is recorded once; a genuinely repeated line (reuseport sockets
    print identical lines in the same second) is its second occurrence, and recorded again.
    """
    return f"line:{_digest(line)}#{occurrence}"


def _digest(line: str | bytes) -> str:
    data = line.encode("utf-8", "replace") if isinstance(line, str) else line
    return hashlib.sha1(data.rstrip(b"\r\n"), usedforsecurity=False).hexdigest()


class OccurrenceCounter:
    """Counts copies of matched lines per source; small and persisted with the position."""

    LIMIT = 512

    def __init__(self, counts: dict[str, int] | None = None) -> None:
        self.counts: dict[str, int] = dict(counts or {})

    def identity(self, line: bytes) -> str:
        digest = _digest(line)
        key = f"line:{digest}#0"  # the key stored positions already use
        n = self.counts.pop(key, 0) + 1
        self.counts[key] = n  # re-inserted: most recent last
        while len(self.counts) > self.LIMIT:
            del self.counts[next(iter(self.counts))]
        return f"line:{digest}#{n}"


def journal_reader() -> str | None:
    """How the journal can be read here: the systemd bindings, else journalctl, else not."""
    if importlib.util.find_spec("systemd") is not None:
        return "systemd-python"
    if shutil.which("journalctl"):
        return "journalctl -o json"
    return None
