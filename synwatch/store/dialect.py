"""What differs between the two databases a history lives in: SQLite (Python's sqlite3) and
PostgreSQL (psycopg 3). Connecting, placeholders, how times and JSON travel, which errors are
outages, transactions and their locks; nothing else in synwatch/store knows which one it speaks.

Rows are stored as the schema's SQLAlchemy models define them (synwatch/store/models.py), so a
history written by any synwatch reads the same: on SQLite, times are naive UTC text with
microseconds and JSON is text; on PostgreSQL, ``timestamp with time zone`` and ``json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from synwatch.config import sqlite_file
from synwatch.config.urls import masked
from synwatch.errors import StoreError, StoreOutage

log = logging.getLogger("synwatch")
PSYCOPG = "postgresql+psycopg://"
BUSY_TIMEOUT = 5.0  # seconds a write waits for another writer's lock (the CLI, migrations)
# Every PostgreSQL operation is bounded in time, so a server that stops answering (a network
# partition: packets dropped, not refused) fails like one that refuses, within seconds, and the
# service goes on on its spool (synwatch/store/spool.py). libpq's keywords
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
# a transaction whose client went (a node cut off halfway) ends on the server, and with it the
# lock that numbers the fleet's changes, which every node's fleet bans wait for
PG_IDLE_IN_TX_MS = 10000
# SQLite's primary result codes of a file that cannot be written for now
# (https://sqlite.org/rescode.html): busy or locked by another writer, out of memory, read-only,
# I/O error, corrupt, full, cannot open, locking protocol, not a database. SQLITE_ERROR (a bad
# statement, no such table) is a bug, not an outage.
SQLITE_OUTAGES = frozenset({5, 6, 7, 8, 10, 11, 13, 14, 15, 26})
# PostgreSQL's SQLSTATE classes of a server that is away or cannot take writes for now
# (https://www.postgresql.org/docs/current/errcodes-appendix.html): connection exceptions,
# insufficient resources, operator intervention (a shutdown), system errors; and a statement
# or lock wait given up on (57014 query_canceled, 55P03 lock_not_available).
PG_OUTAGE_CLASSES = ("08", "53", "57", "58")
PG_OUTAGE_STATES = frozenset({"55P03", "40001", "40P01",
                              "25006"})  # read-only: a standby after a failover, for now
# what libpq says when a server answers a connection with a refusal (no SQLSTATE comes with it)
POOLER_REFUSAL = "unsupported startup parameter"  # pgbouncer's answer to options it does not take
PG_REFUSALS = ("does not exist", "authentication failed", "no pg_hba.conf entry",
               "password authentication", "permission denied")


def libpq_uri(url: str) -> str:
    """An SQLAlchemy ``postgresql+psycopg://`` URL as the libpq URI it is beside the driver
    name (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING-URIS)."""
    return "postgresql://" + url.removeprefix(PSYCOPG)


def pg_connect_args(url: str, *, bounded_statements: bool = False) -> dict[str, Any]:
    """libpq keywords that bound every wait on a PostgreSQL server (connect, send, receive),
    except those the URL sets itself; ``bounded_statements``: also the service's statement and
    lock timeouts."""
    args: dict[str, Any] = {"connect_timeout": PG_CONNECT_TIMEOUT,
                            "tcp_user_timeout": PG_TCP_USER_TIMEOUT_MS, **PG_KEEPALIVES}
    if bounded_statements:
        args["options"] = (f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS} "
                           f"-c lock_timeout={PG_LOCK_TIMEOUT_MS} "
                           f"-c idle_in_transaction_session_timeout={PG_IDLE_IN_TX_MS}")
    given = {k for k, _ in parse_qsl(urlsplit(url).query)}
    # no server-side prepared statements: a transaction pooler (pgbouncer's pool_mode =
    # transaction) hands each transaction a server connection of its own, where a statement
    # prepared on another is not (https://www.psycopg.org/psycopg3/docs/advanced/prepare.html)
    return {**{k: v for k, v in args.items() if k not in given}, "prepare_threshold": None}


def stamp(value: datetime) -> str:
    """A time as SQLAlchemy keeps it in SQLite: naive UTC text with microseconds."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given to the store")
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Dialect:
    """The common face; ``SQLite`` and ``Postgres`` fill it in."""

    name = ""

    def __init__(self, url: str) -> None:
        self.url = url
        self.shown = masked(url)

    def connect(self, *, write: bool, busy_timeout: float, bounded: bool) -> Any:
        raise NotImplementedError

    def sql(self, statement: str) -> str:
        return statement

    def param(self, value: Any) -> Any:
        return value

    def json(self, value: Any) -> Any:
        raise NotImplementedError

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[Any]:
        raise NotImplementedError
        yield  # pragma: no cover

    @contextmanager
    def alone(self, conn: Any) -> Iterator[Any]:
        """A cursor for one statement that is a transaction of its own (SQLite: as any write)."""
        with self.transaction(conn) as cur:
            yield cur

    def insert_rows(self, cur: Any, head: str, rows: Sequence[Sequence[Any]], *,
                    returning: bool) -> list[int]:
        """``head`` (``INSERT INTO t (a, b)``) of every row; with ``returning``, their ids."""
        sql = f"{head} VALUES ({', '.join('?' * len(rows[0]))})" if rows else head
        if not returning:
            cur.executemany(sql, rows)
            return []
        return self.insert_ids(cur, sql, rows)

    def insert_id(self, cur: Any, sql: str, params: Sequence[Any]) -> int:
        raise NotImplementedError

    def insert_ids(self, cur: Any, sql: str, rows: Sequence[Sequence[Any]]) -> list[int]:
        """INSERTs of one row each; their new ids, in order."""
        return [self.insert_id(cur, sql, row) for row in rows]

    def any_of(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """SQL for "``column`` is one of ``values``" (at most writes.CHUNK of them), and its
        parameters."""
        return f"{column} IN ({', '.join('?' * len(values))})", list(values)

    def glob(self, column: str, pattern: str) -> tuple[str, str]:
        """SQL for "``column`` matches the shell glob ``pattern``" (``*``, ``?``, case
        sensitive), and its parameter: SQLite's own GLOB (its LIKE ignores case), with "[" made
        literal as PostgreSQL's LIKE has it."""
        return f"{column} GLOB ?", pattern.replace("[", "[[]")

    def serialize(self, cur: Any, key: int) -> None:
        """Hold the transaction lock ``key`` until the transaction ends (SQLite: a write
        transaction already holds the only one there is)."""

    def is_error(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def missing_table(self, exc: BaseException) -> bool:
        """Is the driver's error a table that is not there (an empty database)?"""
        raise NotImplementedError

    def outage(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def error(self, exc: BaseException, prefix: str = "") -> StoreError:
        """The driver's error as ours: a StoreOutage when the history is away for now."""
        return (StoreOutage if self.outage(exc) else StoreError)(
            self.shown, prefix + first_line(exc))


class SQLite(Dialect):
    name = "sqlite"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        path = sqlite_file(url)
        if path is None:
            raise StoreError(self.shown, "an SQLite history is a file: sqlite:///PATH")
        self.path: Path = path

    def connect(self, *, write: bool, busy_timeout: float, bounded: bool) -> Any:
        # any thread: History holds a lock around every use (synwatch/store/base.py)
        if not write:
            return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=busy_timeout,
                                   check_same_thread=False)
        # autocommit: each write is a transaction of its own (BEGIN IMMEDIATE below)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=busy_timeout,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def param(self, value: Any) -> Any:
        return stamp(value) if isinstance(value, datetime) else value

    def json(self, value: Any) -> Any:
        return json.dumps(value)

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[Any]:
        cur = conn.cursor()
        try:
            # IMMEDIATE: the write lock at the start, so a busy file fails here, not halfway
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                # after a full disk, an I/O error or a busy COMMIT SQLite may have rolled back
                # itself, or not (https://sqlite.org/lang_transaction.html "Response To Errors
                # Within A Transaction"): never leave a transaction open for the next write,
                # and never let the rollback's own error hide the one that matters
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        cur.execute("ROLLBACK")
                raise
        finally:
            cur.close()

    def insert_id(self, cur: Any, sql: str, params: Sequence[Any]) -> int:
        cur.execute(sql, params)
        return int(cur.lastrowid)

    def is_error(self, exc: BaseException) -> bool:
        return isinstance(exc, (sqlite3.Error, OSError))

    def missing_table(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "no such table" in str(exc)

    def outage(self, exc: BaseException) -> bool:
        """Locked, busy, full, read-only, I/O errors and files that are not (or no longer) a
        database are outages; a refused row (IntegrityError) or a bad statement is a bug."""
        if isinstance(exc, OSError):
            return True
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return (code & 0xFF) in SQLITE_OUTAGES
        why = first_line(exc)  # Python before 3.11: the classes are all there is
        return isinstance(exc, sqlite3.OperationalError) and "syntax error" not in why \
            and "no such" not in why


class Postgres(Dialect):
    name = "postgresql"

    # URLs whose server is a pooler that takes no startup options (pgbouncer): connected to
    # without them from then on, by every history of the process (a reconnect, a CLI call)
    pooled: ClassVar[set[str]] = set()

    def connect(self, *, write: bool, busy_timeout: float, bounded: bool) -> Any:
        import psycopg  # noqa: PLC0415 - only a PostgreSQL history needs the driver

        args = pg_connect_args(self.url, bounded_statements=bounded and self.url not in self.pooled)
        try:
            return psycopg.connect(libpq_uri(self.url), autocommit=True, **args)
        except psycopg.OperationalError as exc:
            if "options" not in args or POOLER_REFUSAL not in str(exc):
                raise
        # pgbouncer refuses the options that carry the statement and lock timeouts (unless
        # its track_extra_parameters lists them: https://www.pgbouncer.org/config.html); its
        # connect_query, or the role's own settings, set them on its server connections
        self.pooled.add(self.url)
        conn = psycopg.connect(libpq_uri(self.url), autocommit=True,
                               **pg_connect_args(self.url))
        try:
            [(timeout,)] = conn.execute("SHOW statement_timeout").fetchall()
        except psycopg.Error:
            conn.close()
            raise
        log.log(logging.INFO if timeout != "0" else logging.WARNING,
                "store: %s is a pooler that takes no startup options: statement timeout %s "
                "(the role's or the pooler's)%s", self.shown, timeout,
                "" if timeout != "0" else "; set one (docs/fleet.md, \"A thousand nodes\") so "
                "a locked history cannot hold the service up")
        return conn

    def sql(self, statement: str) -> str:
        # psycopg's placeholders are %s, so a literal % is %%
        return statement.replace("%", "%%").replace("?", "%s")

    def json(self, value: Any) -> Any:
        from psycopg.types.json import Json  # noqa: PLC0415

        return Json(value)

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[Any]:
        with conn.transaction(), conn.cursor() as cur:
            yield cur

    @contextmanager
    def alone(self, conn: Any) -> Iterator[Any]:
        # in autocommit a statement sent alone is a transaction of its own, one round trip, not
        # three (BEGIN, it, COMMIT), which a fleet copying a ban pays on every node at once
        # (https://www.postgresql.org/docs/current/tutorial-transactions.html)
        with conn.cursor() as cur:
            yield cur

    def insert_rows(self, cur: Any, head: str, rows: Sequence[Sequence[Any]], *,
                    returning: bool) -> list[int]:
        if not rows:
            return []
        row = f"({', '.join(['%s'] * len(rows[0]))})"
        if returning and len(rows) > 1:  # an INSERT a row, pipelined: PostgreSQL promises no
            # order of RETURNING's ids (pgsql-hackers, "Enforce that INSERT...RETURNING preserves
            # the order of multi rows", 2012)
            return self.insert_ids(cur, f"{head} VALUES {row}", rows)
        cur.execute(f"{head} VALUES {', '.join([row] * len(rows))}"
                    + (" RETURNING id" if returning else ""), [p for r in rows for p in r])
        return [int(cur.fetchone()[0])] if returning else []

    def insert_id(self, cur: Any, sql: str, params: Sequence[Any]) -> int:
        cur.execute(sql + " RETURNING id", params)
        return int(cur.fetchone()[0])

    def insert_ids(self, cur: Any, sql: str, rows: Sequence[Sequence[Any]]) -> list[int]:
        # one round trip for them all, each the same short statement: psycopg
        # pipelines executemany and keeps each statement's result, in order
        # (https://www.psycopg.org/psycopg3/docs/api/cursors.html#psycopg.Cursor.executemany)
        if not rows:
            return []
        cur.executemany(sql + " RETURNING id", rows, returning=True)
        ids = []
        while True:
            ids.append(int(cur.fetchone()[0]))
            if not cur.nextset():
                return ids

    def any_of(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        # one array parameter: a statement of the same text whatever the count (psycopg
        # parses and PostgreSQL plans it once), not one with a placeholder per value
        return f"{column} = ANY(?)", [list(values)]

    def glob(self, column: str, pattern: str) -> tuple[str, str]:
        # LIKE with its own wildcards escaped (PostgreSQL has no GLOB)
        like = (pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                .replace("*", "%").replace("?", "_"))
        return f"{column} LIKE ? ESCAPE '\\'", like

    def serialize(self, cur: Any, key: int) -> None:
        # released at commit or rollback, so it holds with a transaction pooler in between
        # (https://www.postgresql.org/docs/current/explicit-locking.html#ADVISORY-LOCKS)
        cur.execute("SELECT pg_advisory_xact_lock(%s)", [key])

    def is_error(self, exc: BaseException) -> bool:
        import psycopg  # noqa: PLC0415

        return isinstance(exc, (psycopg.Error, OSError))

    def missing_table(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlstate", None) == "42P01"  # undefined_table

    def outage(self, exc: BaseException) -> bool:
        import psycopg  # noqa: PLC0415

        state = getattr(exc, "sqlstate", None)
        if isinstance(exc, (OSError, psycopg.OperationalError, psycopg.InterfaceError)) \
                and state is None:
            # no answer from a server at all (refused, timed out, cut) is an outage; an answer
            # that says no (no such database or role, a password or pg_hba refused) is not
            why = str(exc)
            return not any(no in why for no in PG_REFUSALS)
        state = state or ""
        return state.startswith(PG_OUTAGE_CLASSES) or state in PG_OUTAGE_STATES


def dialect_of(url: str) -> Dialect:
    if sqlite_file(url) is not None:
        return SQLite(url)
    if url.startswith(PSYCOPG):
        return Postgres(url)
    raise StoreError(masked(url), "synwatch keeps its history in SQLite (sqlite:///PATH) or "
                     "PostgreSQL (postgresql+psycopg://USER@HOST/DB)")


REVISION = re.compile(r'^revision = "([^"]+)"', re.MULTILINE)
DOWN_REVISION = re.compile(r'^down_revision = "([^"]+)"', re.MULTILINE)
VERSIONS = Path(__file__).resolve().parent / "migrations" / "versions"


def head_revision() -> str | None:
    """The newest migration: the revision no other migration revises (read from the files,
    without Alembic, whose import costs tens of milliseconds on every command)."""
    revisions, revised = set(), set()
    for path in VERSIONS.glob("*.py"):
        source = path.read_text(encoding="utf-8")
        revisions.update(REVISION.findall(source))
        revised.update(DOWN_REVISION.findall(source))
    heads = sorted(revisions - revised)
    return heads[0] if len(heads) == 1 else None
