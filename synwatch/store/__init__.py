"""The history: opening (and migrating) the database, recording, and querying.

Only this package talks to SQLAlchemy sessions. SQLite runs in WAL mode with a busy timeout so
the CLI can read while the service writes; migrations ship in the package and run at open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from synwatch.config import sqlite_file
from synwatch.errors import StoreError
from synwatch.store.base import BUSY_TIMEOUT
from synwatch.store.queries import Queries
from synwatch.store.state import ServiceState
from synwatch.store.writes import NewEvent, Writes

__all__ = ["BUSY_TIMEOUT", "MIGRATIONS", "NewEvent", "Store"]
log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def _sqlite_pragmas(store: Store) -> Any:
    def set_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(store.busy_timeout * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()
    return set_pragmas


class Store(Writes, Queries, ServiceState):
    """The history: one object for the service and the CLI, in parts by what they are for
    (``Writes``: recording; ``Queries``: what people read; ``ServiceState``: what the service
    carries over a restart). Opening migrates the schema."""

    def __init__(self, url: str, engine: Engine) -> None:
        super().__init__(url, engine)

    def set_busy_timeout(self, seconds: float) -> None:
        """How long a write waits for another writer's lock from now on. The service waits
        briefly and retries later, so a locked store never holds detection up."""
        self.busy_timeout = seconds
        self.engine.dispose()  # pooled connections reconnect with the new pragma

    @classmethod
    def open(cls, url: str, *, migrate: bool = True) -> Store:
        try:
            parsed = make_url(url)
        except SQLAlchemyError as exc:
            raise StoreError(url, f"not an SQLAlchemy URL: {exc}") from exc
        shown = parsed.render_as_string(hide_password=True)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            db_file = Path(parsed.database)
            try:
                # the history names attackers, listeners and bans: for its owner only (SQLite
                # gives its -wal and -shm files the database file's mode)
                db_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                if not db_file.exists():
                    with contextlib.suppress(FileExistsError):
                        os.close(os.open(db_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY
                                         | os.O_CLOEXEC, 0o600))
            except OSError as exc:
                raise StoreError(shown, f"cannot create {db_file}: {exc.strerror}") from exc
        try:
            engine = create_engine(url)
        except (SQLAlchemyError, ImportError) as exc:
            raise StoreError(shown, str(exc)) from exc
        store = cls(url, engine)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas(store))
        if migrate:
            store.migrate()
        return store

    @classmethod
    def open_existing(cls, url: str, *, migrate: bool = True) -> Store | None:
        """The history if there is one: an SQLite file that is not there is not created
        (`top`, the package's removal)."""
        db = sqlite_file(url)
        if db is not None and not db.exists():
            return None
        return cls.open(url, migrate=migrate)

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ---------------------------------------------------------------------------------

    def _alembic_config(self) -> Any:
        from alembic.config import Config as AlembicConfig  # noqa: PLC0415 - slow import

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        return cfg

    def schema_revision(self) -> str | None:
        """The schema's revision as Alembic records it, read without Alembic (its import costs
        5 MB and tens of milliseconds on every command)."""
        try:
            with self.engine.connect() as conn:
                return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except SQLAlchemyError:
            return None  # no alembic_version table: an empty database

    def head_revision(self) -> str | None:
        """The newest migration: the revision no other migration revises (read from the
        migration files' own ``revision``/``down_revision`` lines)."""
        revisions, revised = set(), set()
        for path in (MIGRATIONS / "versions").glob("*.py"):
            source = path.read_text(encoding="utf-8")
            found = re.search(r'^revision = "([^"]+)"', source, re.MULTILINE)
            down = re.search(r'^down_revision = "([^"]+)"', source, re.MULTILINE)
            if found:
                revisions.add(found.group(1))
            if down:
                revised.add(down.group(1))
        heads = sorted(revisions - revised)
        return heads[0] if len(heads) == 1 else None

    def migrate(self) -> None:
        """Bring the schema to the newest revision; copy an SQLite file aside first."""
        try:
            current, head = self.schema_revision(), self.head_revision()
            if current == head:
                return  # the usual case: Alembic is not even imported
            from alembic import command  # noqa: PLC0415
            db = make_url(self.url).database
            if current is not None and self.engine.dialect.name == "sqlite" and db:
                backup = f"{db}.before-{head}"
                shutil.copy2(db, backup)
                log.info("store: schema %s -> %s, copy kept at %s", current, head, backup)
            cfg = self._alembic_config()
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(self.display_url, f"cannot migrate the schema: {exc}") from exc
