"""Creating and migrating a history: ``python -m synwatch.store.migrate HOST``, the URL on
stdin.

SQLAlchemy's models (synwatch/store/models.py) and Alembic's migrations are the schema's one
definition; they are imported only here, in a child process the service and the CLI's writing
commands start when the schema is not the newest (or there is none yet), so their 28 MiB and
quarter second never land in the resident service or a list. An SQLite file is copied aside
before its schema changes. Log lines go to stderr; an error is the last line,
``synwatch: URL: why``, and the exit status is the error's.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from synwatch.config import sqlite_file
from synwatch.config.urls import masked
from synwatch.errors import StoreError, StoreOutage, SynwatchError
from synwatch.store.dialect import (
    PSYCOPG,
    dialect_of,
    first_line,
    head_revision,
    pg_connect_args,
)

log = logging.getLogger("synwatch")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
OUTAGE_STATUS = 75  # EX_TEMPFAIL (sysexits.h): the history is away for now, try again later
MIGRATION_LOCK = 0x73796E77  # "synw": the advisory lock nodes take to migrate one at a time


def alembic_config() -> Any:
    from alembic.config import Config  # noqa: PLC0415 - slow import, here only

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def engine(url: str) -> Any:
    """An SQLAlchemy engine on the history (the migrations', and tests' for raw SQL)."""
    from sqlalchemy import create_engine, event  # noqa: PLC0415

    if url.startswith(PSYCOPG):
        return create_engine(url, connect_args=pg_connect_args(url))
    made = create_engine(url)

    @event.listens_for(made, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()
    return made


def upgrade(url: str, host: str) -> None:
    """Bring the schema to the newest revision, in this process (the child's body)."""
    from alembic import command  # noqa: PLC0415
    from sqlalchemy import inspect, text  # noqa: PLC0415
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    head = head_revision()
    made = engine(url)
    try:
        with made.begin() as conn:
            def current() -> str | None:
                if not inspect(conn).has_table("alembic_version"):
                    return None
                found = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
                return None if found is None else str(found)

            if made.dialect.name == "postgresql":
                # nodes of a fleet starting together: one migrates, the others wait for it and
                # find the schema current (the lock ends with the transaction); a migration
                # may take longer than a service statement may
                conn.execute(text("SET LOCAL statement_timeout = 0"))
                conn.execute(text("SET LOCAL lock_timeout = 0"))
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                             {"key": MIGRATION_LOCK})
            was = current()
            if was == head:
                return
            db = sqlite_file(url)
            if was is not None and db is not None:
                backup = f"{db}.before-{head}"
                shutil.copy2(db, backup)
                log.info("store: schema %s -> %s, copy kept at %s", was, head, backup)
            cfg = alembic_config()
            cfg.attributes["host"] = host  # old rows without a host are this node's
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except (SQLAlchemyError, OSError) as exc:
        cause = getattr(exc, "orig", None) or exc
        why = first_line(cause)
        away = isinstance(exc, OSError) or dialect_of(url).outage(cause)
        raise (StoreOutage if away else StoreError)(
            masked(url), f"cannot migrate the schema: {why}") from exc
    finally:
        made.dispose()


def main(argv: list[str]) -> int:
    """``python -m synwatch.store.migrate HOST`` with the URL on stdin (a command line is any
    local user's to read, and the URL may hold the database's password)."""
    # the CLI's own format (synwatch/cli/__init__.py), without importing the CLI
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    [host] = argv
    url = sys.stdin.readline().rstrip("\n")
    try:
        dialect_of(url)  # one of the two databases synwatch speaks, or why not
        upgrade(url, host)
    except StoreOutage as exc:
        sys.stderr.write(f"synwatch: {exc.subject}: {exc.why}\n")
        return OUTAGE_STATUS
    except SynwatchError as exc:
        sys.stderr.write(f"synwatch: {exc.subject}: {exc.why}\n")
        return int(exc.status)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
