"""The one way synwatch runs an external tool: an argv list (never a shell string), an optional
network namespace, a timeout, and a typed error that says what failed and why."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from synwatch.errors import CommandError

TIMEOUT = 10.0


def available(tool: str) -> bool:
    return shutil.which(tool) is not None


def run(argv: Sequence[str], *, stdin: str | None = None, netns: str = "",
        timeout: float = TIMEOUT) -> str:
    """Run ``argv`` (inside ``ip netns exec NETNS`` when given); returns its stdout."""
    if not argv:
        raise ValueError("empty argv")
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    shown = " ".join(argv)
    try:
        proc = subprocess.run(full, input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise CommandError(shown, f"{full[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(shown, f"no answer within {timeout:.0f} s") from exc
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise CommandError(shown, f"exit status {proc.returncode}: "
                                  f"{why[0] if why else 'no message'}")
    return proc.stdout
