"""Watching many network namespaces, the pure parts: what watch.netns takes, the names the
namespaces get (from a recorded /proc and a Docker data root), and advice that fits a
container. The real-kernel side is in tests/test_namespaces_lab.py and
tests/test_containers_lab.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from synwatch.clock import FrozenClock
from synwatch.config import load_config
from synwatch.daemon.watchset import DISCOVER_EVERY, WatchSet
from synwatch.detect.advice import in_place
from synwatch.errors import ConfigError
from synwatch.records import Place
from synwatch.system import netns
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


def _docker_host(tmp_path: Path, containers: dict[str, str]) -> tuple[Path, Path]:
    """A recorded host: its /proc with our own namespace (init, and a dockerd whose data root
    holds ``containers``, id -> name) and an empty /run/netns. The tests add the containers'
    processes."""
    proc, run = tmp_path / "proc", tmp_path / "run"
    run.mkdir()
    own = _ns_file(tmp_path, "own")
    (proc / "self" / "ns").mkdir(parents=True)
    os.link(own, proc / "self" / "ns" / "net")
    _process(proc, 1, own, "init")
    data = tmp_path / "docker"
    for cid, name in containers.items():
        (data / "containers" / cid).mkdir(parents=True)
        (data / "containers" / cid / "config.v2.json").write_text(f'{{"Name": "/{name}"}}')
    _process(proc, 50, own, "dockerd")
    (proc / "50" / "cmdline").write_bytes(f"dockerd\0--data-root\0{data}\0".encode())
    return proc, run


def _watching_every(tmp_path: Path, proc: Path, run: Path) -> tuple[WatchSet, FrozenClock]:
    """The watch set of a service with watch.netns = "*" on that host, on a frozen clock."""
    config = load_config(str(_config(tmp_path, '"*"')))
    clock = FrozenClock(datetime(2026, 12, 6, tzinfo=timezone.utc))
    return WatchSet(config, clock, lambda _c, _p: None, proc=proc,  # type: ignore[arg-type,return-value]
                    netns_dir=run), clock


class _Settings:
    """The history's saved settings and bans, as much of it as letting a namespace go uses."""

    def __init__(self) -> None:
        self.settings = {("docker:web1", "net.ipv4.tcp_syncookies"): "0",
                         ("", "net.ipv4.tcp_syncookies"): "0"}
        self.removed: list[object] = []

    def saved_settings(self) -> list[tuple[str, str, str]]:
        return [(ns, name, v) for (ns, name), v in self.settings.items()]

    def forget_setting(self, netns: str, name: str) -> None:
        del self.settings[(netns, name)]

    def active_bans(self, netns: str, now: object) -> list[object]:
        return []

    def mark_removed(self, ids: list[object], now: object) -> None:
        self.removed += ids


def test_a_container_back_under_its_name_is_admitted_only_once_the_old_one_is_let_go(
        tmp_path: Path) -> None:
    """`docker restart` between two looks: the old namespace goes and a new one has its name.
    Its name keeps meaning the old namespace until the service has closed the old one's
    incidents and forgotten what it saved there; then it means the new one, which is watched
    from the next turn on, and nothing saved for the old one is left for it."""
    proc, run = _docker_host(tmp_path, {DOCKER_ID: "web1"})
    old, new = _ns_file(tmp_path, "old"), _ns_file(tmp_path, "new")
    _process(proc, 100, old, "httpd", f"0::/docker/{DOCKER_ID}\n")
    watch, clock = _watching_every(tmp_path, proc, run)
    try:
        watch.discover()
        first = watch.named("docker:web1")
        assert first is not None and netns.bound()["docker:web1"] == proc / "100" / "ns" / "net"
        shutil.rmtree(proc / "100")  # restarted: a new init, a new namespace
        _process(proc, 200, new, "httpd", f"0::/docker/{DOCKER_ID}\n")
        clock.advance(DISCOVER_EVERY)
        _, went = watch.due()
        assert went == [first] and watch.named("docker:web1") is None
        assert netns.bound()["docker:web1"] == proc / "100" / "ns" / "net", \
            "the old one's until it is let go"
        store = _Settings()
        watch.forget(first, store)  # type: ignore[arg-type]
        assert store.settings == {("", "net.ipv4.tcp_syncookies"): "0"}
        _, went = watch.due()
        second = watch.named("docker:web1")
        assert went == [] and second is not None and second is not first
        assert second.found.ident == (new.stat().st_dev, new.stat().st_ino)
        assert netns.bound()["docker:web1"] == proc / "200" / "ns" / "net"
        assert watch.next_due() > clock.monotonic(), "nothing left to do at once: no busy loop"
    finally:
        netns.unbind("docker:web1")


def test_another_container_on_a_reused_inode_is_a_new_namespace(tmp_path: Path) -> None:
    """The kernel hands a new namespace the lowest free nsfs inode: one made right after
    another went can have its inode. Another container there is another namespace (its
    predecessor let go, then it is admitted), never the old one carried on."""
    other = "7" * 64
    proc, run = _docker_host(tmp_path, {DOCKER_ID: "web1", other: "db1"})
    shared = _ns_file(tmp_path, "shared")
    _process(proc, 100, shared, "httpd", f"0::/docker/{DOCKER_ID}\n")
    watch, clock = _watching_every(tmp_path, proc, run)
    try:
        watch.discover()
        web = watch.named("docker:web1")
        assert web is not None
        shutil.rmtree(proc / "100")
        _process(proc, 300, shared, "postgres", f"0::/docker/{other}\n")  # the same inode
        clock.advance(DISCOVER_EVERY)
        _, went = watch.due()
        assert went == [web] and watch.named("db1") is None
        watch.forget(web, _Settings())  # type: ignore[arg-type]
        watch.due()
        db = watch.named("docker:db1")
        assert db is not None and db is not web and db.found.ident == web.found.ident
        assert netns.bound()["docker:db1"] == proc / "300" / "ns" / "net"
        assert "docker:web1" not in netns.bound()
    finally:
        netns.unbind("docker:db1")
        netns.unbind("docker:web1")


def test_what_a_namespace_gone_while_synwatch_was_down_held_is_not_carried_on(
        tmp_path: Path) -> None:
    """At the start: a setting saved for a namespace that is not there any more is forgotten
    (its name may be another container's later); one of a live namespace stays. An incident
    left open in a namespace whose identity changed meanwhile (a container replaced under its
    name) is carried on in a stand-in that closes at the first turn, not in the new one."""
    from dataclasses import replace as copied

    from tests.support.history import change

    proc, run = _docker_host(tmp_path, {DOCKER_ID: "web1"})
    _process(proc, 100, _ns_file(tmp_path, "web"), "httpd", f"0::/docker/{DOCKER_ID}\n")
    watch, _ = _watching_every(tmp_path, proc, run)
    try:
        watch.discover()
        live = watch.named("docker:web1")
        assert live is not None and live.correlator.ident
        store = _Settings()
        store.settings[("docker:db-gone", "net.ipv4.tcp_syncookies")] = "0"
        watch.drop_stale(store)  # type: ignore[arg-type]
        assert set(store.settings) == {("docker:web1", "net.ipv4.tcp_syncookies"),
                                       ("", "net.ipv4.tcp_syncookies")}
        left = change(netns="docker:web1", incident_id=7, state={
            "tally": {}, "netns_ident": "x:1:2"})  # the identity the old one had
        stand_in, _ = watch.resume(left)
        assert stand_in is not live and stand_in.gone and stand_in.correlator.open
        assert not live.correlator.open
        same = copied(left, state={"tally": {}, "netns_ident": live.correlator.ident})
        assert watch.resume(same)[0] is live and live.correlator.open
        _, went = watch.due()
        assert went == [stand_in]
    finally:
        netns.unbind("docker:web1")


def test_a_namespace_first_flooded_here_gets_no_value_saved_under_its_name_before(
        tmp_path: Path) -> None:
    """A sysctl value saved under a name before this run (a crash between a close and its
    restore, a container of that name long gone) is never put into the namespace that has the
    name now: its responder, made at its first incident, forgets it before its setup runs."""
    import types

    from synwatch.daemon.watched import Watched
    from synwatch.system.netnsfind import FoundNamespace

    store = _Settings()
    store.settings[("docker:web1", "ban.check")] = "{}"
    started: list[str] = []
    made = types.SimpleNamespace(ctx=types.SimpleNamespace(store=store),
                                 resume=lambda _r: None,
                                 start=lambda: started.append(str(sorted(store.settings))))
    config = load_config(str(_config(tmp_path, '"*"')))
    config = replace(config, ban=replace(config.ban, bridged="inside"))  # no bridge looked for
    watch = WatchSet(config, FrozenClock(datetime(2026, 12, 6, tzinfo=timezone.utc)),
                     lambda _c, _p: made, proc=tmp_path)  # type: ignore[arg-type,return-value]
    w = Watched(FoundNamespace((1, 2), "docker:web1", tmp_path, "container"),
                watch._correlator("docker:web1", None), always=False)
    assert watch.responder(w) is made
    assert set(store.settings) == {("", "net.ipv4.tcp_syncookies"), ("docker:web1", "ban.check")}
    assert started == [str(sorted(store.settings))], "forgotten before its setup ran"


def test_the_netns_id_request_and_any_reply() -> None:
    """RTM_GETNSID as the kernel reads it (rtnl_net_getid: a 4-byte rtgenmsg, then NETNSA_FD),
    and its reply read back; a reply that is not one, truncated or an error is no id."""
    import struct

    from hypothesis import given
    from hypothesis import strategies as st

    from synwatch.system.bridgepath import RTM_NEWNSID, nsid_request, parse_nsid

    request = nsid_request(7, seq=3)
    assert request == struct.pack("=IHHII", 28, 90, 1, 3, 0) + b"\0" * 4 + struct.pack(
        "=HHI", 8, 3, 7)

    def reply(nsid: int, kind: int = RTM_NEWNSID) -> bytes:
        body = b"\0" * 4 + struct.pack("=HHi", 8, 1, nsid)
        return struct.pack("=IHHII", 16 + len(body), kind, 0, 3, 0) + body

    assert parse_nsid(reply(0)) == 0 and parse_nsid(reply(5)) == 5
    assert parse_nsid(reply(-1)) is None  # NETNSA_NSID_NOT_ASSIGNED
    assert parse_nsid(reply(5, kind=2)) is None  # NLMSG_ERROR
    assert parse_nsid(reply(5)[:20]) is None
    # a header that claims less than the attribute it holds (the attribute ends past it)
    assert parse_nsid(struct.pack("=IHHII", 24, RTM_NEWNSID, 0, 3, 0) + b"\0" * 4
                      + struct.pack("=HH", 8, 1)) is None

    @given(st.integers(0, 64), st.binary(max_size=64))
    def any_bytes(cut: int, tail: bytes) -> None:  # a real reply cut anywhere, then anything
        data = reply(5)[:cut] + tail
        got = parse_nsid(data)
        assert got is None or got >= 0
        assert parse_nsid(tail) is None or len(tail) >= 28

    any_bytes()


def test_ip_addr_output_of_any_shape_is_links_or_a_value_error() -> None:
    """`ip -j -d addr show` read for a bridge path: any JSON is links (or none) and veths (or
    none), never another exception; text that is not JSON is a ValueError (said, no path)."""
    from hypothesis import given
    from hypothesis import strategies as st

    from synwatch.system.bridgepath import addresses_of, links_of, veths_of

    real = json.dumps([{"ifindex": 2, "link_index": 7, "ifname": "eth0", "link_netnsid": 0,
                        "linkinfo": {"info_kind": "veth"},
                        "addr_info": [{"family": "inet", "local": "172.17.0.2",
                                       "scope": "global"}]}])
    [veth] = veths_of(links_of(real))
    assert addresses_of([veth]) == (("172.17.0.2",), ())
    values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                          lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.sampled_from(
                              ["linkinfo", "info_kind", "link_netnsid", "link_index",
                               "addr_info", "family", "local", "scope", "veth", "inet"]),
                              inner, max_size=6), max_leaves=30)

    address = st.fixed_dictionaries({}, optional={
        "family": st.sampled_from(["inet", "inet6"]) | values, "local": values,
        "scope": st.just("global") | values})
    veth = st.fixed_dictionaries({  # a veth to another namespace: its addresses are read
        "linkinfo": st.just({"info_kind": "veth"}), "link_netnsid": st.integers(0, 3),
        "link_index": st.integers(1, 9)},
        optional={"addr_info": st.lists(address | values, max_size=3) | values})
    link = st.fixed_dictionaries({}, optional={
        "linkinfo": st.just({"info_kind": "veth"}) | values, "link_netnsid": values,
        "link_index": values, "addr_info": values, "ifindex": values})

    @given(st.lists(veth | link | values, max_size=4) | values)
    def any_json(value: object) -> None:
        addresses_of(veths_of(links_of(json.dumps(value))))

    @given(st.text(max_size=40))
    def any_text(text: str) -> None:
        with contextlib.suppress(ValueError):
            veths_of(links_of(text))

    any_json()
    any_text()


def test_a_probe_reads_listeners_again_when_its_last_look_may_not_stand(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While nothing comes in, a probe may keep its last look at the listeners and sysctls
    (synwatch.probes.snapshot) for STILL_FOR seconds; it reads them again after that, while a
    kernel line waits for it (the line's listener may be newer), and at every probe of an open
    incident (its record follows the accept queue and the cookies it set)."""
    from types import SimpleNamespace

    from synwatch.daemon import watched
    from synwatch.detect.correlate import Correlator
    from synwatch.probes.snapshot import Snapshot
    from synwatch.system.netnsfind import FoundNamespace

    asked: list[bool] = []

    def take(*_args: object, reread: bool, **_kw: object) -> Snapshot:
        asked.append(reread)
        return Snapshot("", (), {}, {}, None, 0)

    monkeypatch.setattr(watched, "take", take)
    clock = FrozenClock(datetime(2026, 12, 7, tzinfo=timezone.utc))
    config = load_config(str(_config(tmp_path, '""')))
    w = watched.Watched(FoundNamespace((0, 0), "", Path("/"), "own"),
                        Correlator("h", "", config.thresholds, 60, clock), always=True)

    def probe(after: float) -> bool:
        clock.advance(after)
        w.evidence(config, clock, visiting=False)
        return asked[-1]

    assert probe(0), "the first look"
    assert [probe(1) for _ in range(9)] == [False] * 9
    assert probe(1), "STILL_FOR later"
    assert not probe(1)
    w.correlator.held.append((object(), 0))  # type: ignore[arg-type]
    assert probe(1), "a kernel line waits"
    w.correlator.held.clear()
    w.correlator.open[1] = SimpleNamespace(tally=SimpleNamespace(port=None))  # type: ignore[assignment]
    assert probe(1) and probe(1), "an incident is open"
    w.correlator.open.clear()
    assert not probe(1)
