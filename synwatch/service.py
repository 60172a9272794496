"""`synwatch run`: wires the steps together, supervises them, reloads, stops cleanly.

Signals only set flags; the main loop does the work, so nothing runs inside a signal handler.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from types import FrameType

from synwatch import sdnotify
from synwatch.catalogue import load_catalogue
from synwatch.clock import SystemClock
from synwatch.config import Config, load_config
from synwatch.errors import ConfigError, StoreError
from synwatch.recorder import Recorder
from synwatch.sources import build_sources, plan_sources
from synwatch.sources.base import Batch
from synwatch.store import Store
from synwatch.supervisor import Supervisor

log = logging.getLogger("synwatch")


@dataclass
class _Flags:
    wake: threading.Event = field(default_factory=threading.Event)
    stop: bool = False
    reload: bool = False


class Service:
    def __init__(self, config: Config, config_arg: str | None) -> None:
        self.config = config
        self.config_arg = config_arg
        self.flags = _Flags()
        self.store: Store | None = None
        self.supervisor: Supervisor | None = None
        self.recorder: Recorder | None = None
        self._pending: Batch | None = None  # a batch the store refused, retried first

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.flags.reload = True
        else:
            self.flags.stop = True
        self.flags.wake.set()

    def _start(self) -> None:
        self.store = Store.open(self.config.storage_url)
        log.info("store: %s (schema %s)", self.store.display_url, self.store.schema_revision())
        plans, skipped = plan_sources(self.config)
        for plan in plans:
            log.info("source %s: %s", plan.name, plan.reason)
        for why in skipped:
            log.info("source %s", why)
        if not plans:
            log.warning("no log source to read; kernel state is still probed")
        if self.config.dry_run:
            log.info("actions: dry run (rendered and logged, nothing changed)")
        catalogue = load_catalogue()
        sources = build_sources(plans, catalogue, self.store.get_position)
        self.recorder = Recorder(self.store, catalogue, SystemClock())
        self.supervisor = Supervisor(sources)
        self.supervisor.start()

    def _record(self, batch: Batch) -> bool:
        """Store one batch; on a store failure keep it to retry first (its position is not
        stored either, so even a stop meanwhile loses nothing: the source reads it again)."""
        assert self.recorder is not None
        try:
            self.recorder.record(batch)
        except StoreError as exc:
            self._pending = batch
            log.error("store: %s; retrying in 1 s", exc)  # noqa: TRY400 - one line is enough
            return False
        self._pending = None
        return True

    def _drain(self, timeout: float) -> None:
        """Record what the sources produce for up to ``timeout`` seconds."""
        if self.supervisor is None:
            return
        deadline = time.monotonic() + timeout
        while not self.flags.stop and time.monotonic() < deadline:
            batch = self._pending
            if batch is None:
                try:
                    batch = self.supervisor.batches.get(
                        timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    return
            if not self._record(batch):
                self.flags.wake.wait(1)
                return

    def _drain_queued(self) -> None:
        """At stop: record what the sources emitted before they stopped."""
        assert self.supervisor is not None
        while True:
            batch = self._pending
            if batch is None:
                try:
                    batch = self.supervisor.batches.get_nowait()
                except queue.Empty:
                    return
            if not self._record(batch):
                return

    def _reload(self) -> None:
        sdnotify.reloading()
        try:
            new = load_config(self.config_arg)
        except ConfigError as exc:
            # the reason is the one-line config error; a traceback would hide it
            log.error("reload refused, keeping the running configuration: %s", exc)  # noqa: TRY400
        else:
            if new.storage_url != self.config.storage_url:
                log.warning("storage.url changed; it takes effect at the next restart")
            self.config = new
            log.info("configuration reloaded from %s", new.path)
        sdnotify.notify("READY=1", "STATUS=watching")

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self._start()
        sdnotify.notify("READY=1", "STATUS=watching")
        log.info("synwatch running (config: %s)", self.config.path)
        ping = sdnotify.watchdog_interval()
        next_ping = time.monotonic()
        while not self.flags.stop:
            self._drain(timeout=min(ping or 1.0, 1.0))
            if ping and time.monotonic() >= next_ping:
                sdnotify.notify("WATCHDOG=1")
                next_ping = time.monotonic() + ping
            if self.flags.reload and not self.flags.stop:
                self.flags.reload = False
                self._reload()
        sdnotify.notify("STOPPING=1", "STATUS=stopping")
        log.info("synwatch stopping")
        if self.supervisor is not None:
            self.supervisor.stop()
            self._drain_queued()
        if self.store is not None:
            self.store.close()
        return 0
