"""Stream ids (``cefmp4.domain.ids.stream_id``): time-ordered and unique.

The id is the first component of the object key, so S3 listings come out in
recording order only if ids sort like the times they were made at; and two
replicas minting ids at the same millisecond must still not collide.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from cefmp4.domain.ids import stream_id
from tests.properties import examples

ID_RE = re.compile(r"^\d{8}T\d{9}Z-[0-9a-f]{12}$")

# Four-digit years only: strftime does not zero-pad years below 1000.
aware_times = st.datetimes(
    min_value=datetime(2000, 1, 2),
    max_value=datetime(9998, 12, 30),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
    ),
)


def floor_ms(t: datetime) -> datetime:
    t = t.astimezone(UTC)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def test_format() -> None:
    t = datetime(2026, 11, 24, 1, 37, 9, 123999, tzinfo=UTC)
    assert stream_id(t, bytes.fromhex("9f1c2a4b7d3e")) == "20261124T013709123Z-9f1c2a4b7d3e"


def test_non_utc_time_is_converted_to_utc() -> None:
    # A watcher on a host with a local timezone must mint the same id as one in UTC.
    local = datetime(2026, 11, 24, 2, 37, 9, 123000, tzinfo=timezone(timedelta(hours=1)))
    utc = datetime(2026, 11, 24, 1, 37, 9, 123000, tzinfo=UTC)
    entropy = b"\x00" * 6
    assert stream_id(local, entropy) == stream_id(utc, entropy)


@settings(max_examples=examples(300), deadline=None)
@given(a=aware_times, b=aware_times)
def test_ids_sort_by_time(a: datetime, b: datetime) -> None:
    ia, ib = stream_id(a, os.urandom(6)), stream_id(b, os.urandom(6))
    assert ID_RE.match(ia) and ID_RE.match(ib)
    # Ids made in different milliseconds sort like their times, whatever the
    # random suffix and whatever timezone the caller's clock was in.
    if floor_ms(a) < floor_ms(b):
        assert ia < ib
    elif floor_ms(b) < floor_ms(a):
        assert ib < ia
    else:
        assert ia[:19] == ib[:19]


def test_ids_made_in_one_millisecond_are_unique() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    ids = {stream_id(now, os.urandom(6)) for _ in range(20_000)}
    assert len(ids) == 20_000


def test_sorted_ids_follow_a_sequence_of_times() -> None:
    # Crosses a second, a day and a year boundary: every field of the
    # timestamp carries into the next one and must still sort as text.
    start = datetime(2025, 12, 31, 23, 59, 59, 990000, tzinfo=UTC)
    ids = [stream_id(start + timedelta(milliseconds=i * 7), os.urandom(6)) for i in range(100)]
    assert sorted(ids) == ids
    assert len(set(ids)) == len(ids)
