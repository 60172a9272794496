"""The one way synwatch runs an external tool: an argv list (never a shell string), an optional
network namespace, a timeout, and a typed error that says what failed and why."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from synwatch.errors import CommandError, ProbeError
from synwatch.system.netns import bound_fd

TIMEOUT = 10.0


def available(tool: str) -> bool:
    return shutil.which(tool) is not None


def run(argv: Sequence[str], *, stdin: str | None = None, netns: str = "",
        timeout: float = TIMEOUT) -> str:
    """Run ``argv`` (inside ``ip netns exec NETNS`` when given; a container's namespace through
    ``nsenter --net=/proc/PID/ns/net``, which keeps our own mounts and /sys); returns its
    stdout."""
    if not argv:
        raise ValueError("empty argv")
    shown = " ".join(argv)
    try:
        fd = bound_fd(netns)  # a container's: entered by the fd checked here
    except ProbeError as exc:
        raise CommandError(shown, exc.why) from exc
    full = (["nsenter", f"--net=/proc/self/fd/{fd}", "--", *argv] if fd is not None
            else ["ip", "netns", "exec", netns, *argv] if netns else list(argv))
    try:
        proc = subprocess.run(full, input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False,
                              pass_fds=(fd,) if fd is not None else ())
    except FileNotFoundError as exc:
        raise CommandError(shown, f"{full[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(shown, f"no answer within {timeout:.0f} s") from exc
    finally:
        if fd is not None:
            os.close(fd)
    if proc.returncode != 0:
        raise CommandError(shown, f"exit status {proc.returncode}: "
                                  f"{reason(proc.stderr or proc.stdout)}")
    return proc.stdout


def reason(output: str) -> str:
    """The line of a tool's error output that says why: the first, except for a Python tool
    (ufw) that died with a traceback, whose last line is the exception."""
    lines = output.strip().splitlines()
    if not lines:
        return "no message"
    return lines[-1] if lines[0].startswith("Traceback (most recent call last)") else lines[0]


@dataclass(frozen=True, slots=True)
class Command:
    """One rendered command: what an action will run, shown before it runs (and instead of
    running it in dry-run mode)."""

    argv: tuple[str, ...]
    stdin: str | None = None
    unless: tuple[str, ...] | None = None  # skip when this succeeds (`iptables -C` before `-I`)
    when: tuple[str, ...] | None = None  # run only when this succeeds (`iptables -C` before `-D`)

    def shown(self) -> str:
        text = shlex.join(self.argv)
        if self.unless:
            text = f"{shlex.join(self.unless)} || {text}"
        if self.when:
            text = f"{shlex.join(self.when)} && {text}"
        if self.stdin is not None:
            text += f" <<'EOF'\n{self.stdin.rstrip()}\nEOF"
        return text


def show(commands: Sequence[Command]) -> str:
    return "\n".join(c.shown() for c in commands)


def execute(commands: Sequence[Command], netns: str = "") -> None:
    """Run rendered commands in order; the first failure raises CommandError."""
    for c in commands:
        if c.when:
            try:
                run(c.when, netns=netns)
            except CommandError:
                continue
        if c.unless:
            try:
                run(c.unless, netns=netns)
            except CommandError:
                pass
            else:
                continue
        run(c.argv, stdin=c.stdin, netns=netns)
