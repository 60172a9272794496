"""Which container (and Kubernetes pod) owns a process: what names a network namespace for
people ("docker:web1", "k8s:default/nginx-7d9f", "podman:web") instead of an inode.

Only files are read, every path is a parameter: the process's /proc/PID/cgroup says which
runtime made its container and the container's id; the runtime's own metadata files
(ownersmeta.py) say its name and pod. A container stops at any moment: whatever cannot be read
is left "" and nothing here raises for a missing, unreadable or garbled file.

The cgroup paths of the runtimes (v1 lines "N:controllers:/path", the v2 line "0::/path"; the
systemd and the cgroupfs drivers), the innermost container component winning (a container in a
container, a kind node's pod):

- Docker: ``/system.slice/docker-<id>.scope``, ``/docker/<id>``; a pod's containers through
  cri-dockerd: ``.../kubepods-besteffort-pod<uid>.slice/docker-<id>.scope``.
- containerd: the CRI plugin's ``.../kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope``
  (under cgroup v1 also ``...slice:cri-containerd:<id>``, the unconverted systemd form some
  controllers show); nerdctl's ``/system.slice/nerdctl-<id>.scope``; without systemd containerd's
  default ``/<namespace>/<id>`` (``/default/<id>``, ``/k8s.io/<id>``).
- CRI-O: ``crio-<id>.scope``, cgroupfs ``crio-<id>``; never ``crio-conmon-<id>``, the monitor.
- podman: ``/machine.slice/libpod-<id>.scope`` (crun may add ``/container``), rootless
  ``/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-<id>.scope``, cgroupfs
  ``/libpod_parent/libpod-<id>``, quadlets' ``--cgroups=split`` ``<unit>/libpod-payload-<id>``;
  never ``libpod-conmon-<id>.scope``.
- A bare ``<id>`` (the kubelet's cgroupfs driver ``/kubepods/besteffort/pod<uid>/<id>``, a
  ``--cgroup-parent``) does not say the runtime: the metadata root that has the id does (Docker's,
  then containerd's, then containers/storage's), containerd when none does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from synwatch.system import ownersmeta
from synwatch.system.ownersmeta import Meta

DOCKER_DEFAULT_ROOT: Final = Path("/var/lib/docker")
_ID = "[0-9a-f]{64}"
_PREFIXES = {"docker": "docker", "cri-containerd": "containerd", "nerdctl": "containerd",
             "crio": "cri-o", "libpod": "podman", "libpod-payload": "podman"}
_SCOPE = re.compile(rf"(docker|cri-containerd|nerdctl|crio|libpod|libpod-payload)-({_ID})"
                    r"(?:\.scope)?")
_SYSTEMD_FORM = re.compile(rf"[^:]*:(docker|cri-containerd|nerdctl|crio|libpod):({_ID})")
_BARE = re.compile(_ID)


@dataclass(frozen=True, slots=True)
class Owner:
    runtime: str  # "docker" | "containerd" | "cri-o" | "podman"
    container_id: str  # full id as in the cgroup path
    name: str = ""  # the runtime's container name ("web1"), "" when unknown
    pod: str = ""  # Kubernetes pod name, "" when none
    pod_namespace: str = ""  # Kubernetes namespace, "" when none

    @property
    def label(self) -> str:
        """What people see: "k8s:<pod_namespace>/<pod>" when a pod is known, else
        "<runtime>:<name>", else "<runtime>:<container_id[:12]>"."""
        if self.pod:  # a pod whose namespace is not known (yet) is still the pod
            where = f"{self.pod_namespace}/" if self.pod_namespace else ""
            return f"k8s:{where}{self.pod}"
        return f"{self.runtime}:{self.name or self.container_id[:12]}"


@dataclass(frozen=True, slots=True)
class RuntimeRoots:
    docker: tuple[Path, ...] = ()  # data roots; () = found (docker_roots)
    containerd_tasks: Path = Path("/run/containerd/io.containerd.runtime.v2.task")
    containers_storage: tuple[Path, ...] = (Path("/run/containers/storage"),
                                            Path("/var/lib/containers/storage"))


def _paths(cgroup_text: str) -> list[str]:
    """The cgroup paths of /proc/PID/cgroup, the v2 line's first."""
    v2: list[str] = []
    v1: list[str] = []
    for line in cgroup_text.splitlines():
        hierarchy, sep, rest = line.partition(":")
        _, sep2, path = rest.partition(":")
        if sep and sep2:
            (v2 if hierarchy == "0" else v1).append(path)
    return v2 + v1


def _parse(cgroup_text: str) -> tuple[str, str, bool] | None:
    """(runtime, id, bare): bare when the path has the id alone, which names no runtime."""
    for path in _paths(cgroup_text):
        parts = path.split("/")
        for i in range(len(parts) - 1, -1, -1):
            part = parts[i]
            if found := _SCOPE.fullmatch(part) or _SYSTEMD_FORM.fullmatch(part):
                return _PREFIXES[found[1]], found[2], False
            if _BARE.fullmatch(part):
                if i > 0 and parts[i - 1] == "docker":
                    return "docker", part, False
                return "containerd", part, True
    return None


def container_in_cgroup(cgroup_text: str) -> tuple[str, str] | None:
    """(runtime, container id) from the text of /proc/PID/cgroup (cgroup v1 lines
    "N:controllers:/path" and v2 "0::/path"), or None for a process in no container."""
    found = _parse(cgroup_text)
    return (found[0], found[1]) if found else None


def _host(etc: Path, path: str) -> Path:
    """A path the host names, with its /etc read under ``etc`` (a test's fixture)."""
    place = Path(path)
    return etc.joinpath(*place.parts[2:]) if place.parts[:2] == ("/", "etc") else place


def _configured(config: Path) -> Path | None:
    settings = ownersmeta.read_json(config)
    if isinstance(settings, dict):
        for key in ("data-root", "graph"):  # "graph": before Docker 17.05
            value = settings.get(key)
            if isinstance(value, str) and value.startswith("/"):
                return Path(value)
    return None


def _rootless(proc: Path, pid: int) -> tuple[Path, Path] | None:
    """A rootless dockerd's default config file and data root, from its environment."""
    if ownersmeta.status(proc, pid, "Uid") in ("", "0"):
        return None
    data = ownersmeta.read_bytes(proc / str(pid) / "environ", 1 << 20) or b""
    env: dict[str, str] = {}
    for variable in data.decode(errors="replace").split("\0"):
        key, _, value = variable.partition("=")
        env.setdefault(key, value)
    home = env.get("HOME", "")
    config = env.get("XDG_CONFIG_HOME") or (home and f"{home}/.config")
    share = env.get("XDG_DATA_HOME") or (home and f"{home}/.local/share")
    if not (config.startswith("/") and share.startswith("/")):
        return None
    return Path(config, "docker", "daemon.json"), Path(share, "docker")


def _pids(proc: Path) -> list[int]:
    try:
        return sorted(int(p.name) for p in proc.iterdir() if p.name.isascii() and p.name.isdigit())
    except (OSError, ValueError):
        return []


def docker_roots(proc: Path = Path("/proc"), etc: Path = Path("/etc")) -> tuple[Path, ...]:
    """Docker data roots of this host: each running dockerd's --data-root (or the old -g/--graph)
    from /proc/PID/cmdline, else data-root in etc/docker/daemon.json, else /var/lib/docker.
    A dockerd started with --config-file reads that file instead; a rootless one (not uid 0)
    ~/.config/docker/daemon.json, else ~/.local/share/docker (XDG_CONFIG_HOME, XDG_DATA_HOME)."""
    found: list[Path] = []
    daemons = 0
    for pid in _pids(proc):
        comm = ownersmeta.read_bytes(proc / str(pid) / "comm", 64)
        if comm is not None and comm.strip() != b"dockerd":
            continue
        args = ownersmeta.argv(proc, pid)
        if not args or Path(args[0]).name != "dockerd":
            continue
        daemons += 1
        flag = ownersmeta.option(args, "--data-root", "--graph", "-g")
        config = ownersmeta.option(args, "--config-file")
        rootless = _rootless(proc, pid)
        if flag.startswith("/"):
            root = Path(flag)
        elif config.startswith("/"):
            root = _configured(_host(etc, config)) or DOCKER_DEFAULT_ROOT
        elif rootless:
            root = _configured(rootless[0]) or rootless[1]
        else:
            root = _configured(etc / "docker" / "daemon.json") or DOCKER_DEFAULT_ROOT
        if root not in found:
            found.append(root)
    if not daemons:
        found.append(_configured(etc / "docker" / "daemon.json") or DOCKER_DEFAULT_ROOT)
    return tuple(found)


def _podman(proc: Path, pid: int, cid: str, roots: RuntimeRoots) -> Meta:
    """A podman container's name: from the storage roots, else from the storage its conmon's
    bundle is in (a rootless container's, under the user's home), else from conmon's -n."""
    meta = ownersmeta.storage(roots.containers_storage, cid) or Meta()
    if meta.name:
        return meta
    watcher = ownersmeta.conmon(proc, pid, cid)
    if watcher is None:
        return meta
    name, bundle = watcher
    root = ownersmeta.storage_root(bundle, cid) if bundle else None
    if root is not None and root not in roots.containers_storage:
        meta = ownersmeta.storage([root], cid) or meta
    return meta._replace(name=meta.name or name)


def _two_parts(cgroup_text: str, tasks: Path) -> tuple[str, str] | None:
    """containerd's own default cgroup, /<namespace>/<id>, for an id that is not 64 hex digits
    (``ctr run image redis``): only when containerd has a task bundle of that name."""
    for path in _paths(cgroup_text):
        parts = path.split("/")
        if (len(parts) == 3 and not parts[0] and all(p not in ("", ".", "..") for p in parts[1:])
                and ownersmeta.is_dir(tasks / parts[1] / parts[2])):
            return parts[1], parts[2]
    return None


def owner_of(pid: int, proc: Path = Path("/proc"), roots: RuntimeRoots | None = None
             ) -> Owner | None:
    """The container owning ``pid`` and what its runtime's metadata says of it; None when the
    process is in no container or is gone. Never raises on missing/unreadable/garbled files
    (a container stops at any moment): what cannot be read is left "" in the Owner."""
    if pid <= 0:
        return None
    data = ownersmeta.read_bytes(proc / str(pid) / "cgroup", 1 << 20)
    if data is None:
        return None
    cgroup_text = data.decode(errors="replace")
    roots = roots or RuntimeRoots()
    found = _parse(cgroup_text)
    if found is None:
        task = _two_parts(cgroup_text, roots.containerd_tasks)
        if task is None:
            return None
        said = ownersmeta.containerd(roots.containerd_tasks, task[1], task[0]) or Meta()
        return Owner("containerd", task[1], said.name, said.pod, said.pod_namespace)
    runtime, cid, bare = found
    docker = roots.docker or (docker_roots(proc) if runtime == "docker" or bare else ())
    meta: Meta | None = None
    if bare:
        if (meta := ownersmeta.docker(docker, cid)) is not None:
            runtime = "docker"
        elif (meta := ownersmeta.containerd(roots.containerd_tasks, cid)) is not None:
            runtime = "containerd"
        elif (meta := ownersmeta.storage(roots.containers_storage, cid)) is not None:
            runtime = "podman" if meta.manager == "libpod" else "cri-o"
    elif runtime == "docker":
        meta = ownersmeta.docker(docker, cid)
    elif runtime == "containerd":
        meta = ownersmeta.containerd(roots.containerd_tasks, cid)
    elif runtime == "cri-o":
        meta = ownersmeta.storage(roots.containers_storage, cid)
    else:
        meta = _podman(proc, pid, cid, roots)
    meta = meta or Meta()
    return Owner(runtime, cid, meta.name, meta.pod, meta.pod_namespace)
