"""Turns batches from the sources into stored events: match, then record with the position.

Events and the source position that covers them go into one transaction, and every event
carries the identity of its log entry, so a replayed entry is never recorded twice.
"""

from __future__ import annotations

import logging

from synwatch.catalogue import Catalogue
from synwatch.clock import Clock
from synwatch.filters import match_record
from synwatch.records import KernelEvent, StoredEvent
from synwatch.sources.base import Batch
from synwatch.store import NewEvent, Store

log = logging.getLogger(__name__)


def new_event(event: KernelEvent, *, historical: bool = False) -> NewEvent:
    r = event.record
    return NewEvent(
        time=r.time, source=r.source, trusted=r.trusted, kind=event.kind, family=event.family,
        address=event.address, port=event.port, mode=event.mode, source_ip=event.source_ip,
        source_port=event.source_port, host=r.host, message=r.message,
        pattern=f"{event.filter}/{event.pattern}", dedup_key=r.position, historical=historical)


class Recorder:
    def __init__(self, store: Store, catalogue: Catalogue, clock: Clock) -> None:
        self.store, self.catalogue, self.clock = store, catalogue, clock

    def record(self, batch: Batch) -> list[StoredEvent]:
        """Store the batch's kernel events and position; returns the events that were new."""
        for note in batch.notes:
            log.warning("source %s: %s", batch.source, note)
        events = [e for e in (match_record(r, self.catalogue) for r in batch.records) if e]
        ids = self.store.insert_events([new_event(e) for e in events], self.clock.now(),
                                       (batch.source, batch.position))
        stored = [StoredEvent(i, e) for i, e in zip(ids, events, strict=True) if i is not None]
        for e in events:
            log.info("kernel event from %s (%s): %s", batch.source,
                     "trusted" if e.trusted else "untrusted", e.record.message)
        if len(stored) != len(events):
            log.debug("source %s: %d of %d events were already recorded", batch.source,
                      len(events) - len(stored), len(events))
        return stored
