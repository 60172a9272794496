"""systemd's watchdog (WatchdogSec=, sd_watchdog_enabled(3)): fed only while the loop keeps
probing. A loop that still turns but no longer probes (blind to floods) goes unfed, and systemd
restarts it."""

from __future__ import annotations

import logging

from synwatch.clock import Clock
from synwatch.system import sdnotify

log = logging.getLogger("synwatch")


class Watchdog:
    def __init__(self, clock: Clock, probe_interval: float) -> None:
        self.clock, self.probe_interval = clock, probe_interval
        self.probed_at = clock.monotonic()  # when the last probe step ran to its end
        self.next_ping = clock.monotonic()
        self.held = False  # WATCHDOG=1 withheld: the loop is not probing

    def probed(self) -> None:
        """A probe step ended (a probe, or one that found the namespace missing)."""
        self.probed_at = self.clock.monotonic()

    def tick(self, ping: float | None) -> None:
        """WATCHDOG=1 when a ping (every ``ping`` seconds, None: no watchdog) is due and the
        loop is healthy."""
        if ping and self.clock.monotonic() >= self.next_ping and self.healthy(ping):
            sdnotify.notify("WATCHDOG=1")
            self.next_ping = self.clock.monotonic() + ping

    def healthy(self, ping: float) -> bool:
        """May systemd's watchdog be told the service is alive? Only while the last probe step
        ended within a probe interval and one watchdog ping interval."""
        late = self.clock.monotonic() - self.probed_at - self.probe_interval
        if late <= ping:
            if self.held:
                self.held = False
                log.info("watchdog: probing again; systemd's watchdog is fed again")
            return True
        if not self.held:
            self.held = True
            log.error("watchdog: no probe for %.1f s; systemd's watchdog is no longer fed",
                      late + self.probe_interval)
        return False
