"""The one wait of the suite: a condition looked at until it holds, never a fixed sleep."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def eventually(check: Callable[[], T], what: str, timeout: float = 20, *,
               every: float = 0.1, seen: Callable[[], object] | None = None,
               alive: subprocess.Popen[Any] | None = None) -> T:
    """``check()`` until it gives something true, which is returned; an AssertionError naming
    ``what`` (and ``seen()``, what there was instead) after ``timeout`` seconds, or at once
    when the process ``alive`` has ended meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"no {what}: the process ended ({alive.returncode})"
                                 + (f"\n{seen()}" if seen is not None else ""))
        if time.monotonic() >= deadline:
            raise AssertionError(f"no {what} within {timeout:g} s"
                                 + (f"\n{seen()}" if seen is not None else ""))
        time.sleep(every)
