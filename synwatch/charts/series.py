"""One incident as the series and markers of its picture, from the history alone (its timeline
points, the build-up kept in its state, its action runs and its bans), so the picture is the
same live, after the fact and on any node of a fleet. Pure: the renderers (charts/png.py,
charts/terminal.py) draw what this gives.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from synwatch.records import ActionRun, Ban, Incident, StoredPoint, endpoint

COOKIES = "syncookies"


@dataclass(frozen=True, slots=True)
class Series:
    t: tuple[float, ...]  # seconds from the opening (the build-up is negative)
    v: tuple[float | None, ...]

    @property
    def peak(self) -> tuple[float, float] | None:
        """(t, value) of the highest point, None when there is none above zero."""
        best = max(((v, -t) for t, v in zip(self.t, self.v, strict=True) if v),
                   default=None)  # the first of equal highs
        return None if best is None else (-best[1], best[0])


@dataclass(frozen=True, slots=True)
class Marker:
    t: float
    kind: str  # "phase" | "cookies" | "ban" | "ban-end" | "closed"
    label: str


@dataclass(frozen=True, slots=True)
class Picture:
    title: str
    subtitle: str  # the first recommendation, wrapped
    opened_at: datetime
    span: tuple[float, float]  # the time axis, seconds from the opening
    syns_full: Series  # SYNs a second that found the queue full (cookies sent or dropped)
    syns_all: Series  # the packet sampler's estimate of every SYN a second to the port
    syn_recv: Series
    accept_queue: Series  # connections waiting for accept(): real load that is not served
    backlog: Series  # the listener's effective backlog: min(backlog, somaxconn)
    cookies_sent: Series
    cookies_recv: Series  # validated: near zero while sent is high is the picture of spoofing
    prefixes: tuple[tuple[str, float], ...]  # the top source prefixes' shares of the flood
    markers: tuple[Marker, ...]


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)


def _seconds(at: datetime, start: datetime) -> float:
    return round((_aware(at) - _aware(start)).total_seconds(), 3)


def _number(value: object) -> float:
    """A value of a row anyone who can write the history wrote: a number, else 0."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else 0.0


def _value(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _rate(point: StoredPoint, name: str) -> float | None:
    return _value(point.rates.get(name)) if isinstance(point.rates, dict) else None


def _markers(incident: Incident, runs: Sequence[ActionRun], bans: Sequence[Ban],
             now: datetime) -> list[Marker]:
    start = incident.opened_at
    marks = []
    for p in incident.phases:
        try:
            at = datetime.fromisoformat(str(p.get("at")))
        except (TypeError, ValueError, AttributeError):
            continue
        marks.append(Marker(_seconds(at, start), "phase", str(p.get("verdict", "?"))))
    cookies = [r for r in runs if r.action == COOKIES and r.status == "done"]
    for r in cookies:
        raised = "=1 " in r.rendered.split("#")[0] + " "
        marks.append(Marker(_seconds(r.at, start), "cookies",
                            "cookies raised" if raised else "cookies restored"))
    for b in bans:
        marks.append(Marker(_seconds(b.created_at, start), "ban", f"ban {b.prefix}"))
        # lifted by hand or expired by now: drawn where it falls within the incident's time,
        # named in the markers' line wherever it falls (an hour's ban ends long after)
        if b.removed_at is not None:
            marks.append(Marker(_seconds(b.removed_at, start), "ban-end", f"{b.prefix} lifted"))
        elif b.expires_at <= now:
            marks.append(Marker(_seconds(b.expires_at, start), "ban-end",
                                f"{b.prefix} expired"))
    if incident.closed_at is not None:
        marks.append(Marker(_seconds(incident.closed_at, start), "closed", "closed"))
    return sorted(marks, key=lambda m: m.t)


def _shortened(text: str, width: int = 100, lines: int = 2) -> str:
    """The recommendation in at most ``lines`` lines (`incidents show` has all of it)."""
    wrapped = textwrap.wrap(text, width)
    if len(wrapped) > lines:
        wrapped = [*wrapped[:lines - 1], wrapped[lines - 1][:width - 1] + "…"]
    return "\n".join(wrapped)


def picture(incident: Incident, samples: Sequence[StoredPoint], runs: Sequence[ActionRun],
            bans: Sequence[Ban], now: datetime) -> Picture:
    """The picture of ``incident``: ``bans`` are the history's bans of it (any node's)."""
    start = incident.opened_at
    points = sorted(samples, key=lambda s: s.at)  # the build-up before the opening first
    t = tuple(_seconds(p.at, start) for p in points)

    def series(values: list[float | None]) -> Series:
        return Series(t, tuple(values))

    end = incident.closed_at or now
    own = [b for b in bans if b.incident_id == incident.id]
    markers = _markers(incident, runs, own, now)
    last = max([*t, _seconds(end, start), *(m.t for m in markers if m.kind != "ban-end")],
               default=0.0)
    first = min([*t, 0.0])
    where = endpoint(incident.address, incident.port) if incident.port else "the host"
    place = f"{incident.host}{f' ({incident.netns})' if incident.netns else ''}"
    title = _shortened(f"{incident.verdict}: incident {incident.id}, {where} on {place}", 64)
    advice = incident.recommendations[0] if incident.recommendations else ""
    return Picture(
        title=title, subtitle=_shortened(advice), opened_at=start,
        span=(first, max(last, first + 1.0)),
        syns_full=series([_rate(p, "syns_overflowed") for p in points]),
        syns_all=series([_rate(p, "syns_sampled") for p in points]),
        syn_recv=series([_value(p.syn_recv) for p in points]),
        accept_queue=series([_value(p.accept_queue) for p in points]),
        backlog=series([_value(p.backlog) for p in points]),
        cookies_sent=series([_rate(p, "cookies_sent") for p in points]),
        cookies_recv=series([_rate(p, "cookies_recv") for p in points]),
        prefixes=tuple((str(p.get("prefix", "?")), min(1.0, max(0.0, _number(p.get("share")))))
                       for p in incident.top_prefixes[:6] if isinstance(p, dict)),
        markers=tuple(markers))
