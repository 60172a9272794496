"""Where synwatch's log lines go and how they look: stderr, with priorities the journal reads
when stderr is the journal (the service under systemd), with times when the service runs in
the foreground, plain for a command's one warning."""

from __future__ import annotations

import logging
import os
import sys

# syslog priorities (sd-daemon(3)): journald reads a "<N>" line prefix as the entry's priority
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """For a stderr that is the journal: a priority on every line (so `journalctl -p warning`
    works, and a multi-line message keeps its level), no level name, no time of our own."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{PRIORITY.get(record.levelno, 6)}>"
        return prefix + super().format(record).replace("\n", "\n" + prefix)


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device and inode of the stream it connected
    (systemd.exec(5)); it only counts while stderr is still that stream."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def setup_logging(debug: bool, *, timestamps: bool = False) -> None:
    """``timestamps``: the service in the foreground (a terminal, a file) says when; the
    journal has its own time for every line, and a command's one warning needs none."""
    # Our own messages at INFO; libraries (alembic announces every plugin) only when they warn.
    handler = logging.StreamHandler(sys.stderr)
    plain = "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(JournalFormatter() if stderr_is_journal()
                         else logging.Formatter("%(asctime)s.%(msecs)03d " + plain,
                                                "%Y-%m-%d %H:%M:%S") if timestamps
                         else logging.Formatter(plain))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler])
    logging.getLogger("synwatch").setLevel(logging.DEBUG if debug else logging.INFO)
