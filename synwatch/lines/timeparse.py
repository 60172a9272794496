"""Timestamps as log sinks print them, read into timezone-aware datetimes.

Pure functions; the current time and the local zone are parameters so that year inference
(syslog dates have no year) is deterministic in tests.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone, tzinfo

_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
_BSD = re.compile(r"([A-Z][a-z]{2}) +(\d{1,2}) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?$")
_CTIME = re.compile(r"[A-Z][a-z]{2} ([A-Z][a-z]{2}) +(\d{1,2}) (\d\d):(\d\d):(\d\d) (\d{4})$")
_FULL = re.compile(r"[A-Z][a-z]{2} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:\.(\d{1,9}))? (\S+)$")
_ISO_OFFSET = re.compile(r"([+-]\d\d)(\d\d)$")
_UNIX = re.compile(r" *(\d{1,12})\.(\d{1,9})$")


def _micros(frac: str | None) -> int:
    return int((frac or "0")[:6].ljust(6, "0"))


def parse_bsd(text: str, now: datetime, tz: tzinfo) -> datetime | None:
    """``Mar  7 09:17:14`` -> the most recent such moment not more than a day after ``now``."""
    m = _BSD.match(text)
    if not m or m.group(1) not in _MONTHS:
        return None
    month, day = _MONTHS[m.group(1)], int(m.group(2))
    year = now.astimezone(tz).year
    try:
        value = datetime(year, month, day, int(m.group(3)), int(m.group(4)), int(m.group(5)),
                         _micros(m.group(6)), tzinfo=tz)
        if value > now + timedelta(days=1):  # December's log read in January
            value = value.replace(year=year - 1)
    except ValueError:  # Feb 29 in the wrong year, day 31 in a short month
        return None
    return value


def parse_iso(text: str, now: datetime, tz: tzinfo) -> datetime | None:
    """RFC 3339 / ISO 8601, with ``+0000`` (journalctl before systemd 255) as well as ``+00:00``."""
    text = _ISO_OFFSET.sub(r"\1:\2", text.replace("Z", "+00:00"))
    if "." in text:  # fromisoformat takes at most 6 fraction digits before 3.11
        head, _, rest = text.partition(".")
        digits = re.match(r"\d+", rest)
        if digits:
            text = f"{head}.{digits.group(0)[:6].ljust(6, '0')}{rest[digits.end():]}"
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=tz)


def parse_ctime(text: str, now: datetime, tz: tzinfo) -> datetime | None:
    """``Tue Mar  3 03:03:03 2015`` (dmesg -T, logread). Non-English dates give None."""
    m = _CTIME.match(text)
    if not m or m.group(1) not in _MONTHS:
        return None
    try:
        return datetime(int(m.group(6)), _MONTHS[m.group(1)], int(m.group(2)), int(m.group(3)),
                        int(m.group(4)), int(m.group(5)), tzinfo=tz)
    except ValueError:
        return None


def parse_journal_full(text: str, now: datetime, tz: tzinfo) -> datetime | None:
    """``Wed 2022-06-01 12:00:00 UTC`` (journalctl -o short-full). Zones other than UTC or a
    numeric offset are taken to be the local zone, which is what journalctl printed."""
    m = _FULL.match(text)
    if not m:
        return None
    zone_name = m.group(3)
    zone: tzinfo = tz
    if zone_name in ("UTC", "GMT", "Z"):
        zone = timezone.utc
    elif re.fullmatch(r"[+-]\d\d:?\d\d", zone_name):
        sign = -1 if zone_name[0] == "-" else 1
        digits = zone_name[1:].replace(":", "")
        zone = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    try:
        base = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None
    return base.replace(microsecond=_micros(m.group(2)), tzinfo=zone)


def parse_unix(text: str, now: datetime, tz: tzinfo) -> datetime | None:
    """``1796552650.050143`` (journalctl -o short-unix: seconds since the epoch, UTC, with
    microseconds; ``%10`` wide, so space-padded before 2001; man journalctl)."""
    m = _UNIX.match(text)
    if not m:
        return None  # more digits than any time a datetime can hold
    return from_epoch_micros(int(m.group(1)) * 1_000_000 + _micros(m.group(2)))


def parse_none(text: str, now: datetime, tz: tzinfo) -> datetime | None:
    return None


def from_epoch_micros(value: str | int) -> datetime | None:
    """journald's __REALTIME_TIMESTAMP (microseconds since the epoch) in UTC."""
    if isinstance(value, str) and (len(value) > 20 or not value.isdigit()):
        return None  # more digits than any time a datetime can hold (and int() would choke)
    try:
        micros = int(value)
        return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=micros)
    except (TypeError, ValueError, OverflowError):
        return None


TimeParser = Callable[[str, datetime, tzinfo], "datetime | None"]

TIME_FORMATS: dict[str, TimeParser] = {
    "bsd": parse_bsd,
    "iso": parse_iso,
    "ctime": parse_ctime,
    "journal-full": parse_journal_full,
    "unix": parse_unix,
    "none": parse_none,
}
