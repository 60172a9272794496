"""What the tests share: the lab (network namespaces, floods), a PostgreSQL cluster, journald,
receivers for notifications, the unit jail, the CLI as a user runs it, and one wait
(``wait.eventually``). conftest.py holds only fixtures and hooks."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
DATA = REPO / "tests" / "data"
# The fixed "now" of pure tests: syslog dates have no year, so it decides the year.
NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=timezone.utc)
