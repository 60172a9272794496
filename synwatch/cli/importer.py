"""`synwatch import`: old logs (rotated .1, .gz) into the event history.

Imported events are untrusted (they are text) and marked historical. Each line's identity is
its content and occurrence number, the same identity the live file source gives it, so
importing a file twice, or syslog and kern.log with the same lines, adds nothing new.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from synwatch.clock import local_timezone
from synwatch.daemon.recorder import new_event
from synwatch.lines.catalogue import Catalogue
from synwatch.lines.scan import Progress, candidates, open_input
from synwatch.records import NewEvent
from synwatch.sources.base import OccurrenceCounter
from synwatch.store import History

CHUNK_EVENTS = 1000


@dataclass(frozen=True, slots=True)
class ImportResult:
    path: str
    matched: int
    added: int


def import_paths(store: History, catalogue: Catalogue, paths: Sequence[str],
                 progress_for: Callable[[str, int | None], Progress | None] | None = None,
                 ) -> list[ImportResult]:
    results = []
    tz = local_timezone()
    for path in paths:
        stream = open_input(path)
        progress = progress_for(path, stream.size) if progress_for else None
        counter = OccurrenceCounter()
        now = datetime.now(timezone.utc)
        pending: list[NewEvent] = []
        matched = added = 0
        try:
            for c in candidates(stream, catalogue, now=now, tz=tz, source=f"file:{path}",
                                allow_trust=False, progress=progress, line_numbers=False):
                identity = counter.identity(c.raw)  # every candidate counts for the identity
                event = c.event
                if event is None:
                    continue
                matched += 1
                record = replace(event.record, position=identity)
                pending.append(new_event(replace(event, record=record), historical=True))
                if len(pending) >= CHUNK_EVENTS:
                    added += store.record_events(pending, now)
                    pending = []
        finally:
            stream.close()
        added += store.record_events(pending, now)
        results.append(ImportResult(path, matched, added))
    return results
