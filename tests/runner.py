"""The whole suite in two pytest processes side by side (scripts/test): the tests that make
namespaces, send floods or need the suite's journald (marked ``kernel`` as they are collected,
tests/conftest.py) one after the other in one, every other test in the second. The kernel tests
share the kernel's log, its printk ratelimit, the one journald socket and the cores a flood
takes, so they never run beside each other; the rest (unit tests, the CLI, the stores) runs
niced, on what CPU they leave.

The first process prints as it goes, the second's output follows when both are done. Exit status:
the worse of the two (pytest's 5, "no tests collected", counts as passed when the other ran
some). Then no lab namespace may be left (``swt-*``, ``swtry-*``), whichever process made it.
With ``-m`` or ``--serial`` in the arguments, one pytest runs everything as given.

Run as ``python -m tests.runner [PYTEST ARGS]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from tests.support.lab import lab_namespaces

NO_TESTS = 5  # pytest.ExitCode.NO_TESTS_COLLECTED


def _pytest(marks: str, args: list[str], part: str, *, nice: int = 0,
            **kw: object) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SYNWATCH_SUITE_PART": part}
    return subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-m", "pytest", "-m", marks,
                             *args], env=env, **kw)  # type: ignore[call-overload]


def main(args: list[str]) -> int:
    if "--serial" in args or "-m" in args:
        args = [a for a in args if a != "--serial"]
        return subprocess.call([sys.executable, "-m", "pytest", *args])
    with tempfile.TemporaryFile() as rest_out:
        # niced: the kernel tests measure rates and wait on probes; the rest takes what CPU
        # they leave (most of it: they mostly wait)
        rest = _pytest("not kernel", args, "rest", nice=19, stdout=rest_out,
                       stderr=subprocess.STDOUT)
        try:
            kernel = _pytest("kernel", args, "kernel").wait()
        finally:
            code_rest = rest.wait()
        rest_out.seek(0)
        sys.stdout.flush()
        sys.stdout.write("\n==== the tests beside the kernel tests ====\n")
        sys.stdout.flush()
        sys.stdout.buffer.write(rest_out.read())
    codes = [c for c in (kernel, code_rest) if c != NO_TESTS] or [NO_TESTS]
    code = max(codes)
    left = lab_namespaces()
    if left:
        sys.stdout.write(f"the tests left network namespaces behind: {left}\n")
        code = code or 1
    sys.stdout.write(f"kernel tests: exit {kernel}; the others: exit {code_rest}\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
