"""Typed errors and the exit codes they end in.

Every error a user can cause carries what it was about (``subject``: a file, a key, a command)
and why; the CLI prints ``synwatch: <subject>: <why>`` and exits with the error's status.
"""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0
    FAILURE = 1  # a runtime failure: the store, the kernel, a firewall tool
    USAGE = 2  # bad command line or bad configuration


class SynwatchError(Exception):
    """Base of all errors synwatch reports without a traceback."""

    status: ExitStatus = ExitStatus.FAILURE

    def __init__(self, subject: str, why: str) -> None:
        super().__init__(f"{subject}: {why}")
        self.subject = subject
        self.why = why


class UsageError(SynwatchError):
    status = ExitStatus.USAGE


class ConfigError(SynwatchError):
    """A configuration file is unreadable or has a bad key or value.

    ``subject`` is ``config <path>``; ``why`` starts with the dotted key where there is one.
    """

    status = ExitStatus.USAGE

    def __init__(self, path: str, key: str | None, why: str) -> None:
        super().__init__(f"config {path}", f"{key}: {why}" if key else why)
        self.path = path
        self.key = key
        self.reason = why  # without the key


class FilterError(SynwatchError):
    """A filter or sink definition in filters/*.toml is malformed (a bug in shipped data)."""


class StoreError(SynwatchError):
    """The database cannot be opened, migrated, read or written."""


class StaleSchema(StoreError):
    """A history of another schema than this synwatch's, opened to read: commands that only
    look never migrate it (the service does at its start)."""


class StoreOutage(StoreError):
    """The history cannot be reached or written for now (a server that does not answer; an
    SQLite file that is locked, on a full or read-only disk, deleted or corrupt): the service
    keeps its writes on the spool (synwatch/store/spool.py) and goes on acting. A plain StoreError
    is a write the history refused for what it was (a bug, not an outage)."""


class SourceUnavailable(SynwatchError):
    """A log source cannot run here (no journal, no permission on /dev/kmsg, ...)."""


class ProbeError(SynwatchError):
    """Kernel state cannot be read (no such namespace, no permission, netlink refused)."""


class NotFound(SynwatchError):
    status = ExitStatus.FAILURE


class CommandError(SynwatchError):
    """An external tool (nft, ufw, ipset, ip) is missing, failed or timed out."""


class ActionFailed(SynwatchError):
    """An action ran and did not achieve what it rendered (a refused notification, a command
    that exited non-zero)."""
