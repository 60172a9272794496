"""A Docker lab on the real kernel: a dockerd of the test's own, containers from an offline
busybox image, and the SYN-flood lab's client namespace in front of them.

``swt-TAG-d`` is the containers' "host" (dockerd, its docker0 on BRIDGE_NET); ``swt-TAG-c``
the client (attacker), joined to it by a veth pair (HOST_IP, CLIENT_IP), routing BRIDGE_NET
via HOST_IP: every container is reached at its own address (no published ports, no NAT). The
dockerd namespace forwards and routes SPOOF_NET/16 back to the client, which drops the
SYN-ACKs: request sockets stay in SYN-RECV in the container, as in tests/support/lab.py.
Named ``swt-*``, the namespaces are in the suite's check for namespaces left behind.

How dockerd is kept off the host, and why:

* ``nsenter --net`` (not ``ip netns exec``, whose fresh /sys hides the cgroup mounts dockerd
  needs) then ``unshare --mount``: a mount namespace of its own, where the lab's RUN and OPT
  directories are bound over /run and /opt. dockerd 20.10 hard-codes its plugins' exec root
  (/run/docker/plugins), containerd 1.6's shims put their sockets in /run/containerd/s and its
  "opt" plugin makes /opt/containerd: no flag moves them. The namespace also holds every mount
  dockerd makes (the data root's shared bind, overlay root filesystems, netns binds): they go
  when its last process does, even after a SIGKILL.
* ``--config-file`` of the lab's own: the host's /etc/docker/daemon.json is never read, and
  ``deprecated-key-path`` keeps the daemon's key.json out of /etc/docker.
* ``--iptables=false --ip6tables=false --ip-masq=false --userland-proxy=false``: clients route
  to the containers, so nothing needs NAT or a proxy; dockerd writes no rule, the flood's path
  has no conntrack state, and a test's own nft table is the only ruleset in the namespace,
  whose sysctls are the only ones dockerd writes (ip_forward, docker0's).
* ``native.cgroupdriver=cgroupfs``: containers sit at /docker/<id> in every cgroup hierarchy,
  as on a cgroup-v1 Docker host. Those directories are host-wide: the lab removes the ones it
  made (a /docker that was there before stays; only its own containers' are removed from it).
* Two things dockerd would change host-wide cannot be turned off: it raises
  kernel.keys.root_maxkeys to 1000000 when lower, and loads an AppArmor profile when AppArmor
  is on. ``docker_lab`` refuses (HostWouldChange) on such a host rather than change it.

Teardown, also after a failed start: containers removed, dockerd stopped (SIGTERM, then
SIGKILL), leftover containerd, shims and container processes killed (the lab's directory in
their command line, or in its containers' cgroups), mounts under that directory lazily
unmounted, then the cgroups, namespaces and the directory removed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from synwatch.system.lab import SPOOF_NET, sh
from tests.support import REPO
from tests.support.wait import eventually

DOCKER = "/usr/bin/docker"  # the 20.10 client; a newer one in /usr/local/bin shadows it on PATH
DOCKERD = "/usr/sbin/dockerd"
BUSYBOX = "/bin/busybox"  # busybox-static: runs in an image that holds nothing else
IMAGE = "swt-busybox:lab"
HOST_IP = "10.241.0.1"  # the dockerd namespace's end of the veth (lab.py uses 10.231/16)
CLIENT_IP = "10.241.0.2"
BRIDGE_IP = "10.242.0.1"  # docker0; containers get 10.242.0.2 onwards
BRIDGE_NET = "10.242.0.0/24"
HTTPD_BACKLOG = 9  # busybox httpd's listen(fd, 9) (networking/httpd.c, openServer)
QUEUE = ("root", "pfifo", "limit", "200000")  # a veth has no queue; see lab.make_pair
# The mount namespace's setup: the lab's run and opt directories over /run and /opt, then dockerd.
PRIVATE_MOUNTS = 'mount --bind "$1" /run && mount --bind "$2" /opt && shift 2 && exec "$@"'


class HostWouldChange(RuntimeError):
    """dockerd would change something host-wide here (fixtures may skip on it)."""


@dataclass(frozen=True)
class Container:
    name: str
    id: str
    pid: int  # its init process, as the host sees it
    ip: str

    @property
    def netns(self) -> str:
        return f"/proc/{self.pid}/ns/net"


@dataclass
class DockerLab:
    tag: str
    host_ns: str
    client_ns: str
    root: Path
    dockerd: subprocess.Popen[bytes] | None = None
    containers: dict[str, Container] = field(default_factory=dict)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    cgroups_before: set[Path] = field(default_factory=set)  # /docker dirs there before the lab
    ids: set[str] = field(default_factory=set)  # every container id the lab has seen
    pids: set[int] = field(default_factory=set)  # its daemons' and shims', seen at teardown

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    def config_v2(self, container: Container) -> Path:
        """Where dockerd keeps the container's configuration (name, image, labels)."""
        return self.data_root / "containers" / container.id / "config.v2.json"

    def docker(self, *args: str, check: bool = True,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The 20.10 client on the lab's socket; DOCKER_CONFIG keeps ~/.docker out of it."""
        done = subprocess.run([DOCKER, "-H", f"unix://{self.socket}", *args], text=True,
                              capture_output=True, timeout=timeout, check=False,
                              env={**os.environ, "DOCKER_CONFIG": str(self.root / "cli")})
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {done.stderr.strip()}")
        return done

    def in_host(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """``argv`` in the dockerd namespace."""
        return sh("nsenter", f"--net=/run/netns/{self.host_ns}", *argv)

    def in_container(self, container: Container, *argv: str) -> subprocess.CompletedProcess[str]:
        """A host binary (ss, tc, sysctl) in the container's network namespace only."""
        return sh("nsenter", f"--net={container.netns}", *argv)

    def run(self, name: str, command: Sequence[str], *, port: int | None = None,
            options: Sequence[str] = ()) -> Container:
        """A container from the busybox image running ``command`` (``options`` go to docker
        run, e.g. ``--sysctl``); with ``port``, returned once something listens there."""
        started = time.monotonic()
        cid = self.docker("run", "-d", "--name", name, *options, IMAGE, *command).stdout.strip()
        self.ids.add(cid)
        pid, _, ip = self.docker("inspect", "-f", "{{.State.Pid}} {{.NetworkSettings.IPAddress}}",
                                 cid).stdout.strip().partition(" ")
        if pid == "0":  # ended already: say why
            raise RuntimeError(f"container {name} ended: {self.docker('logs', cid).stderr}")
        container = self.containers[name] = Container(name, cid, int(pid), ip)
        self.in_container(container, "tc", "qdisc", "add", "dev", "eth0", *QUEUE)
        if port is not None:
            eventually(lambda: self.listening(container, port), f"a listener on {name}:{port}")
        self.timings[f"run {name}"] = time.monotonic() - started
        return container

    def httpd(self, name: str, port: int = 80) -> Container:
        """busybox httpd serving /www (backlog HTTPD_BACKLOG), once it listens."""
        return self.run(name, ["busybox", "httpd", "-f", "-p", str(port), "-h", "/www"],
                        port=port)

    def stop(self, name: str, remove: bool = True) -> None:
        """Killed at once (as PID 1 of its namespace it ignores SIGTERM: ``docker stop`` would
        wait out its timeout); ``remove=False`` keeps it, and its config.v2.json, as exited."""
        self.docker(*(("rm", "-f") if remove else ("kill",)), name)
        self.containers.pop(name, None)

    def listening(self, container: Container, port: int) -> bool:
        return bool(self.in_container(container, "ss", "-Htln", f"sport = :{port}").stdout)

    def syn_recv(self, container: Container, port: int) -> int:
        """How many request sockets for ``port`` the container's namespace holds."""
        return len(self.in_container(container, "ss", "-Htn", "state", "syn-recv",
                                     f"sport = :{port}").stdout.splitlines())

    def connect(self, ip: str, port: int, request: bytes = b"GET / HTTP/1.0\r\n\r\n",
                timeout: float = 5, source: str = "") -> str:
        """A real client from the client namespace (from ``source`` if given): the answer."""
        code = textwrap.dedent(f"""
            import socket, sys
            with socket.create_connection(({ip!r}, {port}), timeout={timeout},
                                          source_address=({source!r}, 0)) as s:
                s.sendall({request!r})
                answer = b"".join(iter(lambda: s.recv(65536), b""))
            sys.stdout.write(answer.decode("latin-1"))
        """)
        return sh("ip", "netns", "exec", self.client_ns, sys.executable, "-c", code).stdout

    def flood(self, ip: str, port: int, count: int, sources: list[str] | None = None) -> None:
        """``count`` SYNs to ``ip``:``port`` from spoofed sources (random ones in SPOOF_NET)."""
        assert self.start_flood(ip, port, count, sources).wait(timeout=120) == 0

    def start_flood(self, ip: str, port: int, count: int, sources: list[str] | None = None,
                    rate: float = 0) -> subprocess.Popen[str]:
        """The flood in the background (lab.send_syns in the client namespace), ``rate`` SYNs a
        second (0: as fast as it goes). Stopped with the lab."""
        srcs = sources or [f"{SPOOF_NET}.{random.randint(0, 255)}.{random.randint(1, 254)}"
                           for _ in range(count)]
        code = ("import json, sys; from tests.support.lab import send_syns; "
                f"send_syns({ip!r}, {port}, json.load(sys.stdin), {rate})")
        proc = subprocess.Popen(["ip", "netns", "exec", self.client_ns, sys.executable, "-c",
                                 code], stdin=subprocess.PIPE, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        self.processes.append(proc)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(srcs))
        proc.stdin.close()
        return proc

    def log_tail(self) -> str:  # what a test sees when dockerd never answers
        return "\n".join((self.root / "dockerd.log").read_text(errors="replace").split("\n")[-15:])


def _guard() -> None:
    """What dockerd would change host-wide and no flag stops (see the module's docstring)."""
    keys = Path("/proc/sys/kernel/keys/root_maxkeys")
    if keys.exists() and int(keys.read_text()) < 1000000:
        raise HostWouldChange("dockerd would raise kernel.keys.root_maxkeys to 1000000")
    aa = Path("/sys/module/apparmor/parameters/enabled")
    profiles = Path("/sys/kernel/security/apparmor/profiles")
    if (aa.exists() and aa.read_text().strip() == "Y" and shutil.which("apparmor_parser")
            and "docker-default" not in (profiles.read_text() if profiles.exists() else "")):
        raise HostWouldChange("dockerd would load its docker-default AppArmor profile")


def _network(lab: DockerLab) -> None:
    host_dev, client_dev = f"sw{lab.tag}d", f"sw{lab.tag}c"
    for ns in (lab.host_ns, lab.client_ns):
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", host_dev, "netns", lab.host_ns, "type", "veth", "peer", "name",
       client_dev, "netns", lab.client_ns)
    for ns, dev, ip in ((lab.host_ns, host_dev, HOST_IP), (lab.client_ns, client_dev, CLIENT_IP)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    lab.in_host("tc", "qdisc", "add", "dev", host_dev, *QUEUE)
    lab.in_host("sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh("ip", "-n", lab.host_ns, "route", "add", f"{SPOOF_NET}.0.0/16", "via", CLIENT_IP)
    sh("ip", "-n", lab.client_ns, "route", "add", BRIDGE_NET, "via", HOST_IP)


def _start_dockerd(lab: DockerLab) -> None:
    root = lab.root
    for sub in ("run", "opt", "cli"):
        (root / sub).mkdir()
    (root / "daemon.json").write_text(json.dumps({"deprecated-key-path": str(root / "key.json")}))
    argv = ["nsenter", f"--net=/run/netns/{lab.host_ns}", "unshare", "--mount", "--propagation",
            "private", "sh", "-c", PRIVATE_MOUNTS, "sh", str(root / "run"), str(root / "opt"),
            DOCKERD, "--config-file", str(root / "daemon.json"), "--data-root", str(lab.data_root),
            "--exec-root", str(root / "exec"), "--pidfile", str(root / "docker.pid"),
            "--host", f"unix://{lab.socket}", "--iptables=false", "--ip6tables=false",
            "--ip-masq=false", "--userland-proxy=false", "--bip", f"{BRIDGE_IP}/24",
            "--exec-opt", "native.cgroupdriver=cgroupfs", "--shutdown-timeout", "2"]
    started = time.monotonic()
    with (root / "dockerd.log").open("wb") as log:
        lab.dockerd = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
    eventually(lambda: lab.socket.exists() and lab.docker("version", check=False,
                                                          timeout=10).returncode == 0,
               "dockerd answering on its socket", timeout=60, alive=lab.dockerd,
               seen=lab.log_tail)
    lab.timings["dockerd"] = time.monotonic() - started


def _import_image(lab: DockerLab) -> None:
    """The image from a directory: busybox-static and a link per applet (relative: ``busybox
    --install -s`` would link to the host's path of the binary)."""
    rootfs = lab.root / "rootfs"
    for sub in ("bin", "etc", "tmp", "www"):
        (rootfs / sub).mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in set(sh(BUSYBOX, "--list").stdout.split()) - {"busybox"}:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (rootfs / "www" / "index.html").write_text("synwatch docker lab\n")
    started = time.monotonic()
    sh("tar", "-C", str(rootfs), "-cf", str(lab.root / "rootfs.tar"), ".")
    lab.docker("import", str(lab.root / "rootfs.tar"), IMAGE)
    lab.timings["import"] = time.monotonic() - started


def _cgroup_parents() -> list[Path]:
    """<mount>/docker in every cgroup hierarchy (v1 ones and the unified one)."""
    mounts = [line.partition(" - ") for line in
              Path("/proc/self/mountinfo").read_text().splitlines()]
    return [Path(fields.split()[4]) / "docker" for fields, _, rest in mounts
            if rest.split()[0] in ("cgroup", "cgroup2")]


def _container_cgroups(lab: DockerLab) -> list[Path]:
    """The lab's containers' cgroups: all under a /docker the lab made, else its own ids'."""
    found = []
    for parent in _cgroup_parents():
        if parent.is_dir():
            found += [d for d in parent.iterdir() if d.is_dir()
                      and (parent not in lab.cgroups_before or d.name in lab.ids)]
    return found


def _leftovers(lab: DockerLab) -> set[int]:
    """Processes of the lab: the lab's directory in their command line (dockerd, containerd,
    shims), or in its containers' cgroups."""
    pids, marker = set(), str(lab.root).encode()
    for proc in Path("/proc").iterdir():
        with suppress(OSError):  # gone meanwhile
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes():
                pids.add(int(proc.name))
    for cgroup in _container_cgroups(lab):
        with suppress(OSError):
            pids |= {int(p) for p in (cgroup / "cgroup.procs").read_text().split()}
    return pids - {os.getpid()}


def _until(done: Callable[[], object], seconds: float) -> None:
    """Teardown's wait: never raises, so every later step still runs."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


def _stop_dockerd(lab: DockerLab) -> None:
    if lab.dockerd is None or lab.dockerd.poll() is not None:
        return
    lab.pids |= _leftovers(lab)
    ids = lab.docker("ps", "-aq", "--no-trunc", check=False, timeout=30).stdout.split()
    lab.ids.update(ids)
    if ids:
        lab.docker("rm", "-f", *ids, check=False, timeout=60)
    lab.dockerd.terminate()
    try:
        lab.dockerd.wait(timeout=15)
    except subprocess.TimeoutExpired:
        lab.dockerd.kill()
        lab.dockerd.wait()


def _kill_leftovers(lab: DockerLab) -> None:
    """SIGKILL for what is left, then a wait until every process seen since teardown began is
    gone, zombies too: shims exit after dockerd and are reaped by PID 1, not by us."""
    lab.pids |= _leftovers(lab)
    for pid in _leftovers(lab):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if lab.dockerd is not None and lab.dockerd.poll() is None:
        lab.dockerd.wait(timeout=10)
    _until(lambda: not _leftovers(lab) and not any(Path(f"/proc/{p}").exists()
                                                   for p in lab.pids), 10)


def _unmount(lab: DockerLab) -> None:
    """Mounts under the lab's directory in this mount namespace (none, unless dockerd's own
    leaked out of its namespace), deepest first."""
    mounts = [Path(line.split()[4]) for line in
              Path("/proc/self/mountinfo").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.is_relative_to(lab.root)),
                        key=lambda m: len(m.parts), reverse=True):
        sh("umount", "--lazy", str(mount), check=False)


def _remove_cgroups(lab: DockerLab) -> None:
    def removed(paths: list[Path]) -> bool:  # tries every one; False while one is busy
        for path in paths:
            with suppress(OSError):  # busy: still emptying out after its processes were killed
                path.rmdir()
        return not any(path.exists() for path in paths)

    _until(lambda: removed(_container_cgroups(lab)), 10)
    removed([p for p in _cgroup_parents() if p not in lab.cgroups_before])


def _teardown(lab: DockerLab) -> None:
    """Every step, whatever failed before it; the first error is raised at the end."""
    for proc in lab.processes:
        proc.kill()
        proc.wait()
    errors: list[BaseException] = []
    for step in (_stop_dockerd, _kill_leftovers, _unmount, _remove_cgroups):
        try:
            step(lab)
        except Exception as exc:  # the next steps must run all the same
            errors.append(exc)
    for ns in (lab.host_ns, lab.client_ns):
        sh("ip", "netns", "del", ns, check=False)
    shutil.rmtree(lab.root, ignore_errors=True)
    if errors:
        raise RuntimeError(f"docker lab teardown: {errors!r}") from errors[0]


@contextmanager
def docker_lab() -> Iterator[DockerLab]:
    """dockerd in a namespace of its own, the busybox image imported, the client namespace
    routed to its containers; all of it removed on exit, also when the start fails."""
    _guard()
    tag = uuid.uuid4().hex[:6]
    lab = DockerLab(tag, f"swt-{tag}-d", f"swt-{tag}-c",
                    Path(tempfile.mkdtemp(prefix=f"swt-docker-{tag}-")),
                    cgroups_before={p for p in _cgroup_parents() if p.is_dir()})
    try:
        _network(lab)
        _start_dockerd(lab)
        _import_image(lab)
        yield lab
    finally:
        _teardown(lab)
