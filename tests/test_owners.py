"""Which container owns a process, from a fake /proc and the runtimes' own files as real hosts
have them (tests/data/owners, README there names where each format comes from)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from synwatch.system import ownersmeta
from synwatch.system.owners import (
    Owner,
    RuntimeRoots,
    container_in_cgroup,
    docker_roots,
    owner_of,
)
from tests.support import DATA

OWNERS = DATA / "owners"
HOSTS = OWNERS / "hosts"

DK_V2 = "8ad700d1f7115aba42de87ce088d3f16808a1ac54e2d7f562c499bdef8d0a0d4"
DK_V1_SD = "43f0f7a7161b170c4666003296a36c6faae295016849ff5416d67a524e17703c"
DK_V1_FS = "da09413f3e39d82a2be453a6caf14c55cd3127611549557cc70c50565ef5f0f6"
DK_V2_FS = "dde7a808085163a0680de9bcf9495927334728320258c66faf0f5fb018a919f1"
DK_BAD = "badb01badb01badb01badb01badb01badb01badb01badb01badb01badb01badb"
DK_POD_SD = "ca0587256640e2964fb4656da0d99828966f90ba96a29a650860e0ca63e8eced"
DK_POD_FS = "b29a190d773988689efe3ef7b616e4dd4159f54ac4d131595d442a60d0b0b5ed"
CD_SANDBOX = "d7dfb4a21fe1703a8537e60d5af248af729315d187b24a538102d14874c8117d"
CD_V1 = "ee4b20e90ac7f42a10bd004d05646b13d8ab5e2c5e7cbc01abf8006bac016459"
CD_BARE = "63060edc2d3aa803ab559f2393776b151f99fc5b05035b21db66b3b62246ad6a"
NERD_SD = "e2b31bcbe574f601a4982cc6a4c98235979c4c8f7ae01828a740af0751c9f221"
NERD_FS = "83e7904b80c05ab905441e7b7a5f9c52bcc0ac23de48b4caa6cfdb15caaa7b77"
CRIO_SANDBOX = "1f04600dc6949359da68eee5fe7c4069706a567c07d1ef89fe3bbfdeac7a6dca"
CRIO_CTR = "49ecc282021562c567a8159ef424a06cdd8637efdca5953de9794eafe29adcad"
PM_ROOTFUL = "579635db3532e954d07927bdc32bd435bd082f03a0696ded072f04d762a18775"
PM_ROOTLESS = "c3be953da46e015e93a9de37c547a7587a32d609fad3ca721135937833d94a1e"
PM_NOFILES = "b3fcc94cd6a1c263626ac6283d30ab854d9437379ec1a618b233c7c929891819"
PM_SPLIT = "9687bac58d5c4d1606aa46af33d1a21c1d1652e0ac9fb3fc0fc86e3495f42869"
PM_CGROUPFS = "56fd3fe36f82708162306ab87b69a0fca3a0eabe2d17af78abbbc8a1ecc2d774"


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    """The fake /proc, its command lines' @DATA@ made the fixtures' place (dockerd's
    --data-root, a rootless conmon's bundle are absolute paths)."""
    root = tmp_path / "proc"
    shutil.copytree(OWNERS / "proc", root)
    for cmdline in root.glob("*/cmdline"):
        cmdline.write_bytes(cmdline.read_bytes().replace(b"@DATA@", str(OWNERS).encode()))
    return root


@pytest.fixture
def roots() -> RuntimeRoots:
    """Docker's data root is left to be found (the fake /proc's dockerd names it)."""
    return RuntimeRoots(containerd_tasks=OWNERS / "tasks",
                        containers_storage=(OWNERS / "storage-run", OWNERS / "storage-lib"))


CASES = {
    # Docker
    2001: (Owner("docker", DK_V2, "web1"), "docker:web1"),  # v2, systemd driver
    2002: (Owner("docker", DK_V1_SD, "stress"), "docker:stress"),  # v1, systemd driver
    2003: (Owner("docker", DK_V1_FS, "builder"), "docker:builder"),  # v1, cgroupfs
    2004: (Owner("docker", DK_V2_FS, "grafana"), "docker:grafana"),  # v2, cgroupfs
    2005: (Owner("docker", DK_BAD), "docker:badb01badb01"),  # config.v2.json cut short
    # cri-dockerd: systemd driver, and the kubelet's cgroupfs driver (the runtime from the files)
    2006: (Owner("docker", DK_POD_SD,
                 "k8s_POD_nginx-7d9f8b6c4-xk2lp_default_82f40de6-1226-4577-ab35-2f378b9f5e49_0",
                 "nginx-7d9f8b6c4-xk2lp", "default"), "k8s:default/nginx-7d9f8b6c4-xk2lp"),
    2007: (Owner("docker", DK_POD_FS,
                 "k8s_POD_coredns-5644d7b6d9-c5tbq_kube-system_caf1aa9e-c2ee-4782-ad6d-98736fa15dd2_13",
                 "coredns-5644d7b6d9-c5tbq", "kube-system"),
           "k8s:kube-system/coredns-5644d7b6d9-c5tbq"),
    # containerd's CRI plugin: a pod's sandbox, a container (cgroup v1, systemd's unconverted
    # form in some controllers), a sandbox under the cgroupfs driver
    3001: (Owner("containerd", CD_SANDBOX, "", "nginx-7d9f", "default"), "k8s:default/nginx-7d9f"),
    3002: (Owner("containerd", CD_V1, "shop", "shop-5f6b7c9d-2xkqv", "shop"),
           "k8s:shop/shop-5f6b7c9d-2xkqv"),
    3003: (Owner("containerd", CD_BARE, "", "nginx-sandbox", "default"),
           "k8s:default/nginx-sandbox"),
    # nerdctl (systemd, then containerd's own /<namespace>/<id>), ctr's id of its own choosing
    3004: (Owner("containerd", NERD_SD, "web"), "containerd:web"),
    3005: (Owner("containerd", NERD_FS, "cache"), "containerd:cache"),
    3006: (Owner("containerd", "redis"), "containerd:redis"),
    # CRI-O: a kubelet's pod sandbox; a crictl-made pod's container (no kubelet labels)
    4001: (Owner("cri-o", CRIO_SANDBOX, "POD", "my-otel-demo-frontend-6fb55b5cb-mfj29",
                 "otel-demo"), "k8s:otel-demo/my-otel-demo-frontend-6fb55b5cb-mfj29"),
    4002: (Owner("cri-o", CRIO_CTR, "podsandbox1-redis", "podsandbox1", "redhat.test.crio"),
           "k8s:redhat.test.crio/podsandbox1"),
    # podman: rootful (crun's /container below the scope), rootless (a worker, two levels below
    # conmon; its storage under the user's home, named by conmon's bundle), rootless with its
    # storage out of reach (conmon's -n), a quadlet's --cgroups=split, cgroupfs (no files)
    5001: (Owner("podman", PM_ROOTFUL, "contenedor1"), "podman:contenedor1"),
    5102: (Owner("podman", PM_ROOTLESS, "toolbox"), "podman:toolbox"),
    5201: (Owner("podman", PM_NOFILES, "vault-svc"), "podman:vault-svc"),
    5301: (Owner("podman", PM_SPLIT, "systemd-nginx"), "podman:systemd-nginx"),
    5501: (Owner("podman", PM_CGROUPFS), "podman:56fd3fe36f82"),
}


@pytest.mark.parametrize("pid", sorted(CASES))
def test_owner_and_label(pid: int, proc: Path, roots: RuntimeRoots) -> None:
    owner, label = CASES[pid]
    found = owner_of(pid, proc, roots)
    assert found == owner
    assert found is not None
    assert found.label == label


@pytest.mark.parametrize("pid", [
    1, 900, 901,  # the host's init, a login shell (v2), sshd (v1)
    812,  # dockerd itself
    4003,  # CRI-O's conmon of a container: the monitor, not the container
    4990, 5100, 5401,  # podman's conmons (rootful, rootless, a quadlet's)
    99999,  # gone
])
def test_not_in_a_container(pid: int, proc: Path, roots: RuntimeRoots) -> None:
    assert owner_of(pid, proc, roots) is None


def test_a_rootless_name_from_the_users_storage_before_conmons(proc: Path,
                                                                 roots: RuntimeRoots) -> None:
    """conmon's -n is the name the container started with (``podman rename`` since changes the
    storage's list, not conmon's command line)."""
    cmdline = proc / "5100" / "cmdline"
    cmdline.write_bytes(cmdline.read_bytes().replace(b"-n\0toolbox\0", b"-n\0old-name\0"))
    assert owner_of(5102, proc, roots) == Owner("podman", PM_ROOTLESS, "toolbox")
    assert owner_of(5101, proc, roots) == Owner("podman", PM_ROOTLESS, "toolbox")


def test_another_containers_conmon_names_nothing(proc: Path, tmp_path: Path) -> None:
    cmdline = proc / "5100" / "cmdline"
    cmdline.write_bytes(cmdline.read_bytes().replace(PM_ROOTLESS.encode(), PM_SPLIT.encode()))
    empty = RuntimeRoots(docker=(tmp_path,), containerd_tasks=tmp_path,
                         containers_storage=(tmp_path,))
    assert owner_of(5102, proc, empty) == Owner("podman", PM_ROOTLESS)


def test_a_bare_id_takes_the_runtime_of_the_storage_that_has_it(proc: Path,
                                                               roots: RuntimeRoots) -> None:
    for pid, cid in ((7001, PM_ROOTFUL), (7002, CRIO_CTR)):
        (proc / str(pid)).mkdir()
        (proc / str(pid) / "cgroup").write_text(f"0::/kubepods/besteffort/pod0a1b/{cid}\n")
    assert owner_of(7001, proc, roots) == Owner("podman", PM_ROOTFUL, "contenedor1")
    assert owner_of(7002, proc, roots) == CASES[4002][0]


def test_a_process_that_goes_between_reads(proc: Path, roots: RuntimeRoots) -> None:
    (proc / "2001" / "cgroup").unlink()
    assert owner_of(2001, proc, roots) is None
    assert owner_of(0, proc, roots) is None
    assert owner_of(-1, proc, roots) is None


def test_runtime_files_gone_leave_the_owner_bare(proc: Path, tmp_path: Path) -> None:
    """A container stopping: its runtime's files are gone, the cgroup still says who it was."""
    empty = RuntimeRoots(docker=(tmp_path / "none",), containerd_tasks=tmp_path / "none",
                         containers_storage=(tmp_path / "none",))
    assert owner_of(2001, proc, empty) == Owner("docker", DK_V2)
    assert owner_of(3001, proc, empty) == Owner("containerd", CD_SANDBOX)
    assert owner_of(4001, proc, empty) == Owner("cri-o", CRIO_SANDBOX)
    # a bare id no runtime has: containerd's, the kubelet's usual runtime
    assert owner_of(3003, proc, empty) == Owner("containerd", CD_BARE)
    assert owner_of(3006, proc, empty) is None  # /default/redis is no container's without a task
    # the rootless one still has conmon's -n
    assert owner_of(5102, proc, empty) == Owner("podman", PM_ROOTLESS, "toolbox")


def test_garbled_and_unreadable_files(tmp_path: Path, proc: Path) -> None:
    cases = {"garbled.json": b'{"Name": "/web1", "Config": {"Labels": {', "list.json": b"[1, 2]",
             "latin1.json": b'{"Name": "/caf\xe9"}', "deep.json": b"[" * 100000 + b"]" * 100000,
             "string.json": b'"/web1"'}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        assert not isinstance(ownersmeta.read_json(tmp_path / name), dict), name
    assert ownersmeta.read_json(tmp_path / "missing.json") is None
    assert ownersmeta.read_json(tmp_path) is None  # a directory
    # a config.v2.json that is JSON but not Docker's shape
    root = tmp_path / "docker"
    (root / "containers" / DK_V2).mkdir(parents=True)
    (root / "containers" / DK_V2 / "config.v2.json").write_text(
        '{"Name": 42, "Config": {"Labels": ["io.kubernetes.pod.name"]}}')
    assert ownersmeta.docker([root], DK_V2) == ownersmeta.Meta()
    weird = RuntimeRoots(docker=(root,))
    assert owner_of(2001, proc, weird) == Owner("docker", DK_V2)


def test_names_people_see_have_no_control_characters(tmp_path: Path) -> None:
    root = tmp_path / "docker"
    (root / "containers" / DK_V2).mkdir(parents=True)
    (root / "containers" / DK_V2 / "config.v2.json").write_text(
        '{"Name": "/web1\\u001b[31m\\nadmin", "Config": {"Labels": {}}}')
    said = ownersmeta.docker([root], DK_V2)
    assert said is not None
    assert said.name == "web1[31madmin"


KIND_POD = ("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            "kubelet-kubepods-besteffort-pod1e597579_417e_482f_bf65_5fe170c3aebd.slice")


@pytest.mark.parametrize(("text", "expected"), [
    (f"0::/system.slice/docker-{DK_V2}.scope\n", ("docker", DK_V2)),
    (f"1:name=systemd:/docker/{DK_V1_FS}\n0::/\n", ("docker", DK_V1_FS)),
    # docker in docker: the innermost container is the process's
    (f"0::/docker/{DK_V1_FS}/docker/{DK_V2}\n", ("docker", DK_V2)),
    # a kind node (a Docker container) running a pod
    (f"0::/system.slice/docker-{DK_V2}.scope/{KIND_POD}/cri-containerd-{CD_SANDBOX}.scope\n",
     ("containerd", CD_SANDBOX)),
    (f"0::/kubepods/besteffort/pod3e9ee100-e307-4474-8c4c-e97428ebaacd/{CD_V1}\n",
     ("containerd", CD_V1)),  # bare: the metadata decides, containerd when none
    (f"5:pids:/kubepods/burstable/podc3b1/crio-{CRIO_CTR}\n", ("cri-o", CRIO_CTR)),
    (f"0::/machine.slice/machine-libpod_pod_0a1b.slice/libpod-{PM_ROOTFUL}.scope/container\n",
     ("podman", PM_ROOTFUL)),
    (f"0::/system.slice/nerdctl-{NERD_SD}.scope\n", ("containerd", NERD_SD)),
    (f"0::/system.slice/containerd.service/kubepods-pod87a1.slice:cri-containerd:{CD_V1}\n",
     ("containerd", CD_V1)),
])
def test_container_in_cgroup(text: str, expected: tuple[str, str]) -> None:
    assert container_in_cgroup(text) == expected


@pytest.mark.parametrize("text", [
    "", "garbage", "0::/\n", "0::/init.scope\n", "0::/system.slice/sshd.service\n",
    "0::/system.slice/containerd.service\n",
    f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1e59.slice/"
    f"crio-conmon-{CRIO_CTR}.scope\n",
    f"0::/machine.slice/libpod-conmon-{PM_ROOTFUL}.scope\n",
    "0::/user.slice/user-1000.slice/user@1000.service/user.slice/podman-6696.scope\n",
    f"0::/system.slice/docker-{DK_V2[:60]}.scope\n",  # not a whole id
    f"0::/system.slice/docker-{DK_V2.upper()}.scope\n",
    "0::/default/redis\n",  # an id of ctr's: only containerd's task directory can tell
])
def test_no_container_in_cgroup(text: str) -> None:
    assert container_in_cgroup(text) is None


def test_docker_roots_from_command_lines() -> None:
    """--data-root and --data-root=, the old -g; a process that only mentions dockerd is none."""
    assert docker_roots(HOSTS / "flags" / "proc", HOSTS / "none" / "etc") == (
        Path("/x"), Path("/srv/docker-b"), Path("/var/lib/docker-1.12"))


def test_docker_roots_a_process_without_comm_by_its_command_line(tmp_path: Path) -> None:
    shutil.copytree(HOSTS / "flags" / "proc", tmp_path / "proc")
    for comm in (tmp_path / "proc").glob("*/comm"):
        comm.unlink()
    (tmp_path / "proc" / "\u00b2").mkdir()  # a digit to str.isdigit, not to int()
    assert docker_roots(tmp_path / "proc", HOSTS / "none" / "etc") == (
        Path("/x"), Path("/srv/docker-b"), Path("/var/lib/docker-1.12"))


def test_docker_roots_from_daemon_json() -> None:
    assert docker_roots(HOSTS / "config" / "proc", HOSTS / "config" / "etc") == (
        Path("/mnt/docker-data"),)
    # no dockerd running: the configured root all the same
    assert docker_roots(HOSTS / "none" / "proc", HOSTS / "config" / "etc") == (
        Path("/mnt/docker-data"),)


def test_docker_roots_from_the_config_file_dockerd_was_given() -> None:
    assert docker_roots(HOSTS / "configfile" / "proc", HOSTS / "configfile" / "etc") == (
        Path("/srv/other"),)


def test_docker_roots_default() -> None:
    assert docker_roots(HOSTS / "none" / "proc", HOSTS / "none" / "etc") == (
        Path("/var/lib/docker"),)
    assert docker_roots(HOSTS / "missing", HOSTS / "missing") == (Path("/var/lib/docker"),)


def test_docker_roots_rootless() -> None:
    assert docker_roots(HOSTS / "rootless" / "proc", HOSTS / "none" / "etc") == (
        Path("/home/alice/.local/share/docker"),)


def test_docker_roots_found_for_owner_of(proc: Path) -> None:
    assert docker_roots(proc, HOSTS / "none" / "etc") == (OWNERS / "docker",)


def test_label() -> None:
    assert Owner("docker", DK_V2, "web1").label == "docker:web1"
    assert Owner("docker", DK_V2).label == "docker:8ad700d1f711"
    assert Owner("containerd", CD_SANDBOX, "", "nginx-7d9f", "default").label == \
        "k8s:default/nginx-7d9f"
    assert Owner("cri-o", CRIO_CTR, "redis", "web-0").label == "k8s:web-0"
    assert Owner("podman", PM_ROOTFUL, "web").label == "podman:web"


def test_options_of_command_lines() -> None:
    args = ["/usr/bin/conmon", "-c", "abc", "-nweb", "--bundle=/b", "--exit-command-arg", "-c"]
    assert ownersmeta.option(args, "-c", "--cid") == "abc"
    assert ownersmeta.option(args, "-n", "--name") == "web"
    assert ownersmeta.option(args, "-b", "--bundle") == "/b"
    assert ownersmeta.option(args, "-p") == ""
    assert ownersmeta.option(["dockerd", "--data-root"], "--data-root") == ""
    assert ownersmeta.option(["-g", "/x"], "-g") == ""  # argv[0] is the program
