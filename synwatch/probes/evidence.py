"""What one probe step hands to detection: the namespace's kernel state, with the SYN
accounting set's counts and the sampler's SYNs where those run."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from synwatch.probes.sampled import SynSample
from synwatch.probes.snapshot import Snapshot


@dataclass(frozen=True, slots=True)
class Evidence:
    """One probe of a network namespace: its kernel state at ``at``."""

    at: datetime
    snapshot: Snapshot
    # SYNs per (listener port, source prefix) from the nftables accounting set, cumulative;
    # None where there is no set.
    accounting: dict[tuple[int, str], int] | None = None
    # SYNs sampled from packets since the previous probe; None where there is no sampler.
    sampled: SynSample | None = None
