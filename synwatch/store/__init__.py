"""The history: the one class that runs SQL, for the service, every command, `check-config`,
the package's removal and the fleet.

``History`` speaks SQLite through Python's sqlite3 and PostgreSQL through psycopg, with what
differs between them in synwatch/store/dialect.py; each statement and each row-to-record
conversion is written once (writes.py, state.py, reads.py, rows.py). SQLAlchemy's models and
Alembic's migrations stay the schema's definition and are imported only to migrate, in a child
process (synwatch/store/migrate.py): fail2ban keeps its history with sqlite3 the same way, and
SQLAlchemy's imports alone were 28 MiB of a resident service. SQLite runs in WAL mode with a
busy timeout, so commands read while the service writes.

Opening for writing creates and migrates the history when needed; opening read-only (every
command that only shows) never creates or migrates it: ``open_existing`` answers None when
there is no history yet, and an older schema is an error that says what migrates it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

from synwatch.config import nearest_existing, sqlite_file
from synwatch.config.urls import masked
from synwatch.errors import StaleSchema, StoreError, StoreOutage
from synwatch.records import NewEvent
from synwatch.store.base import HistoryBase
from synwatch.store.dialect import BUSY_TIMEOUT, SQLite, dialect_of, head_revision
from synwatch.store.reads import Reads
from synwatch.store.state import State
from synwatch.store.writes import PRUNE_BATCH, Writes

__all__ = ["BUSY_TIMEOUT", "PRUNE_BATCH", "History", "NewEvent", "prepare"]
log = logging.getLogger("synwatch")
OUTAGE_STATUS = 75  # the migration child's "away for now" (synwatch/store/migrate.py)
PING_WAIT = 0.2  # seconds the away thread's test waits for another writer's lock


class History(Writes, State, Reads, HistoryBase):
    """The history of one node (``host``: storage.host, what it writes carries it and what it
    resumes is its own), in parts by what they are for: ``Writes`` (recording, pruning),
    ``State`` (what the service carries on with), ``Reads`` (what people read)."""

    @classmethod
    def open(cls, url: str, *, host: str | None = None, write: bool = True,
             migrate: bool = True, bounded: bool = False) -> History:
        """``write``: created and migrated first when needed (``migrate``); read-only: the
        schema must be the newest. ``bounded``: the service's statements are given up on
        after a few seconds (connecting, sending and waiting always are)."""
        history = cls._made(url, host, write=write, bounded=bounded)
        with history._closed_on_error():
            if write and migrate:
                history.migrate()
            elif not write:
                history.require_current(history.schema_revision())
        return history

    @classmethod
    def open_existing(cls, url: str, *, host: str | None = None,
                      write: bool = False) -> History | None:
        """The history if there is one (None: nothing recorded yet; a command that only shows
        or lifts what is there never creates it, only the service does)."""
        db = sqlite_file(url)
        if db is not None and not db.exists():
            log.debug("store: no history yet (%s is not there)", db)
            return None
        history = cls._made(url, host, write=write, bounded=False)
        with history._closed_on_error():
            current = history.schema_revision()
            if current is None:  # an empty database: no history yet
                log.debug("store: no history yet (%s has no tables)", history.display_url)
                history.close()
                return None
            if write:
                history.migrate()  # an older schema, to act on (`unban`, the removal)
            else:
                history.require_current(current)
        return history

    @classmethod
    def _made(cls, url: str, host: str | None, *, write: bool, bounded: bool) -> History:
        """The history's object, its SQLite file made first when it is to be written (it
        connects at its first call)."""
        dialect = dialect_of(url)
        if write and isinstance(dialect, SQLite):
            make_file(dialect)
        history = cls(dialect, host or socket.gethostname(), write=write, bounded=bounded)
        log.debug("store: %s, %s (node %s)", history.display_url,
                  "to write" if write else "read-only", history.host)
        return history

    @contextlib.contextmanager
    def _closed_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.close()
            raise

    def require_current(self, current: str | None) -> None:
        """A read-only history (its schema ``current``) must be of the newest schema: it is
        never migrated here."""
        head = head_revision()
        if current is not None and current != head:
            raise StaleSchema(self.display_url, f"the history's schema is {current} and this "
                              f"synwatch reads {head}; `synwatch run` migrates it at its start")

    def set_busy_timeout(self, seconds: float) -> None:
        """How long a write waits for another writer's lock from now on. The service waits
        briefly and spools, so a locked history never holds detection up."""
        self.busy_timeout = seconds
        if self._conn is not None and isinstance(self.db, SQLite):
            self._conn.execute(f"PRAGMA busy_timeout={int(seconds * 1000)}")

    def schema_revision(self) -> str | None:
        """The schema's revision as Alembic records it, None for an empty database."""
        try:
            rows = self.rows("SELECT version_num FROM alembic_version")
        except StoreError as exc:
            if exc.__cause__ is not None and self.db.missing_table(exc.__cause__):
                return None  # nothing migrated yet
            raise
        return str(rows[0][0]) if rows else None

    def head_revision(self) -> str | None:
        return head_revision()

    def migrate(self) -> None:
        """Bring the schema to the newest revision (in a child process)."""
        if self.schema_revision() != head_revision():
            in_child(self.url, self.host)

    def ping(self) -> None:
        """Could a write succeed now? From any thread (the spool's away thread), on a
        connection of its own, bounded in time: for an SQLite file, it is still the one the
        service writes, its disk has room, and no other writer holds the lock."""
        self.check_file()
        probe = History(self.db, self.host, write=self.write, bounded=True)
        probe.busy_timeout = PING_WAIT
        try:
            with probe.writing() if self.write else contextlib.nullcontext():
                probe.rows("SELECT 1")
        finally:
            probe.close()


def prepare(url: str, host: str) -> None:
    """The history created and migrated to the newest schema unless it already is. From any
    thread: the spool's away thread prepares a history that could not be opened at the start
    (a read-only or full disk)."""
    History.open(url, host=host).close()


def make_file(dialect: SQLite) -> None:
    """An SQLite history file that is not there yet, made for its owner only: it names
    attackers, listeners and bans (SQLite gives its -wal and -shm files the file's mode)."""
    db = dialect.path
    if db.exists():
        return
    # cheap first (the away thread tries this while the start could not open it): a directory
    # that cannot take the file needs no migration child to say so
    where = nearest_existing(db)
    if where is None or not where.is_dir() or not os.access(where, os.W_OK):
        raise StoreOutage(dialect.url, f"{where or db.parent} cannot take the history file")
    try:
        db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(db, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise StoreOutage(dialect.url, f"cannot create {db}: {exc.strerror}") from exc


def in_child(url: str, host: str) -> None:
    """Create or migrate the history in a child process (synwatch/store/migrate.py: Alembic and
    SQLAlchemy stay there); a history away for now is a StoreOutage, as any other write."""
    import subprocess  # noqa: PLC0415 - only to migrate: a list need not load it
    import sys  # noqa: PLC0415

    done = subprocess.run([sys.executable, "-m", "synwatch.store.migrate", host],
                          input=url + "\n", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, check=False)
    sys.stderr.write("".join(line + "\n" for line in done.stderr.splitlines()
                             if not line.startswith("synwatch: ")))
    if done.returncode != 0:
        why = [line for line in done.stderr.splitlines() if line.startswith("synwatch: ")]
        error = StoreOutage if done.returncode == OUTAGE_STATUS else StoreError
        raise error(masked(url), why[-1].split(": ", 2)[-1] if why else
                    f"migration exited with status {done.returncode}")
