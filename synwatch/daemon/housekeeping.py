"""The history's upkeep between the steps of detection: this node's heartbeat, the retention
pass one small batch at a time (never a long transaction), the spool written back when the
history answers again, and what `status` says of it. None of it is on the detection path: a
history that is away costs the loop nothing here (only the spool's own thread tries it)."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from synwatch import __version__
from synwatch.clock import Clock
from synwatch.config import StorageSettings
from synwatch.errors import StoreError
from synwatch.store import PRUNE_BATCH
from synwatch.store.spooled import SpooledStore

log = logging.getLogger("synwatch")
HEARTBEAT_EVERY = 10.0  # seconds between this node's heartbeats in the history (status, fleets)
PRUNE_EVERY = 3600.0  # seconds between retention passes (storage.retention); the first is soon
PRUNE_FIRST = 60.0
CATCH_UP_RETRY = 1.0  # seconds between tries of writing the spool back while that fails


class Housekeeping:
    def __init__(self, store: SpooledStore, storage: StorageSettings, clock: Clock) -> None:
        self.store, self.storage, self.clock = store, storage, clock
        self.started_at = clock.now()
        mono = clock.monotonic()
        self._heartbeat_due = mono
        self._prune_due = mono + PRUNE_FIRST
        self._catch_up_due = mono
        self._pruning: list[str] = []  # what the running retention pass has left to prune
        self._pruned = 0  # rows the running retention step has pruned so far
        self._problem: str | None = None

    def step(self) -> None:
        """One turn's share: the spool first while it holds anything, else the heartbeat and
        one batch of the retention pass when they are due."""
        mono = self.clock.monotonic()
        store = self.store
        if store.spooling:
            if mono >= self._catch_up_due and not store.away:
                try:
                    store.catch_up()
                except StoreError as exc:
                    self._catch_up_due = mono + CATCH_UP_RETRY
                    log.debug("store: still unreachable: %s", exc)
            return
        try:
            if mono >= self._heartbeat_due:
                self._heartbeat_due = mono + HEARTBEAT_EVERY
                store.heartbeat(os.getpid(), self.started_at, self.clock.now(), __version__)
            if mono >= self._prune_due and not self._pruning:
                self._prune_due = mono + PRUNE_EVERY
                self._pruning = ["events", "incidents"]
            if self._pruning:
                self._prune_step()
        except StoreError as exc:
            if str(exc) != self._problem:  # once, not every ten seconds
                log.warning("store: %s; housekeeping (heartbeat, retention) tried again later",
                            exc)
                self._problem = str(exc)
        else:
            self._problem = None

    def _prune_step(self) -> None:
        keep, store = self.storage, self.store
        what, now = self._pruning[0], self.clock.now()
        if what == "events" and keep.keep_events is not None:
            gone = store.prune_events(now - timedelta(seconds=keep.keep_events))
            done = gone < PRUNE_BATCH
        elif what == "incidents" and keep.keep_incidents is not None:
            gone = store.prune_incidents(now - timedelta(seconds=keep.keep_incidents), now)
            done = gone == 0
        else:
            gone, done = 0, True
        self._pruned += gone
        if done:
            if self._pruned:  # one line a pass, however many batches it took
                log.info("retention: %d %s pruned", self._pruned, what)
            self._pruned = 0
            self._pruning.pop(0)

    def summary(self) -> str | None:
        """What the status line says of the history when it is not simply written to."""
        store = self.store
        if not store.spooling:
            return None
        kept = f"{store.spool.records} records spooled"
        if store.spool.problem is not None:
            kept += f" in memory (the spool cannot be written: {store.spool.problem})"
        if store.away:
            return f"history away ({store.problem or 'not answering'}): acting, not recording; " \
                   f"{kept}"
        return f"catching up, {kept}"
