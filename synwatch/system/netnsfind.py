"""Every network namespace of the host, each once (by the inode of its nsfs file), with a name
for people: the container or pod that owns it, else its `ip netns` name, else a process in it.

A namespace is found where the kernel shows it: `/run/netns/NAME` (what `ip netns add` mounts)
and `/proc/PID/ns/net` of every process (a container's processes; Docker and containerd keep
theirs under their own run directories, not in /run/netns). Our own namespace is "" as in
``watch.netns`` ("" = our own). Nothing here holds a namespace open: what is found is a path
and the inode it had, checked again on every entry (synwatch.system.netns.bind).
See namespaces(7) and network_namespaces(7) for the nsfs files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from synwatch.system.netns import NETNS_DIR, NsId
from synwatch.system.owners import Owner, RuntimeRoots, docker_roots, owner_of

OWNER_LOOKUPS = 8  # processes asked for an owner per namespace: a container's are all its own


@dataclass(frozen=True, slots=True)
class FoundNamespace:
    ident: NsId
    name: str  # "" (ours), "docker:web1", "k8s:default/web-7d9f", an `ip netns` name, ...
    path: Path  # how to enter it: /run/netns/NAME or /proc/PID/ns/net
    kind: str  # "own" | "container" | "netns" | "process"
    owner: Owner | None = None
    pid: int | None = None  # a process in it (its /proc/PID/net files are the namespace's)

    @property
    def container(self) -> bool:
        return self.owner is not None


def ident_text(ident: NsId) -> str:
    """A namespace's identity as the history keeps it (an incident's, a bridge path's): this
    boot's (an inode is reused after a reboot), its nsfs device and inode."""
    return f"{_BOOT}:{ident[0]}:{ident[1]}"


try:
    _BOOT = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
except OSError:
    _BOOT = "?"


def _ident(path: Path) -> NsId | None:
    try:
        st = path.stat()
    except OSError:  # gone, or not ours to see
        return None
    return st.st_dev, st.st_ino


def _comm(proc: Path, pid: int) -> str:
    """The process's name as a name may hold it (a comm may hold spaces and quotes)."""
    try:
        comm = (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return "?"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", comm) or "?"


def _processes(proc: Path) -> dict[NsId, list[int]]:
    """The processes of each namespace, lowest pid first (usually the one that made it). Plain
    strings and os.stat: this runs over every process every few seconds."""
    found: dict[NsId, list[int]] = {}
    root = str(proc)
    try:
        entries = sorted(int(e.name) for e in os.scandir(root) if e.name.isdigit())
    except OSError:
        return found
    for pid in entries:
        try:
            st = os.stat(f"{root}/{pid}/ns/net")  # noqa: PTH116 - pathlib costs 3x here
        except OSError:  # gone, or not ours to see
            continue
        found.setdefault((st.st_dev, st.st_ino), []).append(pid)
    return found


def find_namespaces(proc: Path = Path("/proc"), netns_dir: Path = NETNS_DIR,
                    roots: RuntimeRoots | None = None,
                    known: Mapping[NsId, FoundNamespace] | None = None) -> list[FoundNamespace]:
    """Every namespace there is now, ours first, then by name. ``known``: namespaces found
    before, kept as they were (a namespace's owner does not change; asking again would read
    every runtime's files at every look)."""
    known = known or {}
    own = _ident(proc / "self" / "ns" / "net")
    named: dict[NsId, str] = {}
    try:
        entries = sorted(p.name for p in netns_dir.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        ident = _ident(netns_dir / entry)
        if ident is not None and ident != own:
            named.setdefault(ident, entry)
    found: list[FoundNamespace] = []
    if own is not None:
        found.append(FoundNamespace(own, "", proc / "self" / "ns" / "net", "own", pid=None))
    groups = {ident: pids for ident, pids in _processes(proc).items() if ident != own}
    # the names of namespaces still there are theirs: a new one never takes one of them
    taken = {""} | {known[i].name for i in (groups.keys() | named.keys()) if i in known}
    for ident, pids in groups.items():
        before = known.get(ident)
        # a container's first process gone: its inode may be another container's now (the
        # kernel hands out the lowest free one), so its owner is asked again
        if before is not None and not _pinned_early(before) and not (
                before.kind == "container" and before.pid not in pids):
            named.pop(ident, None)
            found.append(_current(before, pids, proc))
            continue
        if roots is None:  # read once, and only when a new namespace needs it
            roots = RuntimeRoots(docker=docker_roots(proc))
        owned = next(((p, o) for p, o in ((p, owner_of(p, proc, roots))
                                          for p in pids[:OWNER_LOOKUPS]) if o is not None),
                     None)
        pid = pids[0]
        if owned is not None:
            pid, owner = owned
            item = FoundNamespace(ident, owner.label, proc / str(pid) / "ns" / "net",
                                  "container", owner, pid)
        elif before is not None:  # still no owner: as it was
            item = _current(before, pids, proc)
        elif ident in named:
            item = FoundNamespace(ident, named[ident], netns_dir / named[ident], "netns",
                                  pid=pid)
        else:
            item = FoundNamespace(ident, f"process:{_comm(proc, pid)}:{pid}",
                                  proc / str(pid) / "ns" / "net", "process", pid=pid)
        named.pop(ident, None)
        if before is not None and item.name == before.name:
            found.append(item)
        else:
            found.append(_unique(item, taken))
    for ident, name in named.items():  # named namespaces no process is in
        found.append(replace(known[ident], pid=None) if ident in known else
                     _unique(FoundNamespace(ident, name, netns_dir / name, "netns"), taken))
    return [found[0], *sorted(found[1:], key=lambda f: f.name)] if own is not None else \
        sorted(found, key=lambda f: f.name)


def _pinned_early(before: FoundNamespace) -> bool:
    """A pod's namespace is pinned in /run/netns (cni-UUID) by its runtime before its first
    process starts: found in that window, it is looked at again until an owner shows."""
    return before.kind == "netns" and before.owner is None and before.name.startswith("cni-")


def _current(before: FoundNamespace, pids: list[int], proc: Path) -> FoundNamespace:
    """A namespace found before, with a process of its own now: the one it was entered by
    may have ended while others keep it (a /proc path of a pid reused elsewhere would be
    another namespace's)."""
    if before.pid is None and before.kind in ("own", "netns") and pids:
        return replace(before, pid=pids[0])
    if before.pid in pids or before.pid is None:
        return before
    pid = pids[0]
    return replace(before, pid=pid, path=(before.path if before.kind == "netns"
                                          else proc / str(pid) / "ns" / "net"))


def _unique(item: FoundNamespace, taken: set[str]) -> FoundNamespace:
    """Two namespaces never share a name (two containers of one name under two runtimes'
    users): the second gets its inode."""
    name = item.name
    if name in taken:
        name = f"{name}#{item.ident[1]}"
    taken.add(name)
    return item if name == item.name else FoundNamespace(item.ident, name, item.path,
                                                         item.kind, item.owner, item.pid)
