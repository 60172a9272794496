"""The response never waits for the history (issue 26, "Responses wait for the history").

A PostgreSQL server in a network namespace of its own, reached over TCP through a veth from the
lab's server namespace (where the service itself runs, `ip netns exec`); the partition is an
nftables rule in the database's namespace that drops every packet, so the server neither answers
nor refuses, as across a network that fails. During it a concentrated lab flood gets SYN
cookies and its ban within seconds, the probes keep their schedule, SIGTERM ends the service
within seconds, and a start reaches "running" within seconds; when the network is back the
spool is written to the server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import synwatch
from tests.support.harness import Service
from tests.support.lab import SPOOF_NET, Lab, banned_in_nft, flood_from, lab, lab_port, sh
from tests.support.pgcluster import Cluster
from tests.support.wait import eventually

pytestmark = pytest.mark.needs_root
FLOODED = f"{SPOOF_NET}.41.0/24"
DB_NET = "10.233.0"  # the veth between the lab's server namespace and the database's


@dataclass
class Partitioned:
    lab: Lab
    db_ns: str
    cluster: Cluster

    def drop(self) -> None:
        """Every packet to the database's namespace dropped: a partition, not a refusal."""
        for argv in (("add", "table", "inet", "partition"),
                     ("add", "chain", "inet", "partition", "input",
                      "{ type filter hook input priority -300; policy drop; }")):
            sh("ip", "netns", "exec", self.db_ns, "nft", *argv)

    def heal(self) -> None:
        sh("ip", "netns", "exec", self.db_ns, "nft", "delete", "table", "inet", "partition")

    def cookies(self) -> int:
        return int(self.lab.in_server("sysctl", "-n", "net.ipv4.tcp_syncookies").stdout)


@pytest.fixture
def partitioned() -> Iterator[Partitioned]:
    with lab() as made:
        made.sysctl("net.ipv4.tcp_synack_retries", 1)
        made.sysctl("net.ipv4.tcp_syncookies", 0)  # so raising them is seen
        db_ns = f"swt-{made.tag}-d"
        veth_s, veth_d = f"sw{made.tag}p", f"sw{made.tag}d"
        cluster: Cluster | None = None
        try:
            sh("ip", "netns", "add", db_ns)
            sh("ip", "link", "add", veth_s, "netns", made.server_ns, "type", "veth", "peer",
               "name", veth_d, "netns", db_ns)
            for ns, dev, ip in ((made.server_ns, veth_s, f"{DB_NET}.1"),
                                (db_ns, veth_d, f"{DB_NET}.2")):
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            cluster = Cluster(netns=db_ns, address=f"{DB_NET}.2").init()
            yield Partitioned(made, db_ns, cluster)
        finally:
            if cluster is not None:
                cluster.destroy()
            sh("ip", "netns", "del", db_ns, check=False)


def test_a_partitioned_database_never_holds_the_response_up(
        partitioned: Partitioned, tmp_path: Path) -> None:
    the_lab, pg = partitioned.lab, partitioned.cluster
    url = pg.tcp_url(pg.new_database_name())
    service = Service(the_lab, tmp_path, dry_run=False, run_in=the_lab.server_ns,
                      storage=textwrap.dedent(f"""\
                          url = "{url}"
                          state_dir = "{tmp_path}"
                          """))
    port = lab_port()
    the_lab.listen(port, backlog=64)
    try:
        service.wait_log("store: postgresql+psycopg://")
        service.wait_probes(2)
        partitioned.drop()
        time.sleep(1)  # the partition is there before the flood, as in the finding
        flooded = time.monotonic()
        flood_from(the_lab, port, [FLOODED], each=800)
        eventually(lambda: partitioned.cookies() == 1, "SYN cookies during the partition",
                 timeout=15)
        cookies_after = time.monotonic() - flooded
        eventually(lambda: FLOODED in banned_in_nft(the_lab), "the ban during the partition",
                 timeout=15)
        banned_after = time.monotonic() - flooded
        # the probes keep their schedule (0.5 s): 10 rounds within 10 s
        service.wait_probes(10, timeout=10)
        service.wait_log("writes go to the spool")
        stopping = time.monotonic()
        service.stop()
        stopped_in = time.monotonic() - stopping
        # a start while the server still does not answer: running within seconds, on the spool
        starting = time.monotonic()
        service.start()
        ready_in = time.monotonic() - starting
        service.wait_log("starting on the spool")
        service.wait_probes(3, timeout=10)
        print(f"cookies after {cookies_after:.1f} s, ban after {banned_after:.1f} s, "
              f"SIGTERM in {stopped_in:.1f} s, running in {ready_in:.1f} s")
        assert cookies_after < 8 and banned_after < 8
        assert stopped_in < 5
        assert ready_in < 10
        # the network comes back: the spool goes to the server (the incident, its ban)
        partitioned.heal()
        service.wait_log("recording directly again", timeout=30)
        with pg.connect(url.rsplit("/", 1)[1]) as conn:
            prefixes = [r[0] for r in conn.execute("SELECT prefix FROM bans")]
        assert prefixes == [FLOODED]
        assert FLOODED in banned_in_nft(the_lab)
    finally:
        if service.proc.poll() is None:
            service.stop()


@pytest.fixture
def the_lab() -> Iterator[Lab]:
    with lab() as made:
        made.sysctl("net.ipv4.tcp_synack_retries", 1)
        yield made


def test_bans_stay_in_the_kernel_when_the_history_file_is_deleted(
        the_lab: Lab, tmp_path: Path) -> None:
    """The SQLite history deleted while two bans hold: seen within a second (one ERROR), then
    a restart (a new, empty history): the kernel's bans stay to their own timeouts."""
    nets = [f"{SPOOF_NET}.{n}.0/24" for n in (43, 45)]
    service = Service(the_lab, tmp_path, dry_run=False)
    port = lab_port()
    the_lab.listen(port, backlog=64)
    try:
        flood_from(the_lab, port, nets, each=700)
        eventually(lambda: set(banned_in_nft(the_lab)) == set(nets), "both bans")
        for name in ("h.db", "h.db-wal", "h.db-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        # seen within a second, said once: nothing is recorded until the restart
        service.wait_log("the history file is gone", timeout=5)
        service.stop()
        service.start()
        service.wait_probes(3)  # the start's reconcile, and three rounds after it
        assert set(banned_in_nft(the_lab)) == set(nets)
        log = service.log.read_text()
        assert "remove 2 expired or unknown" not in log
        # the deletion said once; the bans came back from what was read last (the spool's
        # view), else the reconcile keeps what the history does not know
        assert log.count("the history file is gone") == 1
        assert log.count("the history does not know") <= 1
    finally:
        if service.proc.poll() is None:
            service.stop()


@pytest.fixture
def cookies_off_lab(the_lab: Lab) -> Lab:
    the_lab.sysctl("net.ipv4.tcp_syncookies", 0)  # so raising them is seen
    return the_lab


def _mount(*argv: str) -> None:
    # the suite runs in a mount namespace of its own (scripts/test): nothing reaches the host
    sh("mount", *argv)


@pytest.mark.parametrize("outage", ["locked", "full", "read-only at start"])
def test_an_sqlite_history_that_cannot_be_written_never_holds_the_response_up(
        cookies_off_lab: Lab, tmp_path: Path, outage: str) -> None:
    """The SQLite history locked by another writer, its disk full, or its directory read-only
    when the service starts: a concentrated flood gets SYN cookies and its ban in the kernel
    within seconds all the same, the status says "acting, not recording", and when the history
    can be written again the spool goes to it: the incident and its ban, in the history."""
    the_lab = cookies_off_lab
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=4m" + (",ro" if outage.startswith("read") else ""),
           f"swt-{the_lab.tag}", str(disk))
    holder: subprocess.Popen[str] | None = None
    service: Service | None = None
    try:
        service = Service(the_lab, tmp_path, dry_run=False, storage=textwrap.dedent(f"""\
            url = "sqlite:///{disk}/h.db"
            state_dir = "{disk}"
            """))
        port = lab_port()
        the_lab.listen(port, backlog=64)
        if outage == "locked":
            holder = subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(f"""
                    import sqlite3, sys
                    db = sqlite3.connect({str(disk / "h.db")!r}, isolation_level=None)
                    db.execute("BEGIN EXCLUSIVE")
                    print("locked", flush=True)
                    sys.stdin.readline()
                    db.execute("COMMIT")
                """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        elif outage == "full":
            sh("sh", "-c", f"cat /dev/zero > {disk}/filler", check=False)  # until ENOSPC
        else:
            service.wait_log("acting, not recording until it can be written")
        service.wait_probes(2)
        flooded = time.monotonic()
        flood_from(the_lab, port, [FLOODED], each=800)
        eventually(lambda: int(the_lab.in_server(
            "sysctl", "-n", "net.ipv4.tcp_syncookies").stdout) == 1, "SYN cookies", timeout=15)
        cookies_after = time.monotonic() - flooded
        eventually(lambda: FLOODED in banned_in_nft(the_lab), "the ban", timeout=15)
        banned_after = time.monotonic() - flooded
        print(f"{outage}: cookies after {cookies_after:.1f} s, ban after {banned_after:.1f} s")
        assert cookies_after < 8 and banned_after < 8
        if outage == "locked":  # (on a full or read-only disk the status file is not written)
            # said once the write that met the lock has gone to the spool (its busy timeout
            # may still be running when the ban is in: the ban never waits for it)
            eventually(lambda: "acting, not recording" in synwatch(
                "status", "--config", str(service.config)).out, "the status saying so", 15)
        # the history can be written again
        if holder is not None:
            holder.communicate("go\n", timeout=10)
        elif outage == "full":
            (disk / "filler").unlink()
        else:
            _mount("-o", "remount,rw", str(disk))
        service.wait_log("recording directly again", timeout=30)
        bans = json.loads(synwatch("bans", "list", "--format", "json", "--config",
                                   str(service.config)).out)
        [incident] = service.incidents(port)
        assert incident["verdict"] == "concentrated"
        assert [(b["prefix"], b["incident_id"]) for b in bans] == [(FLOODED, incident["id"])]
        assert service.log.read_text().count("detection and actions go on") <= 1
        # the incident opened on a spooled id and closes after the history numbered it: the
        # close still finds what opened it, and SYN cookies go back as they were
        service.wait_incidents(port, 1, "closed")
        eventually(lambda: int(the_lab.in_server(
            "sysctl", "-n", "net.ipv4.tcp_syncookies").stdout) == 0, "SYN cookies put back",
            timeout=15)
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
        if service is not None and service.proc.poll() is None:
            service.stop()
        sh("umount", "-l", str(disk), check=False)
