from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from synwatch.lines.catalogue import Catalogue, load_catalogue
from tests.lab import LAB_NAMESPACES, lab_namespaces
from tests.pgcluster import Cluster

if TYPE_CHECKING:
    from tests.lab import Lab

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
# The fixed "now" of pure tests: syslog dates have no year, so it decides the year.
NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="session")
def catalogue() -> Catalogue:
    return load_catalogue()


@dataclass
class Result:
    code: int
    out: str
    err: str


def synwatch(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
             timeout: float = 60) -> Result:
    """Run the installed CLI as a user would, in a child process."""
    full_env = {**os.environ, "TZ": "UTC", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "synwatch", *args], capture_output=True,
                          text=True, env=full_env, input=stdin, timeout=timeout, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def _host_state() -> dict[str, object]:
    """What synwatch or its lab could change on the host itself: its nftables table, the cookies
    mode, network namespaces, the per-namespace /etc and the firewall tools' lock files."""
    table = (os.geteuid() == 0 and shutil.which("nft") is not None
             and subprocess.run(["nft", "list", "table", "inet", "synwatch"],
                                capture_output=True, check=False).returncode == 0)

    def names(folder: str) -> list[str]:
        return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).is_dir() else []

    # the lab tests' own namespaces (swt-, swtry-) come and go in the other process of a split
    # run (tests/runner.py) while this one looks: whether any is left is looked at once all
    # are done; the firewall tools' lock files likewise belong to the kernel tests' process
    state: dict[str, object] = {
        "nft table inet synwatch": table,
        "tcp_syncookies": Path("/proc/sys/net/ipv4/tcp_syncookies").read_text().strip(),
        "/run/netns": [n for n in names("/run/netns") if not n.startswith(LAB_NAMESPACES)],
        "/etc/netns": Path("/etc/netns").exists(),
        "/etc/netns/*": [n for n in names("/etc/netns") if not n.startswith(LAB_NAMESPACES)],
        "/run/ufw.lock": Path("/run/ufw.lock").exists(),
        "/var/lib/synwatch": Path("/var/lib/synwatch").exists(),
        "/run/xtables.lock": Path("/run/xtables.lock").exists()}
    if os.environ.get("SYNWATCH_SUITE_PART") == "rest":
        for kernel_tests_own in ("/etc/netns", "/run/ufw.lock", "/run/xtables.lock"):
            del state[kernel_tests_own]
    return state


@pytest.fixture(scope="session", autouse=True)
def host_untouched() -> Iterator[None]:
    """Tests act only inside the namespaces they create: the host's firewall and sysctls are
    as they were when the run began."""
    before = _host_state()
    yield
    after = _host_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"the tests changed the host: {changed}"


@pytest.fixture
def store_config(tmp_path: Path) -> Path:
    """A config file whose store is an SQLite file in tmp_path."""
    path = tmp_path / "synwatch.toml"
    path.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/history.db"\n')
    return path


JOURNALD = "/lib/systemd/systemd-journald"


@pytest.fixture(scope="session")
def journald() -> Iterator[Journald]:
    """A running journald: the machine's own if it has one, else one started for the tests."""
    jd = Journald()
    if not jd.alive():
        jd.start()
    yield jd
    jd.stop_if_ours()


class Journald:
    socket_path = "/run/systemd/journal/socket"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        from synwatch.sources.journald import journald_alive

        return journald_alive(self.socket_path)

    def start(self) -> None:
        import time

        Path("/run/systemd/journal").mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([JOURNALD], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.alive():
            assert time.monotonic() < deadline, "journald did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        import time

        assert self.proc is not None, "only a journald the tests started can be stopped"
        self.proc.terminate()
        self.proc.wait(10)
        deadline = time.monotonic() + 10
        while self.alive():
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def stop_if_ours(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def cli_commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every command the CLI takes, as "incidents show"."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = cli_commands(sub, f"{prefix}{name} ")
                out.extend(nested or [f"{prefix}{name}"])
    return out


@pytest.fixture
def tracked() -> Iterator[Lab]:
    """A lab whose server namespace tracks connections (a `ct state` rule, as ufw, firewalld
    or Docker have)."""
    from tests.lab import lab

    with lab() as made:
        made.track_connections()
        yield made


@pytest.fixture(scope="session")
def pg() -> Iterator[Cluster]:
    """A real PostgreSQL server for the whole session (tests/pgcluster.py)."""
    cluster = Cluster().init()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(pg: Cluster) -> str:
    """A new empty database of it: its SQLAlchemy URL."""
    if not pg.running:  # a test that stopped the server hands it back started
        pg.start()
    return pg.new_database()


def pytest_itemcollected(item: pytest.Item) -> None:
    """``kernel``: the tests that make namespaces and send floods, or need the journald the
    suite starts (its socket is one); tests/runner.py runs them one after the other in one
    process and the rest beside them in another."""
    shared = {"the_lab", "tracked", "journald"}  # a lab; the one journald socket of /run
    if item.get_closest_marker("needs_root") or shared & set(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.kernel)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No lab namespace is left (in a split run tests/runner.py looks once both are done)."""
    del exitstatus
    if os.environ.get("SYNWATCH_SUITE_PART"):
        return
    left = lab_namespaces()
    if left:
        sys.stderr.write(f"\nthe tests left network namespaces behind: {left}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
