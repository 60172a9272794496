"""What the container runtimes' own files say of a container (owners.py asks): its name and its
Kubernetes pod. Only reads; whatever is missing, unreadable or garbled counts as not said.

- Docker: ``<data root>/containers/<id>/config.v2.json``, the top-level ``"Name": "/web1"`` and
  the ``Config.Labels`` cri-dockerd gives a pod's containers (``io.kubernetes.pod.name``, ...).
- containerd: the task bundle ``<tasks>/<namespace>/<id>/config.json`` (the OCI spec), whose
  annotations the CRI plugin writes (``io.kubernetes.cri.sandbox-name``, ...; containerd's
  internal/cri/annotations) and nerdctl copies its labels into (``nerdctl/name``).
- CRI-O and podman (containers/storage): ``<root>/overlay-containers/<id>/userdata/config.json``,
  the OCI spec (CRI-O saves it under its run root, the bundle, and its graph root; podman under
  its graph root, the container's StaticDir, or its run root with a transient store). CRI-O's
  annotations name the pod (the kubelet's labels are among them), podman's name nothing: its
  container's name is in the storage's own list of containers, ``containers.json`` (and
  ``volatile-containers.json``, for ``--rm`` ones), ``"names": ["web"]``.
- conmon, which podman starts for each container as the parent of its first process, with
  ``-c <id> -n <name> -b <bundle>``: the way to a rootless container's storage (under the user's
  home) and, failing every file, its name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Final, NamedTuple

MAX_JSON_BYTES: Final = 16 << 20  # a containers.json of thousands of containers is a few MiB
MAX_TEXT: Final = 253  # a Kubernetes name is at most 253 characters
MAX_ANCESTORS: Final = 32  # conmon is the parent of a container's first process


class Meta(NamedTuple):
    name: str = ""
    pod: str = ""
    pod_namespace: str = ""
    manager: str = ""  # the spec's io.container.manager: "cri-o" or "libpod" when it says


def read_bytes(path: Path, limit: int) -> bytes | None:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except (OSError, ValueError):
        return None
    return data if len(data) <= limit else None


def read_json(path: Path) -> object:
    """The JSON in ``path``; None when it cannot be read, is too long or is not JSON."""
    data = read_bytes(path, MAX_JSON_BYTES)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def text(value: object) -> str:
    """A name as people may see it: a string's printable characters; "" for anything else."""
    if not isinstance(value, str):
        return ""
    return "".join(c for c in value if c.isprintable())[:MAX_TEXT].strip()


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _strings(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _annotations(spec: object) -> dict[str, str]:
    return _strings(spec.get("annotations") if isinstance(spec, dict) else None)


def argv(proc: Path, pid: int) -> list[str]:
    """A process's command line; [] when it is gone (or a kernel thread)."""
    data = read_bytes(proc / str(pid) / "cmdline", 1 << 20)
    if not data:
        return []
    return [a.decode(errors="surrogateescape") for a in data.rstrip(b"\0").split(b"\0")]


def status(proc: Path, pid: int, key: str) -> str:
    """The first field of a line of /proc/PID/status ("PPid", "Uid"), "" when not there."""
    data = read_bytes(proc / str(pid) / "status", 1 << 16)
    for line in (data or b"").decode(errors="replace").splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return next(iter(value.split()), "")
    return ""


def option(args: list[str], *names: str) -> str:
    """The value of the first of ``names`` in a command line (Go-style: "--x v", "--x=v", and a
    one-letter "-x v", "-x=v", "-xv"); "" when none is there. The first: conmon's own options
    come before the exit command's, which it passes on."""
    for i, arg in enumerate(args[1:], 1):
        for name in names:
            if arg == name:
                return args[i + 1] if i + 1 < len(args) else ""
            if arg.startswith(name + "="):
                return arg[len(name) + 1:]
            if len(name) == 2 and arg[:2] == name and not arg.startswith("--"):
                return arg[2:]
    return ""


def docker(roots: Iterable[Path], cid: str) -> Meta | None:
    """What Docker says of container ``cid``; None when no data root has it."""
    for root in roots:
        folder = root / "containers" / cid
        if not is_dir(folder):
            continue
        config = read_json(folder / "config.v2.json")
        if not isinstance(config, dict):
            return Meta()
        inner = config.get("Config")
        labels = _strings(inner.get("Labels") if isinstance(inner, dict) else None)
        return Meta(text(config.get("Name")).removeprefix("/"),
                    text(labels.get("io.kubernetes.pod.name")),
                    text(labels.get("io.kubernetes.pod.namespace")))
    return None


def containerd(tasks: Path, cid: str, namespace: str = "") -> Meta | None:
    """What containerd's task bundle says of container ``cid`` (in every containerd namespace,
    or in ``namespace`` only); None when no namespace has it."""
    try:
        namespaces = [tasks / namespace] if namespace else sorted(tasks.iterdir())
    except (OSError, ValueError):
        return None
    for folder in namespaces:
        if not is_dir(folder / cid):
            continue
        notes = _annotations(read_json(folder / cid / "config.json"))
        return Meta(text(notes.get("io.kubernetes.cri.container-name")
                         or notes.get("nerdctl/name")),
                    text(notes.get("io.kubernetes.cri.sandbox-name")),
                    text(notes.get("io.kubernetes.cri.sandbox-namespace")))
    return None


def _crio(notes: dict[str, str]) -> Meta:
    """The pod and container CRI-O's annotations name."""
    pod = notes.get("io.kubernetes.pod.name", "")
    namespace = notes.get("io.kubernetes.pod.namespace", "")
    # a pod made without the kubelet's labels (crictl) has its sandbox's name, in sandbox and
    # containers alike: k8s_<pod>_<namespace>_<uid>_<attempt> (no Kubernetes name has a "_")
    parts = notes.get("io.kubernetes.cri-o.SandboxName", "").split("_")
    if not pod and len(parts) == 5 and parts[0] == "k8s":
        pod, namespace = parts[1], parts[2]
    name = notes.get("io.kubernetes.container.name", "")
    if not name:
        try:
            metadata = json.loads(notes.get("io.kubernetes.cri-o.Metadata", ""))
        except (ValueError, RecursionError):
            metadata = None
        name = text(metadata.get("name")) if isinstance(metadata, dict) else ""
    return Meta(text(name), text(pod), text(namespace), text(notes.get("io.container.manager")))


def listed_name(root: Path, cid: str) -> str:
    """The first of a container's names in a containers/storage root's lists of containers."""
    for listing in ("containers.json", "volatile-containers.json"):
        entries = read_json(root / "overlay-containers" / listing)
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and entry.get("id") == cid:
                names = entry.get("names")
                return text(names[0]) if isinstance(names, list) and names else ""
    return ""


def storage(roots: Iterable[Path], cid: str) -> Meta | None:
    """What CRI-O's or podman's files say of container ``cid``; None when no root has it."""
    found = None
    listed = ""
    for root in roots:
        if not is_dir(root / "overlay-containers" / cid):
            continue
        if found is None or not (found.pod or found.name or found.manager):
            found = _crio(_annotations(read_json(
                root / "overlay-containers" / cid / "userdata" / "config.json")))
        listed = listed or listed_name(root, cid)
    if found is None:
        return None
    if found.manager == "cri-o":
        return found._replace(name=found.name or listed)
    return found._replace(name=listed or found.name)


def conmon(proc: Path, pid: int, cid: str) -> tuple[str, Path | None] | None:
    """The name and bundle (``-n``, ``-b``) on the command line of the conmon that watches
    container ``cid``, found among the ancestors of ``pid``; None when there is none."""
    for _ in range(MAX_ANCESTORS):
        parent = status(proc, pid, "PPid")
        if not (parent.isascii() and parent.isdigit()) or int(parent) <= 1:
            return None
        pid = int(parent)
        args = argv(proc, pid)
        if args and Path(args[0]).name == "conmon":
            if option(args, "-c", "--cid") != cid:
                return None  # another container's: ours is not further up
            bundle = option(args, "-b", "--bundle")
            return text(option(args, "-n", "--name")), Path(bundle) if bundle else None
    return None


def storage_root(bundle: Path, cid: str) -> Path | None:
    """The containers/storage root of a podman bundle, <root>/overlay-containers/<id>/userdata."""
    parts = bundle.parts
    if bundle.is_absolute() and parts[-3:] == ("overlay-containers", cid, "userdata"):
        return bundle.parents[2]
    return None
