"""The CLI as a user runs it: a child process, its exit status and output."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class Result:
    code: int
    out: str
    err: str


def synwatch(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
             timeout: float = 60) -> Result:
    """Run the installed CLI as a user would, in a child process."""
    full_env = {**os.environ, "TZ": "UTC", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "synwatch", *args], capture_output=True,
                          text=True, env=full_env, input=stdin, timeout=timeout, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def cli_commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every command the CLI takes, as "incidents show"."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = cli_commands(sub, f"{prefix}{name} ")
                out.extend(nested or [f"{prefix}{name}"])
    return out
