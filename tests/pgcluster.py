"""A real PostgreSQL server for the fleet tests: Debian's binaries, a cluster made with initdb in a
temporary directory, listening on a Unix socket in that directory only (no TCP port, so nothing
on the machine can reach it and it can reach nothing), removed at the end.

initdb and postgres refuse to run as root, so both run as the ``postgres`` user that Debian's
package creates (https://www.postgresql.org/docs/15/app-initdb.html)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg


def _bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parts[4]) if p.parts[4].isdigit() else 0)
    if not found:
        raise RuntimeError("PostgreSQL is not installed (Debian's postgresql package; "
                           "./scripts/bootstrap test installs it)")
    return Path(found[-1]).parent


class Cluster:
    """One PostgreSQL server. ``url(db)`` is an SQLAlchemy URL for a database of it."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.user = pwd.getpwnam("postgres")
        self.dir = Path(tempfile.mkdtemp(prefix="synwatch-pg-"))
        os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True,
                       capture_output=True, text=True, cwd=self.dir, timeout=120)

    def init(self) -> Cluster:
        self._as_postgres(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                          "--auth=trust", "-E", "UTF8", "--no-sync")
        return self.start()

    def start(self) -> Cluster:
        opts = f"-k {self.dir} -c listen_addresses='' -c fsync=off -c max_connections=200"
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                          str(self.log), "-o", opts, "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode,
                          "-w", "-t", "60", "stop")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@/{db}?host={self.dir}"

    def connect(self, db: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(host=str(self.dir), user="postgres", dbname=db, autocommit=True)

    def new_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        name = f"synwatch_{uuid.uuid4().hex[:12]}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)

    def destroy(self) -> None:
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
