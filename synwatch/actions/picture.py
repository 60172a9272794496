"""An incident's picture for a notification, drawn in a child process (synwatch.charts.draw):
the service's own process never loads matplotlib, and a drawing that hangs or fails costs the
message its picture, never the message. Without the charts extra, messages are text, as they
were."""

from __future__ import annotations

import importlib.util
import logging
import os
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

    def remove(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)


def available() -> bool:
    """Is the charts extra there (found, not imported)?"""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a broken installation: text, as without it
        return False


def draw_picture(storage_url: str, incident_id: int, state: Path | None = None) -> Picture | None:
    """The incident's PNG, drawn by a child process; None (and a warning) when it cannot be:
    the message then goes without it. ``state``: where matplotlib keeps its font cache (the
    unit's state directory: under ProtectSystem= and ProtectHome= it has nowhere else, and
    would rebuild it at every drawing)."""
    folder: Path | None = None
    try:
        folder = Path(tempfile.mkdtemp(prefix="synwatch-picture-"))
        out = folder / f"synwatch-incident-{incident_id}.png"
        env = dict(os.environ)
        if state is not None:
            env["MPLCONFIGDIR"] = str(state / "matplotlib")
        done = subprocess.run([sys.executable, "-m", "synwatch.charts.draw", str(incident_id),
                               str(out)], input=storage_url + "\n", capture_output=True,
                              text=True, errors="replace", timeout=TIMEOUT, check=False,
                              env=env)
        if done.returncode == 0 and out.exists():
            return Picture(out)
        why = done.stderr.strip()[-300:] or f"exit {done.returncode}"
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        why = str(exc)
    log.warning("notify: no picture of incident %d (%s); the message goes without it",
                incident_id, why)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return None
