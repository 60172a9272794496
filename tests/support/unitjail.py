"""Run a command under the file-system restrictions of the shipped systemd unit, without systemd.

CI has no systemd as PID 1, so `systemd-run -p ProtectSystem=strict` is not there. This does what
systemd.exec(5) says those settings do, in a private mount namespace (``unshare --mount``, whose
mounts vanish with the process, so the host is never touched):

- ``ProtectSystem=strict``: every mount read-only except the API file systems /dev, /proc, /sys;
- ``ReadWritePaths=``: each path bound onto itself first, so it stays writable (a leading ``-``
  means a missing path is skipped, as systemd does);
- ``PrivateTmp=yes``: a fresh tmpfs on /tmp and /var/tmp (with the checkout bound back into it
  when it was cloned there: the package's own code lives in /opt).

A bind mount inherits the read-only flag of the mount it comes from (the kernel's clone_mnt()
copies mnt_flags), which is why `ip netns exec`'s bind of /etc/netns/NS/x over /etc/x is
read-only unless /etc/netns is writable: the jail reproduces that too, because it is the kernel
doing it. Run as ``python -m tests.support.unitjail UNIT -- ARGV...``.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

API = ("/proc", "/sys", "/dev")
REPO = Path(__file__).resolve().parent.parent


def unit_service(unit: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(unit)
    return parser["Service"]


def writable_paths(unit: Path) -> list[str]:
    return unit_service(unit).get("ReadWritePaths", "").split()


def confined(argv: list[str], unit: Path) -> list[str]:
    """``argv`` wrapped so it runs under ``unit``'s restrictions."""
    return ["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
            "tests.support.unitjail", str(unit), "--", *argv]


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # \040 for a space
        points.append(point)
    return points


def _under(path: str, roots: tuple[str, ...] | list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _mount(*args: str, pass_fds: tuple[int, ...] = ()) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, pass_fds=pass_fds)


def enter(unit: Path) -> None:
    service = unit_service(unit)
    if service.get("ProtectSystem") != "strict":
        raise SystemExit(f"unitjail: {unit} does not say ProtectSystem=strict")
    # systemd creates the StateDirectory= before it mounts; a test may not create it on the host
    state = [f"/var/lib/{d}" for d in service.get("StateDirectory", "").split()]
    writable = []
    for entry in writable_paths(unit):
        path = entry.lstrip("-")
        if not Path(path).exists():
            if entry.startswith("-") or path in state:
                continue
            raise SystemExit(f"unitjail: ReadWritePaths={path} does not exist")
        _mount("--bind", path, path)
        writable.append(path)
    for point in _mount_points():
        if _under(point, API) or point in writable:
            continue
        # mounts nested inside a writable path keep their own flags, as under systemd
        if _under(point, writable):
            continue
        subprocess.run(["mount", "-o", "remount,bind,ro", point], check=False,
                       capture_output=True)
    if service.get("PrivateTmp") == "yes":
        # The package runs from /opt; a checkout cloned under /tmp runs from there, and the
        # fresh tmpfs would hide it (its .venv and its code): it is bound back, read-only, as
        # /opt is under ProtectSystem=strict.
        tmps = ("/tmp", "/var/tmp")
        checkout = str(REPO) if _under(str(REPO), tmps) else None
        held = os.open(checkout, os.O_PATH | os.O_DIRECTORY) if checkout else None
        for tmp in tmps:
            _mount("-t", "tmpfs", "tmpfs", tmp)
        if checkout is not None and held is not None:
            Path(checkout).mkdir(parents=True)
            # --no-canonicalize: the magic link is the kernel's to follow, not a path to resolve
            _mount("--no-canonicalize", "--bind", f"/proc/self/fd/{held}", checkout,
                   pass_fds=(held,))
            _mount("-o", "remount,bind,ro", checkout)
            os.close(held)


def main() -> None:
    unit, sep, *argv = sys.argv[1:]
    if sep != "--" or not argv:
        raise SystemExit("usage: python -m tests.support.unitjail UNIT -- ARGV...")
    enter(Path(unit))
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
