"""An incident's picture for a notification, drawn in a child process (synwatch.charts.draw):
the service's own process never loads matplotlib, and a drawing that hangs or fails costs the
message its picture, never the message. Without the charts extra, messages are text, as they
were."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from synwatch.charts.draw import TIMEOUT

log = logging.getLogger("synwatch")


@dataclass(frozen=True, slots=True)
class Picture:
    path: Path  # the PNG, in a directory of its own that remove() deletes
    command: str  # how to see it without the attachment

    def remove(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)


def available() -> bool:
    """Is the charts extra there (found, not imported)?"""
    return importlib.util.find_spec("matplotlib") is not None


def draw_picture(storage_url: str, incident_id: int) -> Picture | None:
    command = f"synwatch incidents show {incident_id} --plot"
    if not available():
        return None
    folder = Path(tempfile.mkdtemp(prefix="synwatch-picture-"))
    out = folder / f"synwatch-incident-{incident_id}.png"
    try:
        done = subprocess.run([sys.executable, "-m", "synwatch.charts.draw", str(incident_id),
                               str(out)], input=storage_url + "\n", capture_output=True,
                              text=True, timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("notify: no picture of incident %d (%s); the message goes without it",
                    incident_id, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    if done.returncode != 0 or not out.exists():
        log.warning("notify: no picture of incident %d (%s); the message goes without it",
                    incident_id, done.stderr.strip()[-300:] or f"exit {done.returncode}")
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return Picture(out, command)
