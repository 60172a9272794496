"""Wakes a node when another node of the fleet bans or unbans (PostgreSQL LISTEN/NOTIFY).

A thread holds one connection that LISTENs on the ban channel; a notification from another host
sets ``woken``, which the ban action reads at its next tick (at least once a second). The
periodic fleet reconcile stays the fallback: a lost connection, a notification sent while this
node was disconnected (PostgreSQL does not queue them for absent listeners:
https://www.postgresql.org/docs/current/sql-listen.html) or an SQLite fleet all end up there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from synwatch.store.dialect import BAN_CHANNEL, libpq_uri, pg_connect_args

log = logging.getLogger("synwatch")
RECONNECT = 5.0  # seconds between tries after the connection is lost


class FleetListener:
    def __init__(self, url: str, host: str, wake: Callable[[], None]) -> None:
        self.url, self.host, self.wake = url, host, wake
        self.woken = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-listen", daemon=True)
        self.heard = 0  # notifications from other nodes (tests, status)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)

    def _run(self) -> None:
        import psycopg  # noqa: PLC0415 - only a PostgreSQL fleet needs it

        problem: str | None = None
        while not self._stop.is_set():
            try:
                # bounded as the store's connections: a partition ends the connection within
                # seconds (keepalives, tcp_user_timeout), and the thread tries again
                with psycopg.connect(libpq_uri(self.url), autocommit=True,
                                     **pg_connect_args(self.url)) as conn:
                    conn.execute(f"LISTEN {BAN_CHANNEL}")
                    log.info("fleet: listening for the other nodes' bans (PostgreSQL LISTEN "
                             "%s)%s", BAN_CHANNEL, " again" if problem is not None else "")
                    problem = None
                    self.woken.set()  # whatever happened while away: look once
                    self._listen(conn)
            except psycopg.Error as exc:
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                if problem != why:
                    log.warning("fleet: cannot listen for bans (%s); the fleet is checked "
                                "every few seconds meanwhile", why)
                    problem = why
                self._stop.wait(RECONNECT)

    def _listen(self, conn: Any) -> None:
        while not self._stop.is_set():
            for note in conn.notifies(timeout=1.0):
                if note.payload != self.host:
                    self.heard += 1
                    self.woken.set()
                    self.wake()
