from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from synwatch.lines.timeparse import (
    from_epoch_micros,
    parse_bsd,
    parse_ctime,
    parse_iso,
    parse_journal_full,
)

UTC = timezone.utc
CET = timezone(timedelta(hours=1))
NOW = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)


def test_bsd_dates_take_the_year_of_now_or_the_one_before() -> None:
    assert parse_bsd("Jan  2 09:00:00", NOW, UTC) == datetime(2026, 1, 2, 9, tzinfo=UTC)
    # a December line read on January 2nd is from last year
    assert parse_bsd("Dec 31 23:59:59", NOW, UTC) == datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert parse_bsd("Jan 02 09:00:00.123456789", NOW, CET) == datetime(
        2026, 1, 2, 9, 0, 0, 123456, tzinfo=CET)


@pytest.mark.parametrize("text", ["Feb 30 00:00:00", "Foo  1 00:00:00", "Jan  1 25:00:00"])
def test_impossible_bsd_dates_are_none(text: str) -> None:
    assert parse_bsd(text, NOW, UTC) is None


@pytest.mark.parametrize(("text", "want"), [
    ("2024-03-07T09:17:14+0000", datetime(2024, 3, 7, 9, 17, 14, tzinfo=UTC)),
    ("2024-03-07T09:17:14.123456789+01:00", datetime(2024, 3, 7, 9, 17, 14, 123456, tzinfo=CET)),
    ("2024-03-07T09:17:14Z", datetime(2024, 3, 7, 9, 17, 14, tzinfo=UTC)),
    ("2024-03-07T09:17:14", datetime(2024, 3, 7, 9, 17, 14, tzinfo=CET)),
])
def test_iso(text: str, want: datetime) -> None:
    assert parse_iso(text, NOW, CET) == want


def test_ctime_and_journal_full_and_epoch() -> None:
    assert parse_ctime("Tue Mar  3 03:03:03 2015", NOW, UTC) == datetime(2015, 3, 3, 3, 3, 3,
                                                                          tzinfo=UTC)
    assert parse_ctime("Ср мар 10 20:19:39 2021", NOW, UTC) is None
    assert parse_journal_full("Wed 2022-06-01 12:00:00 CET", NOW, CET) == datetime(
        2022, 6, 1, 12, tzinfo=CET)
    assert parse_journal_full("Wed 2022-06-01 12:00:00 +0200", NOW, UTC).utcoffset() == \
        timedelta(hours=2)
    assert from_epoch_micros("1747767878271828") == datetime(2025, 5, 20, 19, 4, 38, 271828,
                                                             tzinfo=UTC)
    assert from_epoch_micros("x") is None
