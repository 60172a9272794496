"""The history's connection: one per History, through the database's own driver (sqlite3 or
psycopg), every failure turned into StoreError or StoreOutage (synwatch/store/dialect.py). A
lost PostgreSQL connection is made again at the next call; an SQLite file is checked to still be
the one opened, with room on its disk, before each write."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from synwatch.errors import StoreError, StoreOutage
from synwatch.store.dialect import BUSY_TIMEOUT, Dialect, SQLite

MIN_FREE = 1 << 20  # bytes: less free space than this on the history's disk is an outage


class Cursor:
    """A driver's cursor that takes ``?`` placeholders and aware datetimes on both databases."""

    def __init__(self, cur: Any, dialect: Dialect) -> None:
        self.cur, self.db = cur, dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        self.cur.execute(self.db.sql(sql), [self.db.param(p) for p in params])
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.cur.executemany(self.db.sql(sql),
                             [[self.db.param(p) for p in row] for row in rows])

    def insert(self, sql: str, params: Sequence[Any]) -> int:
        """An INSERT of one row; its new id."""
        return self.db.insert_id(self.cur, self.db.sql(sql),
                                 [self.db.param(p) for p in params])

    def insert_rows(self, head: str, rows: Sequence[Sequence[Any]], *,
                    returning: bool = True) -> list[int]:
        """``head`` (``INSERT INTO t (a, b)``) of every row, in one statement where the database
        takes one; with ``returning``, the new ids in the rows' order (several rows: an INSERT
        each, so in a transaction, never alone())."""
        return self.db.insert_rows(self.cur, self.db.sql(head),
                                   [[self.db.param(p) for p in row] for row in rows],
                                   returning=returning)

    def insert_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> list[int]:
        """INSERTs of one row each; their new ids, in order."""
        return self.db.insert_ids(self.cur, self.db.sql(sql),
                                  [[self.db.param(p) for p in row] for row in rows])

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self.cur.fetchall())

    @property
    def rowcount(self) -> int:
        return int(self.cur.rowcount)


class HistoryBase:
    def __init__(self, dialect: Dialect, host: str, *, write: bool, bounded: bool) -> None:
        self.db, self.host = dialect, host  # host: this node (storage.host)
        self.url = dialect.url
        self.write, self.bounded = write, bounded
        self.busy_timeout = BUSY_TIMEOUT
        self._conn: Any = None
        # one connection, any thread (a CLI command, a test's reader thread): one call at a
        # time, and a transaction is never shared with another thread's statements
        self._lock = threading.RLock()
        self.identity: tuple[int, int] | None = None  # the SQLite file this history writes

    @property
    def display_url(self) -> str:
        return self.db.shown  # the userinfo's password and libpq's ?password= both

    @property
    def dialect(self) -> str:
        return self.db.name

    def connection(self) -> Any:
        """The open connection, made (again) when there is none or the last one broke."""
        with self._lock:
            return self._connection()

    def _connection(self) -> Any:
        conn = self._conn
        if conn is not None and not getattr(conn, "broken", False):
            return conn
        self.close()
        with self._ours():
            conn = self.db.connect(write=self.write, busy_timeout=self.busy_timeout,
                                   bounded=self.bounded)
        if isinstance(self.db, SQLite) and self.write:
            # the file this connection writes: one deleted or replaced under the service takes
            # writes that nobody will ever read, so each write checks it is still the history
            st = self.db.path.stat()
            self.identity = (st.st_dev, st.st_ino)
        self._conn = conn
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # a connection already cut
                if not self.db.is_error(exc):
                    raise

    def _error(self, exc: BaseException, prefix: str = "") -> StoreError:
        if isinstance(exc, ImportError):
            return StoreError(self.display_url, f"{prefix}the database driver is not "
                              f"installed ({exc.name or exc})")
        return self.db.error(exc, prefix)

    @contextmanager
    def writing(self) -> Iterator[Cursor]:
        """One transaction; a failure rolls it back whole."""
        if not self.write:
            raise StoreError(self.display_url, "opened read-only")
        self.check_file()
        with self._ours(), self._lock, self.db.transaction(self.connection()) as cur:
            yield Cursor(cur, self.db)

    @contextmanager
    def alone(self) -> Iterator[Cursor]:
        """A write of one statement, a transaction of its own: on PostgreSQL sent as it is
        (synwatch/store/dialect.py says why), on SQLite in a transaction as every write."""
        if not self.write:
            raise StoreError(self.display_url, "opened read-only")
        self.check_file()
        with self._ours(), self._lock, self.db.alone(self.connection()) as cur:
            yield Cursor(cur, self.db)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._ours(), self._lock:
            return self._rows(sql, params)

    @contextmanager
    def _ours(self) -> Iterator[None]:
        """The driver's errors as ours (StoreError, StoreOutage), and a driver that is not
        installed (psycopg, for a PostgreSQL history); anything else as it is."""
        try:
            yield
        except StoreError:
            raise
        except ImportError as exc:
            raise self._error(exc) from exc
        except Exception as exc:
            if self.db.is_error(exc):
                raise self._error(exc) from exc
            raise

    def _rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        cur = self.connection().cursor()
        try:
            return Cursor(cur, self.db).execute(sql, params).fetchall()
        finally:
            cur.close()

    def check_file(self) -> None:
        """An SQLite history file is the one opened, and its disk has room (a write to a full
        disk fails only once SQLite needs a new page, and one to a deleted file never fails).
        A server's files are its own."""
        if not isinstance(self.db, SQLite) or self.identity is None:
            return
        path = self.db.path
        try:
            st = path.stat()
            vfs = os.statvfs(path)
        except OSError as exc:
            raise StoreOutage(self.url, f"the history file is gone ({exc.strerror}); nothing "
                              "is recorded until synwatch restarts, which starts a new one") \
                from exc
        if (st.st_dev, st.st_ino) != self.identity:
            raise StoreOutage(self.url, "the history file was replaced; nothing is recorded "
                              "until synwatch restarts")
        if vfs.f_bavail * vfs.f_frsize < MIN_FREE:
            raise StoreOutage(self.url, "the disk is full")
