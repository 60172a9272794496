"""Running a function inside a named network namespace (`ip netns` names).

Python 3.11 has no os.setns, so libc's is called through ctypes. setns() moves only the calling
thread, so the work runs on a short-lived thread of its own: the rest of synwatch never leaves
its namespace. Sockets created and /proc/thread-self/net files opened in there stay bound to it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from synwatch.errors import ProbeError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def exists(name: str, netns_dir: Path = NETNS_DIR) -> bool:
    """Is there an `ip netns` namespace of that name ("" is our own: always)?"""
    return not name or (netns_dir / name).exists()


def in_netns(name: str, func: Callable[[], T], netns_dir: Path = NETNS_DIR) -> T:
    """``func()`` run in network namespace ``name``; "" runs it right here."""
    if not name:
        return func()
    path = netns_dir / name
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ProbeError(f"netns {name}", f"cannot open {path}: {exc.strerror}") from exc
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            _setns(target)
        except OSError as exc:
            failure.append(ProbeError(f"netns {name}", f"cannot enter: {exc.strerror} "
                                                       "(needs CAP_SYS_ADMIN)"))
            return
        try:
            result.append(func())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    try:
        thread = threading.Thread(target=run, name=f"netns {name}")
        thread.start()
        thread.join()
    finally:
        os.close(target)
    if failure:
        raise failure[0]
    return result[0]
