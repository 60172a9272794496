"""Fixtures and collection hooks only; what tests share is in tests/support."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from synwatch.lines.catalogue import Catalogue, load_catalogue
from tests.support.host import host_state
from tests.support.journald import Journald
from tests.support.lab import lab_namespaces
from tests.support.pgcluster import Cluster

if TYPE_CHECKING:
    from tests.support.lab import Lab


@pytest.fixture(scope="session")
def catalogue() -> Catalogue:
    return load_catalogue()


@pytest.fixture(scope="session", autouse=True)
def host_untouched() -> Iterator[None]:
    """Tests act only inside the namespaces they create: the host's firewall and sysctls are
    as they were when the run began."""
    before = host_state()
    yield
    after = host_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"the tests changed the host: {changed}"


@pytest.fixture
def store_config(tmp_path: Path) -> Path:
    """A config file whose store is an SQLite file in tmp_path."""
    path = tmp_path / "synwatch.toml"
    path.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/history.db"\n')
    return path


@pytest.fixture(scope="session")
def journald() -> Iterator[Journald]:
    """A running journald: the machine's own if it has one, else one started for the tests."""
    jd = Journald()
    if not jd.alive():
        jd.start()
    yield jd
    jd.stop_if_ours()


@pytest.fixture
def tracked() -> Iterator[Lab]:
    """A lab whose server namespace tracks connections (a `ct state` rule, as ufw, firewalld
    or Docker have)."""
    from tests.support.lab import lab

    with lab() as made:
        made.track_connections()
        yield made


@pytest.fixture(scope="session")
def pg() -> Iterator[Cluster]:
    """A real PostgreSQL server for the whole session (tests/support/pgcluster.py)."""
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
    used = set(getattr(item, "fixturenames", ()))
    shared = {"the_lab", "tracked", "journald"}  # a lab; the one journald socket of /run
    if item.get_closest_marker("needs_root") or shared & used:
        item.add_marker(pytest.mark.kernel)
    # what else a test needs, by the fixtures it takes: `-m "not needs_postgres"` and the
    # like on a machine without them
    if {"pg", "pg_url"} & used or any(f.startswith("the_lab_pg") for f in used):
        item.add_marker(pytest.mark.needs_postgres)
    if "journald" in used:
        item.add_marker(pytest.mark.needs_journald)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No lab namespace is left (in a split run tests/runner.py looks once both are done)."""
    del exitstatus
    if os.environ.get("SYNWATCH_SUITE_PART"):
        return
    left = lab_namespaces()
    if left:
        sys.stderr.write(f"\nthe tests left network namespaces behind: {left}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
