"""Probes: the kernel's own state, per network namespace (counters, sysctls, sockets), and what
says which of the optional ones run (as ``synwatch.sources.plan_sources`` does for sources)."""

from __future__ import annotations

from synwatch.config import Config


def accounting_off(config: Config, *, euid: int, nft: bool) -> str | None:
    """Why the SYN accounting set (an nftables set counting SYNs per prefix) stays off, or None
    to set it up. ``auto`` runs it only where it can and may change the firewall: live, as
    root, with nft installed."""
    if config.accounting is False:
        return "incident.accounting = false"
    if config.accounting == "auto":
        return ("actions are a dry run" if config.dry_run else "not root" if euid != 0
                else "nft is not installed" if not nft else None)
    return None


def sampler_off(config: Config) -> str | None:
    """Why the SYN sampler stays off before it is tried, or None to open it (opening may fail
    for the machine's own reasons, said then)."""
    return "incident.sampler = false" if config.sampler is False else None
