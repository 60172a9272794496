"""A real PostgreSQL server for the fleet tests: Debian's binaries, a cluster made with initdb in a
temporary directory, listening on a Unix socket in that directory only (no TCP port, so nothing
on the machine can reach it and it can reach nothing), removed at the end. A cluster given a
network namespace of the test's own also listens on TCP there, for the partition tests.

initdb and postgres refuse to run as root, so both run as the ``postgres`` user that Debian's
package creates (https://www.postgresql.org/docs/15/app-initdb.html)."""

from __future__ import annotations

import ipaddress
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
    """One PostgreSQL server. ``url(db)`` is an SQLAlchemy URL for a database of it.

    ``netns`` and ``address``: it also listens on TCP at ``address``, inside the network
    namespace ``netns`` that the test made (never on an address of the host), for clients
    reached through a veth (``tcp_url``); its Unix socket stays the tests' own way in."""

    def __init__(self, netns: str = "", address: str = "") -> None:
        self.netns, self.address = netns, address
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
        if self.address:  # clients of the namespace's network, trusted as local ones are
            with (self.data / "pg_hba.conf").open("a") as hba:
                net = ipaddress.ip_network(f"{self.address}/24", strict=False)
                hba.write(f"host all all {net} trust\n")
        return self.start()

    def start(self) -> Cluster:
        opts = (f"-k {self.dir} -c listen_addresses='{self.address}' -c fsync=off "
                "-c max_connections=200")
        argv = [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o",
                opts, "-w", "-t", "60", "start"]
        if self.netns:  # the server process lives in the namespace, and its socket with it
            subprocess.run(["ip", "netns", "exec", self.netns, "runuser", "-u", "postgres",
                            "--", *argv], check=True, capture_output=True, text=True,
                           cwd=self.dir, timeout=120)
        else:
            self._as_postgres(*argv)
        return self

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode,
                          "-w", "-t", "60", "stop")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@/{db}?host={self.dir}"

    def tcp_url(self, db: str) -> str:
        """An SQLAlchemy URL reaching it over TCP at ``address`` (from inside a namespace
        routed to it)."""
        return f"postgresql+psycopg://postgres@{self.address}:5432/{db}"

    def connect(self, db: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(host=str(self.dir), user="postgres", dbname=db, autocommit=True)

    def new_database(self) -> str:
        """A new empty database; its SQLAlchemy URL (over the Unix socket)."""
        return self.url(self.new_database_name())

    def new_database_name(self) -> str:
        name = f"synwatch_{uuid.uuid4().hex[:12]}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return name

    def destroy(self) -> None:
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
