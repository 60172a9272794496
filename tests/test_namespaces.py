"""Watching many network namespaces, the pure parts: what watch.netns takes, the names the
namespaces get (from a recorded /proc and a Docker data root), and advice that fits a
container. The real-kernel side is in tests/test_namespaces_lab.py and
tests/test_containers_lab.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from synwatch.config import load_config
from synwatch.detect.advice import in_place
from synwatch.errors import ConfigError
from synwatch.records import Place
from synwatch.system.netnsfind import find_namespaces
from synwatch.system.owners import RuntimeRoots

DOCKER_ID = "49fa2fde8c519fca4dc21a3d7bf8960f0b7cfabb14555e0f00e889fe3211acfe"


def _config(tmp_path: Path, value: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f"[watch]\nnetns = {value}\n")
    return path


@pytest.mark.parametrize(("value", "netns", "globs"), [
    ('""', "", ()),
    ('"lab1"', "lab1", ()),
    ('"*"', "", ("*",)),
    ('["", "docker:*", "k8s:shop/*"]', "", ("", "docker:*", "k8s:shop/*")),
    ('["lab1"]', "", ("lab1",)),
])
def test_watch_netns_takes_one_name_or_globs(tmp_path: Path, value: str, netns: str,
                                             globs: tuple[str, ...]) -> None:
    c = load_config(str(_config(tmp_path, value)))
    assert (c.netns, c.netns_globs, c.many_namespaces) == (netns, globs, bool(globs))


@pytest.mark.parametrize(("value", "why"), [
    ("[]", "is an empty list"),
    ('"-x"', "is not an `ip netns` name"),
    ('["docker:web 1"]', "is neither a namespace name nor a glob"),
    ("3", "expected a list of strings"),
])
def test_a_bad_watch_netns_is_exit_2_with_the_key(tmp_path: Path, value: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(str(_config(tmp_path, value)))
    assert "watch.netns" in str(caught.value) and why in str(caught.value)


def test_which_namespaces_a_config_takes(tmp_path: Path) -> None:
    every = load_config(str(_config(tmp_path, '"*"')))
    assert all(every.watches(n) for n in ("", "lab1", "docker:web1", "k8s:a/b"))
    some = load_config(str(_config(tmp_path, '["docker:web*", "k8s:shop/*"]')))
    assert [n for n in ("", "lab1", "docker:web1", "docker:db", "k8s:shop/a", "k8s:blog/a")
            if some.watches(n)] == ["docker:web1", "k8s:shop/a"]
    ours = load_config(str(_config(tmp_path, '["", "lab?"]')))
    assert [n for n in ("", "lab1", "lab12") if ours.watches(n)] == ["", "lab1"]
    one = load_config(str(_config(tmp_path, '"lab1"')))
    assert [n for n in ("", "lab1") if one.watches(n)] == ["lab1"]


def _ns_file(root: Path, name: str) -> Path:
    """A stand-in for an nsfs file: its inode is the namespace's identity."""
    path = root / "nsfs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def _process(proc: Path, pid: int, ns: Path, comm: str, cgroup: str = "0::/\n") -> None:
    d = proc / str(pid)
    (d / "ns").mkdir(parents=True)
    os.link(ns, d / "ns" / "net")  # one inode: the same namespace
    (d / "comm").write_text(comm + "\n")
    (d / "cgroup").write_text(cgroup)
    (d / "cmdline").write_bytes(comm.encode() + b"\0")


def test_every_namespace_once_named_for_what_owns_it(tmp_path: Path) -> None:
    """Ours is ""; a Docker container's is named from its config.v2.json; an `ip netns` one
    with a process in it keeps its name; one no container owns is named for its first
    process; a named one with no process is found in /run/netns alone."""
    proc, run = tmp_path / "proc", tmp_path / "run"
    run.mkdir()
    own, web, lab, bare, empty = (_ns_file(tmp_path, n) for n in
                                  ("own", "web", "lab", "bare", "empty"))
    proc.mkdir()
    (proc / "self" / "ns").mkdir(parents=True)
    os.link(own, proc / "self" / "ns" / "net")
    _process(proc, 1, own, "init")
    _process(proc, 4242, web, "httpd", f"0::/docker/{DOCKER_ID}\n")
    _process(proc, 4243, web, "sh", f"0::/docker/{DOCKER_ID}\n")
    _process(proc, 5000, lab, "python3")
    _process(proc, 6000, bare, "nginx")
    os.link(lab, run / "lab1")
    os.link(empty, run / "spare")
    data = tmp_path / "docker"
    meta = data / "containers" / DOCKER_ID
    meta.mkdir(parents=True)
    (meta / "config.v2.json").write_text(json.dumps({"ID": DOCKER_ID, "Name": "/web1",
                                                     "Config": {"Labels": {}}}))
    found = find_namespaces(proc, run, RuntimeRoots(docker=(data,)))
    assert [(f.name, f.kind, f.pid) for f in found] == [
        ("", "own", None), ("docker:web1", "container", 4242), ("lab1", "netns", 5000),
        ("process:nginx:6000", "process", 6000), ("spare", "netns", None)]
    by_name = {f.name: f for f in found}
    assert by_name["docker:web1"].path == proc / "4242" / "ns" / "net"
    assert by_name["lab1"].path == run / "lab1"
    owner = by_name["docker:web1"].owner
    assert owner is not None and (owner.runtime, owner.container_id) == ("docker", DOCKER_ID)
    assert len({f.ident for f in found}) == len(found)


def test_advice_for_a_container_says_how_its_runtime_sets_a_sysctl() -> None:
    recs = ("net.core.somaxconn is 128 and clamps every listen() backlog: "
            "`sysctl -w net.core.somaxconn=1024` (and in /etc/sysctl.d/)",
            "raise the listen backlog of 0.0.0.0:80 from 128 to 1024 (nginx: ...)",
            "net.ipv4.tcp_syncookies is 0: `sysctl -w net.ipv4.tcp_syncookies=1`")
    assert in_place(recs, Place("own")) == recs
    assert in_place(recs, Place("netns")) == recs
    docker = in_place(recs, Place("container", "docker"))
    assert "`docker run --sysctl net.core.somaxconn=1024 ...`" in docker[0]
    assert "node memory" in docker[0] and "sysctl -w" not in docker[0]
    assert docker[1] == recs[1]
    assert "`docker run --sysctl net.ipv4.tcp_syncookies=1 ...`" in docker[2]
    pod = in_place(recs, Place("container", "containerd", "shop/web-7d9f"))
    assert "--allowed-unsafe-sysctls=net.core.somaxconn" in pod[0]
    assert "securityContext.sysctls" in pod[2] and "a safe sysctl in Kubernetes" in pod[2]
    plain = in_place(recs, Place("container", "containerd"))
    assert "OCI spec" in plain[0]
