"""Runs each source on its own thread and restarts it with backoff when it fails.

A source that raises is logged and started again after 1 s, 2 s, 4 s ... up to a minute (reset
after it has run well for a minute); the others are not affected. Batches go into one bounded
queue, so a flood of log lines slows the sources down instead of growing memory.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Sequence

from synwatch.errors import SynwatchError
from synwatch.sources.base import Batch, Source

log = logging.getLogger(__name__)
MAX_BACKOFF = 60.0
HEALTHY_AFTER = 60.0


class Supervisor:
    def __init__(self, sources: Sequence[Source], *, queue_size: int = 256,
                 first_backoff: float = 1.0, max_backoff: float = MAX_BACKOFF) -> None:
        self.sources = list(sources)
        # None in the queue wakes the service's loop early (a fleet ban to copy): no batch
        self.batches: queue.Queue[Batch | None] = queue.Queue(maxsize=queue_size)
        self.stop_event = threading.Event()
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.restarts: dict[str, int] = {s.name: 0 for s in self.sources}
        self.failures: dict[str, str] = {}
        self._threads: list[threading.Thread] = []

    def wake(self) -> None:
        """Wake the loop that waits on the batches (from any thread); a full queue means it
        is busy and will look soon anyway."""
        with contextlib.suppress(queue.Full):
            self.batches.put_nowait(None)

    def _emit(self, batch: Batch) -> None:
        while not self.stop_event.is_set():
            try:
                self.batches.put(batch, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self, source: Source) -> None:
        delay = self.first_backoff
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                source.check_available()
                self.failures.pop(source.name, None)
                source.stream(self._emit, self.stop_event)
                if self.stop_event.is_set():
                    return
                raise SynwatchError(source.name, "stopped without being asked to")  # noqa: TRY301
            except Exception as exc:  # a source may fail in any way; it must not kill us
                if self.stop_event.is_set():
                    return
                if time.monotonic() - started > HEALTHY_AFTER:
                    delay = self.first_backoff
                why = str(exc) if isinstance(exc, SynwatchError) else f"{type(exc).__name__}: {exc}"
                self.failures[source.name] = why
                self.restarts[source.name] += 1
                log.warning("source %s failed: %s; restarting in %.0f s", source.name, why, delay)
                self.stop_event.wait(delay)
                delay = min(delay * 2, self.max_backoff)

    def start(self) -> None:
        for source in self.sources:
            thread = threading.Thread(target=self._run, args=(source,), daemon=True,
                                      name=f"source {source.name}")
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10) -> None:
        self.stop_event.set()
        for thread in self._threads:
            thread.join(timeout)
