"""A journald for the tests: the machine's own if it runs, else one the suite starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.wait import eventually

JOURNALD = "/lib/systemd/systemd-journald"


class Journald:
    socket_path = "/run/systemd/journal/socket"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        from synwatch.sources.journald import journald_alive

        return journald_alive(self.socket_path)

    def start(self) -> None:
        Path("/run/systemd/journal").mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([JOURNALD], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        eventually(self.alive, "journald to start", 10)

    def stop(self) -> None:
        assert self.proc is not None, "only a journald the tests started can be stopped"
        self.proc.terminate()
        self.proc.wait(10)
        eventually(lambda: not self.alive(), "journald's socket to go", 10)

    def stop_if_ours(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
