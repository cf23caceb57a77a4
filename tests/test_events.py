"""The event wire format: what goes into the Redis Stream and comes back out.

The log is the system of record and is read by other processes, other versions
of this service and non-Python consumers, so the format is tested here on its
own: a lossless round trip for every event type, a decoder that degrades to
``UnknownEvent`` instead of crashing a consumer loop, and a ``data`` field that
is plain JSON.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cefmp4.domain.events import (
    EVENT_TYPES,
    BytesAvailable,
    Event,
    FileDeleted,
    FileSeen,
    FileTruncated,
    MetadataWritten,
    PartUploaded,
    RetryRequested,
    StreamCompleted,
    StreamFailed,
    StreamIdle,
    UnknownEvent,
    UploadStarted,
    decode,
    encode,
)
from cefmp4.domain.partplan import MAX_PART_SIZE, PartPlan
from tests.properties import examples

ALL_TYPES: list[type[Event]] = [
    FileSeen,
    BytesAvailable,
    UploadStarted,
    PartUploaded,
    StreamIdle,
    StreamCompleted,
    MetadataWritten,
    StreamFailed,
    FileDeleted,
    FileTruncated,
    RetryRequested,
]

AT = datetime(2024, 5, 17, 13, 37, 42, 123456, tzinfo=UTC)

utc_datetimes = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
# NaN and infinities have no JSON spelling (msgspec writes null), so they cannot
# round trip; a duration is always finite or absent.
finite_or_none = st.none() | st.floats(allow_nan=False, allow_infinity=False)


# What a replica records (hypothesis reads no msgspec.Meta bounds).
part_sizes = st.integers(1, MAX_PART_SIZE)
plans = st.none() | st.builds(PartPlan, part_sizes, part_sizes)


def _field_strategy(name: str, tp: Any) -> st.SearchStrategy[Any]:
    if name == "at":
        return utc_datetimes
    if tp == PartPlan | None:
        return plans
    if tp == float | None:
        return finite_or_none
    return st.from_type(tp)


def event_strategy(cls: type[Event]) -> st.SearchStrategy[Event]:
    # Every field is drawn explicitly, including those with defaults
    # (mp4_reason, detail, error): st.builds alone would always leave them at
    # their default and never exercise their encoding.
    fields = {f.name: _field_strategy(f.name, f.type) for f in msgspec.structs.fields(cls)}
    return st.builds(cls, **fields)


any_event = st.one_of([event_strategy(cls) for cls in ALL_TYPES])


def wire(event: Event, replica: str = "host-1") -> dict[bytes, bytes]:
    """What XREAD hands back for an XADD of ``encode(event)``: bytes keys and values."""
    return {k.encode(): v for k, v in encode(event, replica).items()}


def test_every_event_class_is_registered() -> None:
    # A class missing from EVENT_TYPES would encode fine and then decode as
    # UnknownEvent everywhere: silently dropped by every consumer.
    assert set(EVENT_TYPES) == {cls.__name__ for cls in ALL_TYPES}
    assert all(EVENT_TYPES[cls.__name__] is cls for cls in ALL_TYPES)


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda cls: cls.__name__)
@settings(max_examples=examples(40), deadline=None)
@given(data=st.data())
def test_round_trip(cls: type[Event], data: st.DataObject) -> None:
    event = data.draw(event_strategy(cls))
    decoded = decode(wire(event))
    assert type(decoded) is cls
    assert decoded == event
    # == on datetimes compares instants; the projection also relies on the
    # value still being timezone-aware UTC after the trip.
    assert isinstance(decoded, Event)
    assert decoded.at.utcoffset() is not None
    assert decoded.at.utcoffset() == event.at.utcoffset()


@settings(max_examples=examples(100), deadline=None)
@given(event=any_event, replica=st.text(min_size=1))
def test_wire_fields_are_exactly_type_v_data_replica(event: Event, replica: str) -> None:
    fields = encode(event, replica)
    assert set(fields) == {"type", "v", "data", "replica"}
    assert all(isinstance(v, bytes) for v in fields.values())
    assert fields["type"] == type(event).__name__.encode()
    assert fields["v"] == str(type(event).VERSION).encode()
    assert fields["replica"].decode() == replica


@settings(max_examples=examples(100), deadline=None)
@given(event=any_event)
def test_data_is_plain_json(event: Event) -> None:
    # Non-Python consumers XREAD the log: `data` must be an ordinary JSON object
    # with one member per field (no msgspec tags, no Python-specific encoding).
    doc = json.loads(encode(event, "r")["data"])
    assert isinstance(doc, dict)
    assert set(doc) == {f.encode_name for f in msgspec.structs.fields(type(event))}
    # Timestamps are RFC 3339 strings any language can parse.
    assert datetime.fromisoformat(doc["at"]) == event.at
    assert doc["stream_id"] == event.stream_id


def test_data_example_is_readable_without_msgspec() -> None:
    # A concrete, hand-checked sample of the contract documented in the README.
    event = PartUploaded(
        stream_id="20240517T133742123Z-9f1c2a4b7d3e",
        at=AT,
        upload_id="upl-1",
        part_number=3,
        offset=20971520,
        size=10485760,
        etag='"abc"',
        md5="0" * 32,
    )
    doc = json.loads(encode(event, "r")["data"])
    assert doc == {
        "stream_id": "20240517T133742123Z-9f1c2a4b7d3e",
        "at": "2024-05-17T13:37:42.123456Z",
        "upload_id": "upl-1",
        "part_number": 3,
        "offset": 20971520,
        "size": 10485760,
        "etag": '"abc"',
        "md5": "0" * 32,
        "copied": False,
        "checksum": "",
        "file_size": None,
        "file_mtime_ns": None,
        "crc": "",
    }


GOOD = wire(UploadStarted(stream_id="s", at=AT, upload_id="u"))


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({**GOOD, b"type": b"StreamTeleported"}, "a type from a newer version"),
        ({**GOOD, b"type": b"Event"}, "the abstract base is not a wire type"),
        ({**GOOD, b"v": b"2"}, "a newer schema version of a known type"),
        ({**GOOD, b"v": b"0"}, "an older schema version"),
        ({**GOOD, b"v": b"one"}, "a version that is not a number"),
        ({**GOOD, b"v": b"\xff\xfe"}, "a version that is not even UTF-8"),
        ({**GOOD, b"data": b"{not json"}, "malformed JSON"),
        ({**GOOD, b"data": b""}, "empty data"),
        ({**GOOD, b"data": b"\xff\xfe\xfd"}, "data that is not UTF-8"),
        ({**GOOD, b"data": b"[1, 2]"}, "JSON of the wrong shape"),
        ({**GOOD, b"data": b'{"stream_id": "s"}'}, "required fields missing"),
        ({**GOOD, b"data": b'{"stream_id": 1, "at": "x", "upload_id": "u"}'}, "wrong types"),
        ({**GOOD, b"type": b"\xff\xfe"}, "a type that is not UTF-8"),
        ({k: v for k, v in GOOD.items() if k != b"type"}, "no type field"),
        ({k: v for k, v in GOOD.items() if k != b"data"}, "no data field"),
        ({}, "an empty entry"),
    ],
)
def test_undecodable_entries_become_unknown_events(fields: dict[bytes, bytes], why: str) -> None:
    # A consumer loop must skip what it cannot read instead of crashing on it
    # and re-reading the same poison entry forever.
    result = decode(fields)
    assert isinstance(result, UnknownEvent), why
    assert result.error


def test_unknown_event_reports_type_and_version() -> None:
    result = decode({**GOOD, b"type": b"StreamTeleported", b"v": b"7"})
    assert result == UnknownEvent("StreamTeleported", 7, "unknown type")


def test_good_sample_itself_decodes() -> None:
    # Guards the table above: its cases are "GOOD with one thing broken".
    assert decode(GOOD) == UploadStarted(stream_id="s", at=AT, upload_id="u")


wire_keys = st.sampled_from([b"type", b"v", b"data", b"replica"]) | st.binary(max_size=8)
wire_values = (
    st.sampled_from([name.encode() for name in EVENT_TYPES])
    | st.sampled_from([b"1", b"01", b" 1 ", b"-1", b"9" * 5000])
    | st.binary(max_size=64)
    | st.builds(lambda e: wire(e)[b"data"], any_event)
)


@settings(max_examples=examples(300), deadline=None)
@given(fields=st.dictionaries(wire_keys, wire_values, max_size=6))
def test_decode_never_raises(fields: dict[bytes, bytes]) -> None:
    result = decode(fields)
    assert isinstance(result, Event | UnknownEvent)
    if isinstance(result, Event):
        # Only a well-formed entry of a known type, at a version this code
        # reads (its own, or an older one with upcasters), decodes.
        assert EVENT_TYPES[fields[b"type"].decode()] is type(result)
        assert 1 <= int(fields[b"v"]) <= type(result).VERSION


@pytest.mark.parametrize("plan", [PartPlan(0, 10), PartPlan(10, 0), PartPlan(-1, 10)])
def test_a_file_seen_whose_plan_cuts_nothing_is_undecodable(plan: PartPlan) -> None:
    # No replica writes one; decoded, it would divide by zero in every
    # consumer. Undecodable, it is left pending and counted instead.
    seen = FileSeen(
        stream_id="s1", at=datetime(2026, 1, 1, tzinfo=UTC), path="/w/a.mp4", rel_path="a.mp4",
        bucket="b", key="k", size=1, mtime_ns=1, inode=1, plan=plan,
    )  # fmt: skip
    assert isinstance(decode(wire(seen)), UnknownEvent)
    smallest = msgspec.structs.replace(seen, plan=PartPlan(1, 1))
    assert decode(wire(smallest)) == smallest
