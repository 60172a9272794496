"""Log sources: which ones to run here, and why.

The sources themselves (journald, files, /dev/kmsg) stream LogRecords and raise on failure; the
service restarts them. This module only decides, from the config and the machine, which to use.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synwatch.config import Config
from synwatch.lines.catalogue import Catalogue
from synwatch.sources.base import Source, journal_reader

JOURNAL_DIRS = (Path("/run/log/journal"), Path("/var/log/journal"))
# journald's native socket: there while journald runs (systemd-journald.service(8))
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")


@dataclass(frozen=True, slots=True)
class SourcePlan:
    name: str  # journald | kmsg | file:<path>
    reason: str


def journal_present(dirs: tuple[Path, ...] = JOURNAL_DIRS) -> Path | None:
    for d in dirs:
        if d.is_dir() and any(d.rglob("*.journal")):
            return d
    return None


def plan_sources(
    config: Config, kmsg_path: str = "/dev/kmsg", journal_dirs: tuple[Path, ...] = JOURNAL_DIRS,
    journal_socket: Path = JOURNAL_SOCKET,
) -> tuple[list[SourcePlan], list[str]]:
    """The sources to run and, separately, what was left out and why (for the log)."""
    plans: list[SourcePlan] = []
    skipped: list[str] = []
    journal_dir = journal_present(journal_dirs)
    reader = journal_reader()
    if config.journald is True:
        plans.append(SourcePlan("journald", f"configured (reader: {reader or 'none found'})"))
    elif config.journald == "auto":
        if journal_dir and reader and journal_socket.exists():
            plans.append(SourcePlan("journald",
                                    f"auto: journal in {journal_dir}, reader: {reader}"))
        else:
            skipped.append("journald: auto: " + (
                "no journal files under /run/log/journal or /var/log/journal" if not journal_dir
                else "no systemd-python and no journalctl" if not reader
                # journal files left by a journald that is not running (a container, a
                # rescue shell): nothing new will reach them, the kernel's ring will
                else f"journald is not running (no {journal_socket})"))
    kmsg_readable = os.access(kmsg_path, os.R_OK)
    if config.kmsg is True:
        plans.append(SourcePlan("kmsg", "configured"))
    elif config.kmsg == "auto":
        if any(p.name == "journald" for p in plans):
            skipped.append("kmsg: auto: journald already carries kernel messages")
        elif kmsg_readable:
            plans.append(SourcePlan("kmsg", f"auto: no journal, {kmsg_path} is readable"))
        else:
            skipped.append(f"kmsg: auto: {kmsg_path} is not readable (run as root)")
    plans.extend(SourcePlan(f"file:{f}", "configured (untrusted: any user can write kernel-like "
                                         "lines to a text log)") for f in config.files)
    return plans, skipped


def build_sources(plans: list[SourcePlan], catalogue: Catalogue,
                  position_of: Callable[[str], dict[str, Any] | None]) -> list[Source]:
    """The source objects for ``plans``, each resuming from its stored position."""
    from synwatch.sources.files import FileSource  # noqa: PLC0415
    from synwatch.sources.journald import JournaldSource  # noqa: PLC0415
    from synwatch.sources.kmsg import KmsgSource  # noqa: PLC0415

    sources: list[Source] = []
    for plan in plans:
        position = position_of(plan.name)
        if plan.name == "journald":
            sources.append(JournaldSource(catalogue, position))
        elif plan.name == "kmsg":
            sources.append(KmsgSource(catalogue, position=position))
        else:
            sources.append(FileSource(catalogue, plan.name.removeprefix("file:"), position))
    return sources
