"""`synwatch run`: wires the steps together, supervises them, reloads, stops cleanly.

Signals only set flags; the main loop does the work, so nothing runs inside a signal handler.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from types import FrameType

from synwatch import sdnotify
from synwatch.config import Config, load_config
from synwatch.errors import ConfigError
from synwatch.sources import plan_sources
from synwatch.store import Store

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
        while not self.flags.stop:
            self.flags.wake.wait(ping if ping else 3600)
            self.flags.wake.clear()
            if ping:
                sdnotify.notify("WATCHDOG=1")
            if self.flags.reload and not self.flags.stop:
                self.flags.reload = False
                self._reload()
        sdnotify.notify("STOPPING=1", "STATUS=stopping")
        log.info("synwatch stopping")
        if self.store is not None:
            self.store.close()
        return 0
