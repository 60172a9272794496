"""Draw an incident's PNG in a process of its own: what the notify worker runs, so the
service's process never loads matplotlib (its idle RSS stays as it was).

    python -m synwatch.charts.draw INCIDENT_ID OUT.png   (the history's URL on stdin)

The URL comes on stdin, so a database password is never on a command line. Exit 0: the PNG
is written; 2: the charts extra is missing; 1: anything else (said on stderr).
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

from synwatch.charts.series import Picture, picture
from synwatch.errors import SynwatchError
from synwatch.store import History

TIMEOUT = 30.0  # seconds the worker gives a drawing (a cold font cache takes a few)


def picture_of(store: History, incident_id: int, now: datetime) -> Picture:
    """An incident's picture from the history: its timeline, runs and bans (the bans of the
    node that had it, its fleet copies aside)."""
    incident, runs = store.incident(incident_id)
    bans = [b for b in store.bans(host=incident.host) if b.incident_id == incident_id
            and b.origin_id is None]
    return picture(incident, store.samples(incident_id), runs, bans, now)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[0].isdigit():
        print("usage: python -m synwatch.charts.draw INCIDENT_ID OUT.png", file=sys.stderr)
        return 2
    url = sys.stdin.readline().strip()
    try:
        from synwatch.charts import require  # noqa: PLC0415

        require("matplotlib", "the incident's picture")
        from synwatch.charts.png import draw_png  # noqa: PLC0415

        store = History.open(url, write=False)
        try:
            drawn = draw_png(picture_of(store, int(args[0]), datetime.now(timezone.utc)))
        finally:
            store.close()
        out = Path(args[1])
        out.write_bytes(drawn.png)
    except SynwatchError as exc:
        print(f"synwatch: {exc.subject}: {exc.why}", file=sys.stderr)
        return int(exc.status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
