"""Calls into a named network namespace run on long-lived workers that entered it once: no thread
per call, never a call in another namespace, nothing left behind when the namespace goes."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from synwatch.errors import ProbeError
from synwatch.system import netns
from synwatch.system.netns import WORKERS_PER_NETNS, in_netns
from tests.support.lab import sh
from tests.support.wait import eventually


def _tasks() -> set[int]:
    return {int(t) for t in (t.name for t in Path("/proc/self/task").iterdir())}


def _ns_of(tid: int) -> int | None:
    try:
        return Path(f"/proc/self/task/{tid}/ns/net").stat().st_ino
    except FileNotFoundError:  # it just ended
        return None


def _inode(name: str) -> int:
    return (netns.NETNS_DIR / name).stat().st_ino


def _where() -> tuple[int, int]:
    """The calling thread's id and the inode of its network namespace."""
    return threading.get_native_id(), Path("/proc/thread-self/ns/net").stat().st_ino


@pytest.fixture
def named() -> Iterator[str]:
    name = f"swt-{uuid.uuid4().hex[:6]}-n"
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)
        # the workers let go of the namespace at the next call or after their idle time
        in_netns_quietly(name)


def in_netns_quietly(name: str) -> None:
    with contextlib.suppress(ProbeError):
        in_netns(name, lambda: None)


@pytest.mark.needs_root
def test_many_calls_no_new_thread(named: str) -> None:
    in_netns(named, _where)
    before = _tasks()
    seen = [in_netns(named, _where) for _ in range(300)]
    assert _tasks() == before, "no thread started or left behind by 300 calls"
    # every call ran inside the namespace, on the pool's few threads (a thread per call: 300)
    assert {ino for _, ino in seen} == {_inode(named)}
    assert len({tid for tid, _ in seen}) <= WORKERS_PER_NETNS
    assert netns.workers()[named] <= WORKERS_PER_NETNS
    assert {tid for tid, _ in seen} <= before
    assert _where()[1] != _inode(named), "the calling thread never left its own namespace"


@pytest.mark.needs_root
def test_calls_from_many_threads_share_the_pool(named: str) -> None:
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def caller() -> None:
        for _ in range(50):
            got = in_netns(named, _where)
            with lock:
                seen.append(got)

    callers = [threading.Thread(target=caller) for _ in range(6)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert len(seen) == 300
    assert {ino for _, ino in seen} == {_inode(named)}
    assert len({tid for tid, _ in seen}) <= WORKERS_PER_NETNS


@pytest.mark.needs_root
def test_errors_surface_as_before(named: str, tmp_path: Path) -> None:
    def fails() -> None:
        raise ValueError("from inside")

    with pytest.raises(ValueError, match="from inside"):
        in_netns(named, fails)
    assert in_netns(named, lambda: 42) == 42  # the worker survives its call's exception
    # a call that asks for its own namespace again runs at once (no deadlock on its worker)
    assert in_netns(named, lambda: in_netns(named, _where))[1] == _inode(named)
    with pytest.raises(ProbeError, match="cannot open"):
        in_netns("swt-no-such-namespace", lambda: None)
    # a file that is not a network namespace: entering it fails, no worker stays
    (tmp_path / "plain").write_text("")
    with pytest.raises(ProbeError, match="cannot enter"):
        in_netns("plain", lambda: None, netns_dir=tmp_path)
    assert "plain" not in netns.workers()
    assert in_netns("", _where)[0] == threading.get_native_id()  # our own: right here


@pytest.mark.needs_root
def test_namespace_gone_and_back_leaves_nothing(named: str) -> None:
    baseline = _tasks()
    first = _inode(named)
    in_netns(named, _where)
    workers = _tasks() - baseline
    assert 1 <= len(workers) <= WORKERS_PER_NETNS
    sh("ip", "netns", "del", named)
    with pytest.raises(ProbeError, match="cannot open"):
        in_netns(named, _where)
    # its workers exit: no thread of ours holds the deleted namespace alive
    eventually(lambda: _tasks() == baseline, "the threads back to the baseline", 10, every=0.02)
    assert all(_ns_of(t) != first for t in _tasks())
    assert named not in netns.workers()
    sh("ip", "netns", "add", named)
    second = _inode(named)
    seen = {in_netns(named, _where) for _ in range(50)}
    assert {ino for _, ino in seen} == {second}
    old = _tasks() - baseline
    assert 1 <= len(old) <= WORKERS_PER_NETNS
    # recreated between two calls (never seen missing): the old workers go, new ones serve
    sh("ip", "netns", "del", named)
    sh("ip", "netns", "add", named)
    third = _inode(named)
    assert third != second  # the old namespace is still held by its workers here
    assert {in_netns(named, _where)[1] for _ in range(20)} == {third}
    eventually(lambda: not old & _tasks(), "the old threads gone", 10, every=0.02)
    assert all(_ns_of(t) != second for t in _tasks())
    assert len(_tasks() - baseline) <= WORKERS_PER_NETNS
