"""Running a function inside a named network namespace (`ip netns` names, and names
synwatch gives the namespaces of containers and processes, bound to a /proc path by ``bind``).

Python 3.11 has no os.setns, so libc's is called through ctypes. setns() moves only the calling
thread (on the main thread it would move every later socket and /proc/thread-self/net read of
the service), so the work runs on worker threads that enter the namespace once, when they
start, and then take calls from a queue: a probe every second costs no new thread (a thread per
call ran into systemd's TasksMax under load and stopped the service with "can't start new
thread"). Sockets created and /proc/thread-self/net files opened in there stay bound to it.

The pool is fixed and small: at most WORKERS_PER_NETNS threads per namespace (a probe need not
wait behind a slow action's connect), MAX_NAMESPACES namespaces (the least recently used is let
go), and a worker idle for IDLE_SECONDS exits. A worker serves one namespace only, the one the
name named when it started (device and inode of the nsfs file): when the name goes away the
next call fails as before and the workers exit (they no longer hold the old namespace alive),
and when it names a new namespace the old workers are let go and new ones enter the new one.

Watching every namespace of a host (``watch.netns = "*"``: a container each) would churn that
pool, so ``visit`` runs short calls (a probe) on the calling thread, which enters the namespace
and comes home: 200 namespaces cost no thread at all.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from synwatch.errors import ProbeError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
WORKERS_PER_NETNS: Final = 2
MAX_NAMESPACES: Final = 4
IDLE_SECONDS: Final = 60.0

NsId = tuple[int, int]  # (st_dev, st_ino) of the namespace's nsfs file


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def exists(name: str, netns_dir: Path = NETNS_DIR) -> bool:
    """Is there a namespace of that name ("" is our own: always)?"""
    if not name:
        return True
    with _lock:
        bound = _bound.get(name)
    if bound is None:
        return (netns_dir / name).exists()
    try:
        st = bound[0].stat()
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == bound[1]


def bind(name: str, path: Path, ident: NsId) -> None:
    """Let ``name`` (a container's, a process's) mean the namespace at ``path`` while it is the
    one of ``ident``: a /proc/PID/ns/net path outlives nothing (a reused PID is another
    namespace, and the ident check says so), and holds no namespace alive."""
    with _lock:
        _bound[name] = (path, ident)


def unbind(name: str, ident: NsId | None = None) -> None:
    """Forget ``name`` (only while it still means ``ident``, when given: a container that came
    back under its name is bound to its new namespace already)."""
    with _lock:
        if ident is None or (name in _bound and _bound[name][1] == ident):
            _bound.pop(name, None)


def bound() -> dict[str, Path]:
    with _lock:
        return {name: path for name, (path, _) in _bound.items()}


def _path_of(name: str, netns_dir: Path) -> tuple[Path, NsId | None]:
    with _lock:
        found = _bound.get(name)
    return found if found is not None else (netns_dir / name, None)


@dataclass
class _Call:
    func: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Any] = field(default_factory=list)
    failure: list[BaseException] = field(default_factory=list)


@dataclass
class _Namespace:
    """The workers of one namespace, and the calls queued for them (None: one worker exits)."""

    name: str
    ident: NsId
    calls: queue.SimpleQueue[_Call | None] = field(default_factory=queue.SimpleQueue)
    workers: int = 0
    idle: int = 0
    queued: int = 0


_lock = threading.Lock()
_bound: dict[str, tuple[Path, NsId]] = {}  # a name synwatch gave -> /proc/PID/ns/net, its ident
_pool: OrderedDict[str, _Namespace] = OrderedDict()  # least recently used first
_here = threading.local()  # on a worker: the NsId it is in


def _retire(ns: _Namespace) -> None:
    """Let a namespace's workers go (after the calls already queued); with the lock held."""
    if _pool.get(ns.name) is ns:
        del _pool[ns.name]
    for _ in range(ns.workers):
        ns.calls.put(None)


def _enter(ns: _Namespace, target: int) -> None:
    """Move this thread into ``target``, and check that it is ``ns``'s namespace."""
    try:
        _setns(target)
    except OSError as exc:
        raise ProbeError(f"netns {ns.name}", f"cannot enter: {exc.strerror} "
                                             "(needs CAP_SYS_ADMIN)") from exc
    here = Path("/proc/thread-self/ns/net").stat()
    if (here.st_dev, here.st_ino) != ns.ident:
        raise ProbeError(f"netns {ns.name}", "the thread is not in the namespace it entered")


def _serve(ns: _Namespace, target: int, entered: _Call) -> None:
    try:
        _enter(ns, target)
    except (OSError, ProbeError) as exc:
        entered.failure.append(exc if isinstance(exc, ProbeError) else ProbeError(
            f"netns {ns.name}", f"cannot enter: {exc.strerror}"))
        entered.done.set()
        return
    _here.ident = ns.ident
    entered.done.set()
    while True:
        try:
            call = ns.calls.get(timeout=IDLE_SECONDS)
        except queue.Empty:
            with _lock:
                if ns.queued == 0:  # callers queue with the lock held: none is waiting
                    ns.workers -= 1
                    ns.idle -= 1
                    if ns.workers == 0 and _pool.get(ns.name) is ns:
                        del _pool[ns.name]
                    return
            continue
        with _lock:
            if call is None:
                ns.workers -= 1
                ns.idle -= 1
                return
            ns.queued -= 1
            ns.idle -= 1
        try:
            call.result.append(call.func())
        except BaseException as exc:  # handed to the caller's thread
            call.failure.append(exc)
        finally:
            with _lock:  # idle again before the caller goes on: its next call needs no worker
                ns.idle += 1
            call.done.set()


def _start_worker(ns: _Namespace, target: int) -> None:
    """A new worker for ``ns``, in it when this returns; with the lock held."""
    entered = _Call(lambda: None)
    thread = threading.Thread(target=_serve, args=(ns, target, entered),
                              name=f"netns {ns.name}", daemon=True)
    thread.start()
    entered.done.wait()
    if entered.failure:
        raise entered.failure[0]
    ns.workers += 1
    ns.idle += 1


def in_netns(name: str, func: Callable[[], T], netns_dir: Path = NETNS_DIR) -> T:
    """``func()`` run in network namespace ``name``; "" runs it right here."""
    if not name:
        return func()
    try:
        target = _open_checked(name, netns_dir)
    except ProbeError:
        with _lock:  # gone: its workers must not keep the old namespace alive
            gone = _pool.get(name)
            if gone is not None:
                _retire(gone)
        raise
    try:
        st = os.fstat(target)
        ident = (st.st_dev, st.st_ino)
        if getattr(_here, "ident", None) == ident:
            return func()  # already in it: a worker's function asking for its own namespace
        call = _Call(func)
        with _lock:
            ns = _pool.get(name)
            if ns is not None and ns.ident != ident:  # the name now means another namespace
                _retire(ns)
                ns = None
            if ns is None:
                ns = _pool[name] = _Namespace(name, ident)
                while len(_pool) > MAX_NAMESPACES:
                    _retire(next(iter(_pool.values())))
            _pool.move_to_end(name)
            if ns.idle <= ns.queued and ns.workers < WORKERS_PER_NETNS:
                try:
                    _start_worker(ns, target)
                except ProbeError:
                    if ns.workers == 0:  # none to queue for
                        del _pool[name]
                        raise
            ns.queued += 1
            ns.calls.put(call)
    finally:
        os.close(target)
    call.done.wait()
    if call.failure:
        raise call.failure[0]
    result: T = call.result[0]
    return result


def workers() -> dict[str, int]:
    """Worker threads per namespace name (for tests and the status line)."""
    with _lock:
        return {ns.name: ns.workers for ns in _pool.values()}


def visit(name: str, func: Callable[[], T], netns_dir: Path = NETNS_DIR) -> T:
    """``func()`` run in namespace ``name`` on the calling thread, which comes home after it (for
    short calls: a probe); "" runs it right here. Two setns() calls cost microseconds where a
    hand-over to a worker costs a few hundred, and a thread that came home holds no namespace
    alive that its owner let go (a stopped container's). ``func`` must not block: nothing
    else runs on this thread meanwhile. A thread that cannot come home is a fatal error (it
    would act in a container's namespace): NotHome, which nothing catches."""
    if not name:
        return func()
    target = _open_checked(name, netns_dir)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        os.close(target)
        raise ProbeError(f"netns {name}", f"cannot open our own: {exc.strerror}") from exc
    try:
        try:
            _setns(target)
        except OSError as exc:
            raise ProbeError(f"netns {name}", f"cannot enter: {exc.strerror} "
                                              "(needs CAP_SYS_ADMIN)") from exc
        try:
            return func()
        finally:
            try:
                _setns(home)
            except OSError as exc:
                raise NotHome(f"cannot return from netns {name}: {exc.strerror}") from exc
    finally:
        os.close(home)
        os.close(target)


class NotHome(BaseException):
    """A thread left in another namespace: the process must end (systemd restarts it)."""


def _open_checked(name: str, netns_dir: Path = NETNS_DIR) -> int:
    """An fd of namespace ``name``'s nsfs file, checked to be the namespace the name was
    bound to (a reused PID's /proc path is another namespace's)."""
    path, expected = _path_of(name, netns_dir)
    return open_nsfs(name, path, expected)


def open_nsfs(name: str, path: Path, expected: NsId | None) -> int:
    """An fd of the nsfs file at ``path``, checked to be namespace ``expected`` (when given);
    a ProbeError naming ``name`` when it cannot be opened or is another namespace now."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ProbeError(f"netns {name}", f"cannot open {path}: {exc.strerror}") from exc
    st = os.fstat(fd)
    if expected is not None and (st.st_dev, st.st_ino) != expected:
        os.close(fd)
        raise ProbeError(f"netns {name}", f"gone ({path} is another namespace now)")
    return fd


def bound_fd(name: str, netns_dir: Path = NETNS_DIR) -> int | None:
    """For a command run in namespace ``name`` (synwatch.system.runner): where the name is a
    container's or a process's (``bind``), an fd of it, checked, to hand to ``nsenter
    --net=/proc/self/fd/N``, so what runs is in the namespace that was checked, not in whatever
    the path means by then (ProbeError when it is not that namespace any more); None for our
    own and an `ip netns` name (`ip netns exec` enters those)."""
    with _lock:
        bound = name in _bound
    return _open_checked(name, netns_dir) if bound else None
