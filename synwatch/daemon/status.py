"""What `synwatch status` and sd_notify's STATUS= say: the daemon keeps a small JSON file next
to its history (written atomically about once a second), so status works without talking to
the daemon, and says "not running" when the process in it is gone."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from synwatch.config import Config, sqlite_file, state_dir

MAX_ERRORS = 10


def status_path(config: Config) -> Path:
    """In the state directory (storage.state_dir; by default next to an SQLite history:
    ``synwatch.db`` -> ``synwatch.status.json``)."""
    db = sqlite_file(config.storage_url)
    name = f"{db.stem}.status.json" if db is not None else "synwatch.status.json"
    return state_dir(config) / name


class RecentErrors(logging.Handler):
    """The last warnings and errors synwatch logged, for `synwatch status`."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.items: deque[dict[str, str]] = deque(maxlen=MAX_ERRORS)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            self.items.append({"at": datetime.fromtimestamp(record.created, timezone.utc)
                               .isoformat(timespec="seconds"),
                               "what": record.getMessage().splitlines()[0][:300]})

    def recent(self) -> list[dict[str, str]]:
        with self._guard:
            return list(self.items)


@dataclass
class SourceState:
    name: str
    state: str = "starting"  # running | failed: why
    position: Any = None
    lag_seconds: float | None = None


@dataclass
class DaemonStatus:
    """What the running service writes about itself."""

    path: Path
    config: str
    since: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    sources: dict[str, SourceState] = field(default_factory=dict)
    errors: RecentErrors = field(default_factory=RecentErrors)
    counts: dict[str, int] = field(default_factory=dict)  # e.g. fleet_refused
    # the watched network namespaces: how many, and those probed in full now (flooded, or
    # ours) as {"name", "kind", "owner", "open_incidents"}
    namespaces: dict[str, Any] = field(default_factory=dict)

    def as_json(self, summary: str) -> dict[str, Any]:
        return {**self.counts,
                "pid": os.getpid(), "since": self.since.isoformat(), "config": self.config,
                "updated_at": datetime.now(timezone.utc).isoformat(), "summary": summary,
                "sources": [{"name": s.name, "state": s.state, "position": s.position,
                             "lag_seconds": s.lag_seconds} for s in self.sources.values()],
                "namespaces": self.namespaces,
                "last_errors": self.errors.recent()}

    def write(self, summary: str) -> None:
        """Atomically (a reader never sees half a file); a failure only costs `status`."""
        tmp = None
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".status-")
            with os.fdopen(fd, "w") as f:
                # dumps, not dump: dump streams through the pure-Python encoder, one
                # write per token (10 ms a second with 200 namespaces watched)
                f.write(json.dumps(self.as_json(summary), default=str))
            Path(tmp).replace(self.path)
        except OSError as exc:
            logging.getLogger(__name__).debug("status file %s: %s", self.path, exc)
            if tmp is not None:  # a full disk: no half-written file a second
                with contextlib.suppress(OSError):
                    Path(tmp).unlink()


def alive(pid: object) -> bool:
    """Is ``pid`` a running synwatch (not a recycled pid)?"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"synwatch" in cmdline


def read_status(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return data
    return None
