"""Turns batches from the sources into stored events: match, then record with the position.

Events and the source position that covers them go into one transaction, and every event
carries the identity of its log entry, so a replayed entry is never recorded twice.
"""

from __future__ import annotations

import logging

from synwatch.clock import Clock
from synwatch.lines.catalogue import Catalogue
from synwatch.lines.match import match_record
from synwatch.records import KernelEvent, NewEvent, StoredEvent
from synwatch.sources.base import Batch
from synwatch.store.api import ServiceStore

log = logging.getLogger(__name__)
# A live flood gives a line per socket; a first start reads the whole boot's history. Past this
# many new events in one batch the log gets one summary line, the events themselves go to debug.
LOG_EACH_UP_TO = 5


def new_event(event: KernelEvent, *, historical: bool = False) -> NewEvent:
    r = event.record
    return NewEvent(
        time=r.time, source=r.source, trusted=r.trusted, kind=event.kind, family=event.family,
        address=event.address, port=event.port, mode=event.mode, source_ip=event.source_ip,
        source_port=event.source_port, host=r.host, message=r.message,
        pattern=f"{event.filter}/{event.pattern}", dedup_key=r.position, historical=historical)


class Recorder:
    def __init__(self, store: ServiceStore, catalogue: Catalogue, clock: Clock) -> None:
        self.store, self.catalogue, self.clock = store, catalogue, clock

    def record(self, batch: Batch) -> list[StoredEvent]:
        """Store the batch's kernel events and position; returns the events that were new."""
        for note in batch.notes:
            log.warning("source %s: %s", batch.source, note)
        events = [e for e in (match_record(r, self.catalogue) for r in batch.records) if e]
        ids = self.store.insert_events([new_event(e) for e in events], self.clock.now(),
                                       (batch.source, batch.position))
        stored = [StoredEvent(i, e) for i, e in zip(ids, events, strict=True) if i is not None]
        each = logging.INFO if len(stored) <= LOG_EACH_UP_TO else logging.DEBUG
        for s in stored:
            log.log(each, "kernel event from %s (%s): %s", batch.source,
                    "trusted" if s.event.trusted else "untrusted", s.event.record.message)
        if each == logging.DEBUG:
            times = [s.event.record.time for s in stored if s.event.record.time]
            log.info("source %s: %d kernel events (%d trusted)%s", batch.source, len(stored),
                     sum(s.event.trusted for s in stored),
                     f", printed {min(times).isoformat()} to {max(times).isoformat()}"
                     if times else "")
        if len(stored) != len(events):
            log.debug("source %s: %d of %d events were already recorded", batch.source,
                      len(events) - len(stored), len(events))
        return stored
