"""Create or migrate a history, then exit: ``python -m synwatch.migrate URL HOST``.

The service runs it as a child process when its SQLite history is behind (or new), so
SQLAlchemy and Alembic, which migrations need, are never imported into the resident service
(synwatch/sqlitestore.py). Log lines go to stderr as the service's own; an error is the last
line, ``synwatch: URL: why``, and the exit status is the error's.
"""

from __future__ import annotations

import sys

from synwatch.cli import report, setup_logging
from synwatch.errors import SynwatchError


def main(argv: list[str]) -> int:
    setup_logging(debug=False)
    url, host = argv
    from synwatch.store import Store  # noqa: PLC0415 - after logging, as the CLI does

    try:
        Store.open(url, host=host).close()
    except SynwatchError as exc:
        report(exc)
        return int(exc.status)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
