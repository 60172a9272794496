"""One sysctl of a network namespace, read or written: /proc/sys opened from a thread inside
it (net.* entries are the namespace's own), so the rest of synwatch never leaves its own."""

from __future__ import annotations

from pathlib import Path

from synwatch.system.netns import in_netns

SYSCTL_DIR = Path("/proc/sys")


def _path(name: str) -> Path:
    return SYSCTL_DIR / name.replace(".", "/")


def read_sysctl(netns: str, name: str) -> int:
    """Raises OSError (no such sysctl) or ValueError (not a number)."""
    return in_netns(netns, lambda: int(_path(name).read_text().split()[0]))


def sysctl_or_none(netns: str, name: str) -> int | None:
    """The value, or None where the sysctl is not there (a module not loaded)."""
    try:
        return read_sysctl(netns, name)
    except (OSError, ValueError, IndexError):
        return None


def write_sysctl(netns: str, name: str, value: int) -> None:
    in_netns(netns, lambda: _path(name).write_text(f"{value}\n"))
