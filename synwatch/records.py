"""Frozen records that cross the boundaries between steps of the data flow.

sources -> LogRecord -> filters -> KernelEvent -> correlate ...
No I/O and no ORM here; every stage reads these and makes new ones, never mutates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

EventKind = Literal["syn_flood", "drop_open_request", "conntrack_full"]
Mode = Literal["cookies", "drop"]


def endpoint(address: str | None, port: int | None) -> str:
    """A listener as people write it: 0.0.0.0:80, [::]:443, port 80, an unknown listener."""
    if port is None:
        return "an unknown listener"
    if address is None:
        return f"port {port}"
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass(frozen=True, slots=True)
class Place:
    """What a watched network namespace is, for advice that fits it: ours, an `ip netns` one,
    a container's (its runtime, and its Kubernetes pod when it is one), or a process's."""

    kind: Literal["own", "netns", "container", "process"] = "own"
    runtime: str = ""  # docker | containerd | cri-o | podman
    pod: str = ""  # "namespace/name" of a Kubernetes pod


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One log entry with its envelope taken apart.

    ``message`` is the kernel's own text. ``trusted`` is true only where the record itself proves
    it came from the kernel (journal _TRANSPORT=kernel with facility 0, a kmsg record of facility 0)
    *and* the reader is allowed to believe it (a text file never is).
    """

    line: str
    sink: str
    message: str
    time: datetime | None
    host: str | None
    trusted: bool
    source: str = "scan"
    # Where the record sits in its source (journal cursor, kmsg sequence, file offset): sources use
    # it to resume and to record every entry exactly once.
    position: str | None = None


@dataclass(frozen=True, slots=True)
class KernelEvent:
    """A kernel message a filter recognised, with what it says."""

    kind: EventKind
    family: int | None
    address: str | None  # listener address as printed, without brackets (6.2+ only)
    port: int | None  # listener port; None where not printed or redacted
    mode: Mode | None
    source_ip: str | None  # drop_open_request only: the client address, compressed
    source_port: int | None
    filter: str
    pattern: str
    record: LogRecord

    @property
    def time(self) -> datetime | None:
        return self.record.time

    @property
    def trusted(self) -> bool:
        return self.record.trusted


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """A kernel event as the store has it: the correlator links incidents to ``id``."""

    id: int
    event: KernelEvent
    historical: bool = False


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    """One point of an incident's timeline: the listener and the counter rates at one probe."""

    at: datetime
    syn_recv: int | None
    accept_queue: int | None
    backlog: int | None
    rates: dict[str, float]  # counter deltas per second over the last probe interval
    top_prefixes: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class BanTarget:
    """One block to ban (or one address to rate limit), the blocks at the ban prefix length it
    was joined from (tried one by one where the whole is refused), and why this width, in
    numbers (synwatch.detect.bantargets)."""

    prefix: str
    syns: int
    share: float  # of all the SYNs the evidence counted
    parts: tuple[str, ...]
    why: str


IncidentStatus = Literal["open", "closed"]
Trigger = Literal["log", "counters", "half_open"]
Verdict = Literal["capacity", "concentrated", "spoofed", "unknown"]


@dataclass(frozen=True, slots=True)
class IncidentChange:
    """An incident opened, updated or closed by the correlator, in full."""

    change: Literal["opened", "updated", "closed"]
    serial: int  # the correlator's handle; the service maps it to the store's incident id
    incident_id: int | None
    host: str
    netns: str
    address: str | None
    port: int | None
    family: int | None
    status: IncidentStatus
    verdict: Verdict
    trigger: Trigger
    opened_at: datetime
    closed_at: datetime | None
    first_evidence_at: datetime | None
    detected_at: datetime
    peak_syn_recv: int
    top_prefixes: tuple[tuple[str, int, float, int], ...]  # prefix, count, share, completed
    recommendations: tuple[str, ...]
    reasons: tuple[str, ...]
    state: dict[str, Any]  # the tally, phases and last activity, to resume after a restart
    sample: TimelinePoint | None = None
    # an opening's: its listener's probes before it (its build-up), written as timeline points
    earlier: tuple[TimelinePoint, ...] = ()
    event_ids: tuple[int, ...] = field(default=())  # events to link to the incident
    bans: tuple[BanTarget, ...] = ()  # what a ban takes (concentrated only)
    limits: tuple[BanTarget, ...] = ()  # addresses that flood and complete: rate limited


# -- what the history returns (synwatch/store): records, never ORM rows -------------------------


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """A kernel event as the history keeps it."""

    id: int
    time: datetime | None  # when the kernel (or the log) says it happened
    recorded_at: datetime
    source: str  # journald | kmsg | file:<path>
    trusted: bool
    historical: bool  # imported from old logs
    kind: str
    family: int | None
    address: str | None
    port: int | None
    mode: str | None
    source_ip: str | None
    source_port: int | None
    host: str | None
    message: str
    pattern: str
    dedup_key: str | None
    incident_id: int | None


@dataclass(frozen=True, slots=True)
class Incident:
    """An incident as the history keeps it (``state`` is what the correlator resumes from:
    its tally, phases and the verdict's reasons)."""

    id: int
    host: str
    netns: str
    address: str | None
    port: int | None
    family: int | None
    status: str
    verdict: str
    trigger: str
    opened_at: datetime
    closed_at: datetime | None
    first_evidence_at: datetime | None
    detected_at: datetime | None
    peak_syn_recv: int
    top_prefixes: tuple[dict[str, Any], ...]  # {"prefix", "count", "share", "completed"}
    recommendations: tuple[str, ...]
    state: dict[str, Any]

    @property
    def reasons(self) -> list[str]:
        return list(self.state.get("reasons", []))

    @property
    def phases(self) -> list[dict[str, Any]]:
        return list(self.state.get("phases", []))


ActionStatus = Literal["done", "failed", "dry-run", "skipped"]


@dataclass(frozen=True, slots=True)
class ActionRun:
    """One action rendered or run for an incident, with its outcome; ``id`` is None until
    the history has it."""

    incident_id: int | None
    action: str
    target: str
    status: str
    at: datetime
    rendered: str = ""
    detail: str = ""
    retry_at: datetime | None = None  # a failed run that will be tried again: when
    id: int | None = None
    host: str = ""  # the node that ran it ("" = the store's own node)


@dataclass(frozen=True, slots=True)
class Ban:
    """A source prefix banned in a firewall backend; ``id`` is None until the history has it."""

    prefix: str
    backend: str
    netns: str
    incident_id: int | None
    created_at: datetime
    expires_at: datetime
    removed_at: datetime | None = None
    times_banned: int = 1
    id: int | None = None
    host: str = ""  # the node whose firewall holds it ("" = the store's own node)
    scope: str = "local"  # local | fleet: a fleet ban is copied by every node of the store
    origin_id: int | None = None  # a fleet ban's copy: the ban decided on the other node


@dataclass(frozen=True, slots=True)
class StoredPoint:
    """A timeline point as the history keeps it."""

    id: int
    incident_id: int
    at: datetime
    syn_recv: int | None
    accept_queue: int | None
    backlog: int | None
    rates: dict[str, float]
    top_prefixes: tuple[tuple[str, int], ...]


# how a recommendation says that an application stopped calling accept()
# (synwatch/detect/verdict.py); the history finds those incidents by it
NOT_ACCEPTING = "is not accepting connections"
NOT_ACCEPTING_AFTER = 10.0  # seconds of a full accept queue at every probe: not a burst


@dataclass(frozen=True, slots=True)
class PortHistory:
    """What the history remembers of one port, for `doctor`'s advice: only incidents with a
    verdict count (an unknown one says nothing about the port), and the peak is that of real
    load (capacity incidents), not of floods, which fill any backlog. An application that stopped
    accepting is counted apart: a larger backlog does not help it."""

    port: int
    incidents: int  # with a verdict
    peak_syn_recv: int  # the highest of its capacity incidents
    capacity_incidents: int  # real clients meeting too small a queue
    last_incident_id: int
    not_accepting: int = 0  # capacity incidents whose application stopped calling accept()


@dataclass(frozen=True, slots=True)
class Node:
    """A synwatch that writes to the history (a fleet shares one), from its heartbeat."""

    host: str
    pid: int | None
    started_at: datetime
    seen_at: datetime
    version: str = ""


@dataclass(frozen=True, slots=True)
class NewEvent:
    """What a source hands the store for one matched kernel line."""

    time: datetime | None
    source: str
    trusted: bool
    kind: str
    family: int | None
    address: str | None
    port: int | None
    mode: str | None
    source_ip: str | None
    source_port: int | None
    host: str | None
    message: str
    pattern: str
    dedup_key: str | None = None
    historical: bool = False
