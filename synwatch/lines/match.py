"""Matches the kernel text of a LogRecord against the catalogue's patterns -> KernelEvent.

Pure and cheap; the regexes are anchored at the start of the kernel text.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from synwatch.lines.catalogue import Catalogue, Pattern
from synwatch.lines.sinks import BAD_LINES, LINE_ERRORS
from synwatch.records import KernelEvent, LogRecord, Mode

_MODES: dict[str, Mode] = {
    "Sending cookies": "cookies",
    "Dropping request": "drop",
    "dropping request": "drop",
}


class FieldError(ValueError):
    """The regex matched but a captured field is not what it claims (999.1.1.1, port 70000)."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One pattern tried on one message, for ``test-filter``."""

    pattern: Pattern
    needle_found: bool
    event: KernelEvent | None
    why: str  # why it missed; "" on a hit


def _family(pattern: Pattern, address: str | None, proto: str | None) -> int | None:
    if address is not None:
        return 6 if ":" in address else 4
    if pattern.family is not None:
        return pattern.family
    if proto is not None:
        return 6 if proto.endswith("v6") else 4
    return None


def _port(text: str | None, what: str) -> int | None:
    """A TCP port as printed, bounded before int(): a line of 5,000 digits is a forgery, and
    int() of it raises past Python's 4,300-digit limit (a ValueError nobody expects)."""
    if text is None:
        return None
    if len(text) > 5 or not text.isdigit() or int(text) > 65535:
        raise FieldError(f"{what} {text[:12]}{'...' if len(text) > 12 else ''} is out of range")
    return int(text)


def _event(pattern: Pattern, record: LogRecord, groups: dict[str, str | None]) -> KernelEvent:
    address = groups.get("address")
    if address is not None:
        address = address.strip("[]")
        try:
            ipaddress.ip_address(address)
        except ValueError as exc:
            raise FieldError(f"address {address!r} is not an IP address") from exc
    port = _port(groups.get("port"), "port")
    source_ip = groups.get("source_ip")
    family = _family(pattern, address, groups.get("proto"))
    if source_ip is not None:
        try:
            parsed = ipaddress.ip_address(source_ip)
        except ValueError as exc:
            raise FieldError(f"source {source_ip!r} is not an IP address") from exc
        source_ip, family = str(parsed), parsed.version
    source_port = _port(groups.get("source_port"), "source port")
    action = groups.get("action")
    return KernelEvent(
        kind=pattern.kind, family=family, address=address, port=port,
        mode=_MODES.get(action) if action else None,
        source_ip=source_ip, source_port=source_port,
        filter=pattern.filter, pattern=pattern.id, record=record,
    )


def try_pattern(pattern: Pattern, record: LogRecord) -> Attempt:
    message = record.message
    if pattern.needle not in message:
        return Attempt(pattern, False, None, f"no {pattern.needle!r} in the message")
    m = pattern.regex.match(message)
    if m is None:
        return Attempt(pattern, True, None, "regex does not match")
    try:
        return Attempt(pattern, True, _event(pattern, record, m.groupdict()), "")
    except FieldError as exc:
        return Attempt(pattern, True, None, str(exc))


def match_record(record: LogRecord, catalogue: Catalogue) -> KernelEvent | None:
    """The event of the first pattern that matches, or None (also for a line that makes a
    pattern's field parsing raise: counted and skipped, see sinks.BadLines)."""
    try:
        for pattern in catalogue.patterns:
            if pattern.needle in record.message:
                attempt = try_pattern(pattern, record)
                if attempt.event is not None:
                    return attempt.event
    except LINE_ERRORS as exc:
        BAD_LINES.add(record.source, record.line, exc)
    return None


def explain(record: LogRecord, catalogue: Catalogue) -> list[Attempt]:
    """Every pattern tried on ``record``: what hit, what it extracted, why the others missed."""
    return [try_pattern(p, record) for p in catalogue.patterns]


def event_fields(event: KernelEvent) -> dict[str, object]:
    """The fields a KernelEvent yields, as the scan JSON contract names them."""
    return {
        "kind": event.kind, "family": event.family, "address": event.address,
        "port": event.port, "mode": event.mode, "source_ip": event.source_ip,
        "source_port": event.source_port,
        "time": event.time.isoformat() if event.time else None,
        "trusted": event.trusted,
    }


__all__ = ["Attempt", "FieldError", "event_fields", "explain", "match_record", "try_pattern"]
