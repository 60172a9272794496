"""What a test could change on the host itself, to check it left it as it found it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.support.lab import LAB_NAMESPACES


def host_state() -> dict[str, object]:
    """What synwatch or its lab could change on the host itself: its nftables table, the cookies
    mode, network namespaces, the per-namespace /etc and the firewall tools' lock files."""
    table = (os.geteuid() == 0 and shutil.which("nft") is not None
             and subprocess.run(["nft", "list", "table", "inet", "synwatch"],
                                capture_output=True, check=False).returncode == 0)

    def names(folder: str) -> list[str]:
        return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).is_dir() else []

    # the lab tests' own namespaces (swt-, swtry-) come and go in the other process of a split
    # run (tests/runner.py) while this one looks: whether any is left is looked at once all
    # are done; the firewall tools' lock files likewise belong to the kernel tests' process
    state: dict[str, object] = {
        "nft table inet synwatch": table,
        "tcp_syncookies": Path("/proc/sys/net/ipv4/tcp_syncookies").read_text().strip(),
        "/run/netns": [n for n in names("/run/netns") if not n.startswith(LAB_NAMESPACES)],
        "/etc/netns": Path("/etc/netns").exists(),
        "/etc/netns/*": [n for n in names("/etc/netns") if not n.startswith(LAB_NAMESPACES)],
        "/run/ufw.lock": Path("/run/ufw.lock").exists(),
        "/var/lib/synwatch": Path("/var/lib/synwatch").exists(),
        "/run/xtables.lock": Path("/run/xtables.lock").exists()}
    if os.environ.get("SYNWATCH_SUITE_PART") == "rest":
        for kernel_tests_own in ("/etc/netns", "/run/ufw.lock", "/run/xtables.lock"):
            del state[kernel_tests_own]
    return state
