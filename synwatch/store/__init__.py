"""The history: opening (and migrating) the database, recording, and querying.

Only this package talks to SQLAlchemy sessions. SQLite runs in WAL mode with a busy timeout so
the CLI can read while the service writes; migrations ship in the package and run at open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from synwatch.config import sqlite_file
from synwatch.config.urls import masked
from synwatch.errors import StoreError
from synwatch.historyreader import head_revision
from synwatch.records import NewEvent
from synwatch.store.base import BUSY_TIMEOUT, is_outage, store_error
from synwatch.store.fleet import Fleet
from synwatch.store.queries import Queries
from synwatch.store.retention import Retention
from synwatch.store.state import ServiceState
from synwatch.store.writes import Writes

__all__ = ["BUSY_TIMEOUT", "MIGRATIONS", "NewEvent", "Store", "pg_connect_args"]
log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK = 0x73796E77  # "synw": the advisory lock nodes take to migrate one at a time
# Every PostgreSQL operation is bounded in time, so a server that stops answering (a network
# partition: packets dropped, not refused) fails like one that refuses, within seconds, and the
# service goes on on its spool (synwatch/spool.py). libpq's keywords
# (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS): a
# connection attempt, data sent and not acknowledged (tcp_user_timeout), an idle connection
# waiting for an answer (keepalives: idle + interval * count), each a few seconds.
PG_CONNECT_TIMEOUT = 2  # seconds (libpq's minimum)
PG_TCP_USER_TIMEOUT_MS = 3000
PG_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 2, "keepalives_interval": 1,
                 "keepalives_count": 2}
# the service's own statements (storage is never its hot path): a live server stuck on a lock
# or a slow query is given up on as well; migrations lift both for their transaction
PG_STATEMENT_TIMEOUT_MS = 5000
PG_LOCK_TIMEOUT_MS = 3000
POOL_TIMEOUT = 5.0  # seconds a checkout waits for a pooled connection


def pg_connect_args(*, bounded_statements: bool = False) -> dict[str, Any]:
    """libpq keywords that bound every wait on a PostgreSQL server (connect, send, receive);
    ``bounded_statements``: also the service's statement and lock timeouts."""
    args: dict[str, Any] = {"connect_timeout": PG_CONNECT_TIMEOUT,
                            "tcp_user_timeout": PG_TCP_USER_TIMEOUT_MS, **PG_KEEPALIVES}
    if bounded_statements:
        args["options"] = (f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS} "
                           f"-c lock_timeout={PG_LOCK_TIMEOUT_MS}")
    return args


def _sqlite_pragmas(store: Store) -> Any:
    def set_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(store.busy_timeout * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()
    return set_pragmas


class Store(Writes, Queries, ServiceState, Fleet, Retention):
    """The history: one object for the service and the CLI, in parts by what they are for
    (``Writes``: recording; ``Queries``: what people read; ``ServiceState``: what the service
    carries over a restart; ``Fleet``: what nodes sharing it tell each other; ``Retention``:
    pruning). ``host`` names this node (storage.host): what it writes carries it, and what it
    resumes is its own. Opening migrates the schema."""

    def __init__(self, url: str, engine: Engine, host: str | None = None) -> None:
        super().__init__(url, engine, host or socket.gethostname())

    def set_busy_timeout(self, seconds: float) -> None:
        """How long a write waits for another writer's lock from now on. The service waits
        briefly and retries later, so a locked store never holds detection up."""
        self.busy_timeout = seconds
        self.engine.dispose()  # pooled connections reconnect with the new pragma

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @classmethod
    def open(cls, url: str, *, migrate: bool = True, host: str | None = None,
             bounded: bool = False) -> Store:
        """``bounded``: the service's statements are given up on after
        PG_STATEMENT_TIMEOUT_MS (connecting, sending and waiting always are)."""
        shown = masked(url)
        try:
            parsed = make_url(url)
        except (SQLAlchemyError, ValueError) as exc:
            raise StoreError(shown, "not an SQLAlchemy URL") from exc
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
            # pre-ping: a database server restarted under a long-running service leaves dead
            # pooled connections; each checkout tests its connection and reconnects
            if parsed.get_backend_name() == "postgresql":
                given = set(parsed.query)  # the URL's own keywords win
                engine = create_engine(url, pool_pre_ping=True, pool_timeout=POOL_TIMEOUT,
                                       connect_args={
                                           k: v for k, v in pg_connect_args(
                                               bounded_statements=bounded).items()
                                           if k not in given})
            else:
                engine = create_engine(url,
                                       pool_pre_ping=parsed.get_backend_name() != "sqlite")
        except (SQLAlchemyError, ImportError) as exc:
            raise store_error(shown, exc) from exc
        store = cls(url, engine, host)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas(store))
        if migrate:
            store.migrate()
        return store

    @classmethod
    def open_existing(cls, url: str, *, migrate: bool = True,
                      host: str | None = None) -> Store | None:
        """The history if there is one: an SQLite file that is not there is not created
        (`top`, the package's removal)."""
        db = sqlite_file(url)
        if db is not None and not db.exists():
            return None
        return cls.open(url, migrate=migrate, host=host)

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ---------------------------------------------------------------------------------

    def _alembic_config(self) -> Any:
        from alembic.config import Config as AlembicConfig  # noqa: PLC0415 - slow import

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        return cfg

    def schema_revision(self, conn: Connection | None = None) -> str | None:
        """The schema's revision as Alembic records it, read without Alembic (its import costs
        5 MB and tens of milliseconds on every command)."""
        if conn is not None:
            if not inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        try:
            with self.engine.connect() as own:
                return own.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except OperationalError as exc:
            if is_outage(exc):
                raise store_error(self.display_url, exc) from exc
            return None  # no alembic_version table: an empty database
        except SQLAlchemyError:
            return None

    def head_revision(self) -> str | None:
        """The newest migration (read from the migration files, without Alembic)."""
        return head_revision()

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
            cfg.attributes["host"] = self.host  # old rows without a host are this node's
            with self.engine.begin() as conn:
                if self.dialect == "postgresql":
                    # nodes of a fleet starting together: one migrates, the others wait for it
                    # and find the schema current (the lock ends with the transaction)
                    # a migration may take longer than a service statement may
                    conn.execute(text("SET LOCAL statement_timeout = 0"))
                    conn.execute(text("SET LOCAL lock_timeout = 0"))
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                 {"key": MIGRATION_LOCK})
                    if self.schema_revision(conn) == head:
                        return
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except (SQLAlchemyError, OSError) as exc:
            raise store_error(self.display_url, exc, "cannot migrate the schema: ") from exc

    def check_file(self) -> None:
        """Nothing to look at between writes: a server's files are its own (SQLite files are
        written through synwatch/sqlitestore.py in the service)."""

    def ping(self) -> None:
        """Does the server answer? From any thread (the spool's away thread): the engine's
        pool is thread-safe, and the connection's timeouts bound the wait."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise store_error(self.display_url, exc) from exc
