"""A real pgbouncer (Debian's package) in front of a tests/support/pgcluster.py server, as a fleet
runs it: transaction pooling, so a thousand nodes share a few server connections. It listens on a
Unix socket in a temporary directory only, like the cluster, and runs as the ``postgres`` user
(pgbouncer refuses root). Its settings are the essentials of docs/fleet.md's ("A thousand
nodes"), on a Unix socket and with trust for its one user.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.support.pgcluster import Cluster

# what the service's own connections set where no pooler is between (synwatch/store/dialect.py)
TIMEOUTS = ("SET statement_timeout = 5000; SET lock_timeout = 3000; "
            "SET idle_in_transaction_session_timeout = 10000")
PORT = 6432  # pgbouncer's own; only its socket's name (.s.PGSQL.6432), no TCP port is opened


class Pooler:
    """``url(db)``: an SQLAlchemy URL of a database of ``cluster``, through the pooler."""

    def __init__(self, cluster: Cluster, pool_size: int = 20, clients: int = 4000) -> None:
        self.cluster, self.pool_size, self.clients = cluster, pool_size, clients
        self.dir = Path(tempfile.mkdtemp(prefix="synwatch-pgbouncer-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.ini, self.log = self.dir / "pgbouncer.ini", self.dir / "pgbouncer.log"
        self.pidfile = self.dir / "pgbouncer.pid"
        self.proc: subprocess.Popen[bytes] | None = None

    def _write(self) -> None:
        self.ini.write_text(f"""\
[databases]
* = host={self.cluster.dir} port=5432 connect_query='{TIMEOUTS}'

[pgbouncer]
listen_addr =
unix_socket_dir = {self.dir}
listen_port = {PORT}
auth_type = trust
auth_file = {self.dir / "users.txt"}
pool_mode = transaction
default_pool_size = {self.pool_size}
max_client_conn = {self.clients}
listen_backlog = 4096
idle_transaction_timeout = 15
server_login_retry = 1
logfile = {self.log}
pidfile = {self.pidfile}
admin_users = postgres
""")
        (self.dir / "users.txt").write_text('"postgres" ""\n')  # trust still names its users
        for path in (self.ini, self.dir / "users.txt"):
            shutil.chown(path, "postgres", "postgres")

    def start(self) -> Pooler:
        self._write()
        # a file descriptor per client and per server connection (max_client_conn)
        self.proc = subprocess.Popen(
            ["prlimit", f"--nofile={self.clients + 256}", "--", "runuser", "-u", "postgres",
             "--", "pgbouncer", str(self.ini)], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with self.admin() as conn:
                    conn.execute("SHOW VERSION")
                return self
            except psycopg.OperationalError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start: {self.log.read_text()}") \
                        from exc
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@/{db}?host={self.dir}&port={PORT}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """pgbouncer's console (SHOW POOLS, SHOW SERVERS)."""
        return psycopg.connect(host=str(self.dir), port=PORT, user="postgres",
                               dbname="pgbouncer", autocommit=True, prepare_threshold=None)

    def server_connections(self, db: str) -> int:
        """The server connections the pooler holds to ``db`` now (SHOW SERVERS)."""
        with self.admin() as conn:
            cur = conn.execute("SHOW SERVERS")
            names = [c.name for c in cur.description or ()]
            return sum(1 for r in cur.fetchall() if r[names.index("database")] == db)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
