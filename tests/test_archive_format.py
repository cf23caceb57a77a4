"""The archive's format (``cefmp4.domain.archive_format``), as properties.

* a segment decodes to exactly the entries encoded, ``data`` byte for byte,
  and each line is a JSON object whose ``data`` is the event's JSON object
  itself (not a string holding it);
* encoding is deterministic, so rewriting a segment changes nothing;
* segment keys sort as their ids do and parse back; other keys do not parse;
* whatever bytes a log entry holds, its archived line is valid JSON;
* ``fresh`` yields strictly increasing ids above the cursor, each once,
  however the inputs overlap.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cefmp4.domain.archive_format import (
    RawEntry,
    decode_segment,
    encode_segment,
    fresh,
    parse_segment_key,
    raw_entry,
    segment_key,
)
from cefmp4.domain.entryids import format_id, parse_id
from tests.properties import examples

U64 = 2**64 - 1
ids = st.tuples(st.integers(0, U64), st.integers(0, U64))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), U64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def entry_lists(draw: st.DrawFn, max_size: int = 12) -> list[RawEntry]:
    chosen = sorted(draw(st.sets(ids, max_size=max_size)))
    return [
        RawEntry(
            format_id(i),
            draw(st.text(max_size=20)),
            draw(st.integers(-5, 10**6)),
            draw(st.text(max_size=20)),
            msgspec.Raw(msgspec.json.encode(draw(json_values))),
        )
        for i in chosen
    ]


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=entry_lists())
def test_segment_round_trip_keeps_data_verbatim(entries: list[RawEntry]) -> None:
    body = encode_segment(entries)
    assert decode_segment(body) == entries
    assert encode_segment(entries) == body  # deterministic: same entries, same bytes
    lines = gzip.decompress(body).splitlines()
    assert len(lines) == len(entries)
    for line, entry in zip(lines, entries, strict=True):
        obj = json.loads(line)
        assert list(obj) == ["id", "type", "v", "replica", "data"]
        assert obj["id"] == entry.id
        assert obj["data"] == json.loads(bytes(entry.data))  # embedded, not a string


def test_segment_line_layout() -> None:
    entry = raw_entry(
        "1700000000000-3",
        {b"type": b"FileSeen", b"v": b"1", b"replica": b"h-1", b"data": b'{"stream_id":"s"}'},
    )
    assert gzip.decompress(encode_segment([entry])) == (
        b'{"id":"1700000000000-3","type":"FileSeen","v":1,"replica":"h-1",'
        b'"data":{"stream_id":"s"}}\n'
    )


@given(a=ids, b=ids, c=ids, d=ids, prefix=st.sampled_from(["", "cefmp4-events/", "a/b-"]))
def test_segment_keys_sort_as_their_ids_and_parse_back(
    a: tuple[int, int], b: tuple[int, int], c: tuple[int, int], d: tuple[int, int], prefix: str
) -> None:
    first = segment_key(prefix, format_id(a), format_id(b))
    second = segment_key(prefix, format_id(c), format_id(d))
    assert (first < second) == ((a, b) < (c, d))
    assert parse_segment_key(prefix, first) == (format_id(a), format_id(b))
    assert parse_segment_key("other/", first) is None


@pytest.mark.parametrize(
    "key",
    [
        "cefmp4-events/README",
        "cefmp4-events/1-0_2-0.jsonl.gz",  # not padded
        "cefmp4-events/" + segment_key("", "1-0", "2-0") + ".tmp",
        "cefmp4-events/sub/" + segment_key("", "1-0", "2-0"),
        "streams/" + segment_key("", "1-0", "2-0"),
    ],
)
def test_other_keys_are_not_segments(key: str) -> None:
    assert parse_segment_key("cefmp4-events/", key) is None


@settings(max_examples=examples(500))
@given(
    data=st.binary(max_size=60)
    | st.sampled_from([b"\r0", b" {} ", b'\t"x"\n', b'{"a" :\n 1}', b"[1,\r\n2]"])
    | json_values.map(lambda v: json.dumps(v, indent=1).encode()),
    v=st.binary(max_size=4),
    kind=st.binary(max_size=12),
)
def test_any_log_entry_archives_as_a_valid_json_line(data: bytes, v: bytes, kind: bytes) -> None:
    entry = raw_entry("5-1", {b"type": kind, b"v": v, b"replica": b"r", b"data": data})
    line = gzip.decompress(encode_segment([entry]))
    assert line.count(b"\n") == 1  # one line, even when data had newlines
    obj: dict[str, Any] = json.loads(line)
    assert decode_segment(encode_segment([entry])) == [entry]
    try:
        original = msgspec.json.decode(data)  # what the service itself accepts as JSON
    except msgspec.DecodeError:  # kept as its text
        assert obj["data"] == data.decode(errors="replace")
    else:
        assert obj["data"] == original
        if b"\n" not in data.strip(b" \t\r\n"):
            assert bytes(entry.data) == data.strip(b" \t\r\n")  # verbatim


@given(
    ordered=st.lists(ids, unique=True, max_size=40).map(sorted),
    cuts=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=6),
    after=ids,
)
def test_fresh_yields_each_id_once_in_order(
    ordered: list[tuple[int, int]], cuts: list[tuple[int, int]], after: tuple[int, int]
) -> None:
    entries = [RawEntry(format_id(i), "T", 1, "r", msgspec.Raw(b"{}")) for i in ordered]
    # overlapping runs of the log, as segments written by racing archivers
    runs = [entries[min(x, y) : max(x, y)] for x, y in cuts] + [entries]
    cursor, seen = after, []
    for run in sorted(runs, key=lambda r: parse_id(r[0].id) if r else (0, 0)):
        kept, cursor = fresh(run, cursor)
        seen += [parse_id(e.id) for e in kept]
    assert seen == [i for i in ordered if i > after]
    assert cursor == max([after, *ordered])


def test_parse_id_refuses_what_is_not_an_id() -> None:
    for text in ("", "12", "a-1", "1-", "-1", "1-2-3"):
        with pytest.raises(ValueError):
            parse_id(text)
