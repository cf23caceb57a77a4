"""Rolling upgrades: per-type versions, upcasters, undecodable entries left
pending for a newer replica, and the shipped JSON Schema.

The pure parts (``Codec``, the schema) are tested on their own, with "newer"
event classes declared here: a test plays the next release by building a
``Codec`` of its own. Anything that involves a consumer group runs against a
real Redis: two ``GroupConsumer`` on one group, one per codec, are the old and
the new replica side by side.
"""

from __future__ import annotations

import asyncio
import json
import re
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest
import redis.asyncio as aioredis
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from cefmp4.adapters.eventlog import EventLog
from cefmp4.adapters.metrics import Metrics
from cefmp4.dev.schema import SCHEMA_PATH, event_schema, main, render
from cefmp4.domain import events as ev
from cefmp4.domain.events import (
    CODEC,
    EVENT_TYPES,
    UPCASTERS,
    BytesAvailable,
    Codec,
    Event,
    FileSeen,
    StreamFailed,
    UnknownEvent,
    decode,
    encode,
)
from cefmp4.domain.partplan import PartPlan
from cefmp4.runtime.consumerloop import GroupConsumer
from tests.properties import examples
from tests.test_events import any_event, event_strategy, wire

AT = datetime(2024, 5, 17, 13, 37, 42, 123456, tzinfo=UTC)
SEEN_V1 = FileSeen(
    stream_id="s1",
    at=AT,
    path="/w/a.mp4",
    rel_path="a.mp4",
    bucket="b",
    key="streams/s1/a.mp4",
    size=10,
    mtime_ns=5,
    inode=42,
)


# -- the next releases, as a test declares them --------------------------------
# Class names are the wire type, so each version lives in its own namespace.


class before_plans:
    class FileSeen(Event, frozen=True, kw_only=True):
        """v1 as a replica from before part plans (and ``continues``) reads it."""

        VERSION: ClassVar[int] = 1

        path: str
        rel_path: str
        bucket: str
        key: str
        size: int
        mtime_ns: int
        inode: int


class v2:
    class FileSeen(before_plans.FileSeen, frozen=True, kw_only=True):
        """v2 adds ``host`` with a default: old entries get "legacy" from the upcaster."""

        VERSION: ClassVar[int] = 2

        host: str = ""

    class FileRenamed(Event, frozen=True, kw_only=True):
        """A type the current code does not know at all."""

        VERSION: ClassVar[int] = 1

        path: str
        old_path: str


class v3:
    class FileSeen(Event, frozen=True, kw_only=True):
        """v3 renames ``inode`` to ``file_id``: incompatible, hence a bump."""

        VERSION: ClassVar[int] = 3

        path: str
        rel_path: str
        bucket: str
        key: str
        size: int
        mtime_ns: int
        file_id: int
        host: str = ""


def seen_v1_v2(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "host": "legacy"}


def seen_v2_v3(doc: dict[str, Any]) -> dict[str, Any]:
    new = {k: v for k, v in doc.items() if k != "inode"}
    return {**new, "file_id": doc["inode"]}


def with_type(cls: type[Event]) -> list[type[Event]]:
    """The current event classes with ``cls`` in place of its namesake."""
    return [cls if name == cls.__name__ else c for name, c in EVENT_TYPES.items()]


CODEC_V2 = Codec(with_type(v2.FileSeen), {**UPCASTERS, ("FileSeen", 1): seen_v1_v2})
CODEC_V3 = Codec(
    with_type(v3.FileSeen),
    {**UPCASTERS, ("FileSeen", 1): seen_v1_v2, ("FileSeen", 2): seen_v2_v3},
)


# -- versions and the codec ------------------------------------------------------


def test_every_event_class_declares_its_own_version() -> None:
    # Inheriting one would make a bump of a base class silently bump others.
    for cls in EVENT_TYPES.values():
        assert isinstance(cls.__dict__.get("VERSION"), int), cls.__name__
        assert cls.VERSION >= 1


def test_encode_writes_the_class_version() -> None:
    event = v3.FileSeen(**{**_fields(SEEN_V1, drop="inode"), "file_id": 1})
    assert encode(event, "r")["v"] == b"3"
    assert encode(SEEN_V1, "r")["v"] == str(FileSeen.VERSION).encode()


def test_a_v1_entry_decodes_after_the_bump() -> None:
    decoded = decode(wire(SEEN_V1), CODEC_V2)
    assert decoded == v2.FileSeen(**_fields(SEEN_V1), host="legacy")
    # The current version takes the typed decoder, upcasters untouched.
    fresh = v2.FileSeen(**_fields(SEEN_V1), host="h")
    assert decode(wire(fresh), CODEC_V2) == fresh


def test_the_upcaster_chain_runs_in_order() -> None:
    from_v1 = decode(wire(SEEN_V1), CODEC_V3)
    assert from_v1 == v3.FileSeen(**_fields(SEEN_V1, drop="inode"), file_id=42, host="legacy")
    from_v2 = decode(wire(v2.FileSeen(**_fields(SEEN_V1), host="h")), CODEC_V3)
    assert from_v2 == v3.FileSeen(**_fields(SEEN_V1, drop="inode"), file_id=42, host="h")


@settings(max_examples=examples(60), deadline=None)
@given(event=event_strategy(FileSeen))
def test_every_v1_file_seen_upcasts_to_v3(event: FileSeen) -> None:
    decoded = decode(wire(event), CODEC_V3)
    assert decoded == v3.FileSeen(
        **_fields(event, drop="inode"), file_id=event.inode, host="legacy"
    )


@pytest.mark.parametrize("cls", list(EVENT_TYPES.values()), ids=lambda cls: cls.__name__)
@settings(max_examples=examples(30), deadline=None)
@given(data=st.data())
def test_the_upcast_path_is_lossless_for_every_type(cls: type[Event], data: st.DataObject) -> None:
    # An upcast ends in msgspec.convert of a plain dict instead of the typed
    # decoder; with an identity upcaster both must give the same event
    # (datetimes timezone-aware, floats, literals ...).
    bumped = types.new_class(
        cls.__name__,
        (cls,),
        {"frozen": True, "kw_only": True},
        lambda ns: ns.update(VERSION=cls.VERSION + 1),
    )
    codec = Codec(with_type(bumped), {**UPCASTERS, (cls.__name__, cls.VERSION): lambda doc: doc})
    event = data.draw(event_strategy(cls))
    decoded = decode(wire(event), codec)
    assert type(decoded) is bumped
    assert msgspec.structs.asdict(decoded) == msgspec.structs.asdict(event)
    assert isinstance(decoded, Event) and decoded.at.utcoffset() == event.at.utcoffset()


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({**wire(SEEN_V1), b"v": b"4"}, "newer than this replica's v3"),
        ({**wire(SEEN_V1), b"v": b"0"}, "no such version"),
        ({**wire(SEEN_V1), b"v": b"-1"}, "no such version"),
        ({**wire(SEEN_V1), b"type": b"FileRenamed"}, "unknown type"),
        ({**wire(SEEN_V1), b"data": b"[1]"}, "data is not a JSON object"),
        ({**wire(SEEN_V1), b"data": b"{"}, "truncated"),
        # The v2->v3 upcaster reads `inode`: a v1 entry without it must not raise.
        ({**wire(SEEN_V1), b"data": b'{"path": "/w/a.mp4"}'}, "upcast v2: KeyError"),
        ({**wire(SEEN_V1), b"data": b'{"inode": 1}'}, "upcast to v3"),
    ],
)
def test_what_a_replica_cannot_read_is_an_unknown_event(
    fields: dict[bytes, bytes], error: str
) -> None:
    result = decode(fields, CODEC_V3)
    assert isinstance(result, UnknownEvent)
    assert error in result.error


@settings(max_examples=examples(300), deadline=None)
@given(
    name=st.sampled_from([b"FileSeen", b"BytesAvailable", b"Nope"]),
    v=st.sampled_from([b"1", b"2", b"3", b"4", b"0", b"x"]),
    data=st.builds(lambda e: wire(e)[b"data"], any_event)
    | st.dictionaries(st.text(max_size=8), st.none() | st.integers() | st.text()).map(
        msgspec.json.encode
    )
    | st.binary(max_size=32),
)
def test_decode_with_upcasters_never_raises(name: bytes, v: bytes, data: bytes) -> None:
    result = decode({b"type": name, b"v": v, b"data": data}, CODEC_V3)
    assert isinstance(result, Event | UnknownEvent)


def test_a_codec_refuses_a_gap_in_the_chain() -> None:
    # Old entries stay in the log for good: a version no upcaster reads would
    # make them unreadable, which must fail at import, not during a replay.
    with pytest.raises(ValueError, match="no upcaster from v2"):
        Codec(with_type(v3.FileSeen), {**UPCASTERS, ("FileSeen", 1): seen_v1_v2})
    with pytest.raises(ValueError, match="upgrades nothing"):
        Codec(EVENT_TYPES.values(), {**UPCASTERS, ("FileSeen", 1): seen_v1_v2})
    with pytest.raises(ValueError, match="upgrades nothing"):
        Codec(EVENT_TYPES.values(), {**UPCASTERS, ("FileRenamed", 1): seen_v1_v2})

    class NoVersion(Event, frozen=True, kw_only=True):
        pass

    with pytest.raises(ValueError, match="VERSION"):
        Codec([NoVersion])


def test_the_shipped_codec_reads_every_shipped_type() -> None:
    assert dict(CODEC.types) == EVENT_TYPES
    assert ev.decode.__defaults__ == (CODEC,)


@given(name=st.text())
def test_unknown_event_labels_are_bounded(name: str) -> None:
    label = UnknownEvent(name, 1, "e").label()
    assert label == name or label == "invalid"
    assert 1 <= len(label) <= 64 and label.isascii()


def test_unknown_event_labels_keep_type_names() -> None:
    assert UnknownEvent("FileRenamed", 1, "e").label() == "FileRenamed"
    assert UnknownEvent("x" * 65, 1, "e").label() == "invalid"
    assert UnknownEvent("a b", 1, "e").label() == "invalid"


# -- the JSON Schema ---------------------------------------------------------------


def test_the_shipped_schema_is_current() -> None:
    # Fails when an event changed without `task schema` (python -m cefmp4.dev.schema).
    assert SCHEMA_PATH.read_text(encoding="utf-8") == render(event_schema(EVENT_TYPES.values()))


def test_schema_check_mode(tmp_path: Path) -> None:
    path = tmp_path / "events.schema.json"
    assert main(["--check", str(path)]) == 1
    assert main([str(path)]) == 0
    assert main(["--check", str(path)]) == 0
    path.write_text(path.read_text().replace('"x-version": 1', '"x-version": 7', 1))
    assert main(["--check", str(path)]) == 1


def test_schema_lists_every_type_at_its_version() -> None:
    schema = event_schema(EVENT_TYPES.values())
    assert schema["x-versions"] == {name: cls.VERSION for name, cls in EVENT_TYPES.items()}
    assert {b["properties"]["type"]["const"] for b in schema["oneOf"]} == set(EVENT_TYPES)
    bumped = event_schema(with_type(v3.FileSeen))
    assert bumped["$defs"]["FileSeen"]["x-version"] == 3
    assert "file_id" in bumped["$defs"]["FileSeen"]["required"]


JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
    "object": (dict,),
    "array": (list,),
}


def schema_errors(value: Any, node: dict[str, Any], root: dict[str, Any], at: str) -> list[str]:
    """A small JSON Schema check - what the shipped file uses: $ref, type,
    const, enum, anyOf, oneOf, pattern, required, properties, and contentSchema
    of JSON text. Enough to show a real entry matches it, without a dependency."""
    if "$ref" in node:
        node = root["$defs"][node["$ref"].removeprefix("#/$defs/")]
    errors: list[str] = []
    if "type" in node:
        ok = isinstance(value, JSON_TYPES[node["type"]])
        if isinstance(value, bool) and node["type"] != "boolean":
            ok = False
        if not ok:
            errors.append(f"{at}: {value!r} is not {node['type']}")
    if "const" in node and value != node["const"]:
        errors.append(f"{at}: {value!r} != {node['const']!r}")
    if "enum" in node and value not in node["enum"]:
        errors.append(f"{at}: {value!r} not in {node['enum']}")
    if "pattern" in node and isinstance(value, str) and not re.search(node["pattern"], value):
        errors.append(f"{at}: {value!r} does not match {node['pattern']}")
    if node.get("format") == "date-time" and isinstance(value, str):
        try:
            datetime.fromisoformat(value)
        except ValueError:
            errors.append(f"{at}: {value!r} is not a date-time")
    if "anyOf" in node and all(schema_errors(value, n, root, at) for n in node["anyOf"]):
        errors.append(f"{at}: matches no anyOf branch")
    if "oneOf" in node:
        matching = [n for n in node["oneOf"] if not schema_errors(value, n, root, at)]
        if len(matching) != 1:
            errors.append(f"{at}: matches {len(matching)} oneOf branches")
    if "contentSchema" in node and isinstance(value, str):
        try:
            doc = json.loads(value)
        except ValueError:
            return [*errors, f"{at}: not JSON"]
        errors += schema_errors(doc, node["contentSchema"], root, f"{at}(json)")
    if isinstance(value, dict):
        errors += [f"{at}: {k} missing" for k in node.get("required", []) if k not in value]
        for key, sub in node.get("properties", {}).items():
            if key in value:
                errors += schema_errors(value[key], sub, root, f"{at}.{key}")
    return errors


SCHEMA = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def entry(event: Event) -> dict[str, str]:
    """An entry as another language's XREAD sees it: string fields."""
    return {k: v.decode() for k, v in encode(event, "host-1").items()}


@settings(max_examples=examples(200), deadline=None)
@given(event=any_event)
def test_real_entries_validate_against_the_shipped_schema(event: Event) -> None:
    assert schema_errors(entry(event), SCHEMA, SCHEMA, "$") == []


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda e: {**e, "v": "2"}, "a version the schema does not describe"),
        (lambda e: {**e, "type": "FileRenamed"}, "an unknown type"),
        (lambda e: {k: v for k, v in e.items() if k != "replica"}, "no replica"),
        (lambda e: {**e, "data": e["data"].replace('"size":10', '"size":"10"')}, "wrong type"),
        (lambda e: {**e, "data": e["data"].replace('"inode":42', '"x":42')}, "missing field"),
        (lambda e: {**e, "data": e["data"].replace("2024-05-17T", "yesterday ")}, "bad date"),
    ],
)
def test_the_schema_check_can_fail(change: Any, why: str) -> None:
    # Guards the validator above: each case is a good entry with one thing broken.
    good = entry(SEEN_V1)
    assert schema_errors(good, SCHEMA, SCHEMA, "$") == []
    assert schema_errors(change(good), SCHEMA, SCHEMA, "$"), why


# -- consumer groups against real Redis ---------------------------------------------


@dataclass
class Recorder:
    """A handler that records what it was given."""

    group: str
    wants: tuple[type[Event], ...]
    seen: list[Event] = field(default_factory=list)
    expect: int = 0  # `done` is set once this many events were handled
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, event: Event) -> None:
        self.seen.append(event)
        if len(self.seen) >= self.expect:
            self.done.set()


async def _no_failures(stream_id: str, reason: str, detail: str) -> None:
    raise AssertionError(f"unexpected failure of {stream_id}: {reason} {detail}")


@dataclass
class Replica:
    consumer: GroupConsumer
    handler: Recorder
    registry: CollectorRegistry

    def undecodable(self, type_: str) -> float:
        value = self.registry.get_sample_value(
            "cefmp4_events_undecodable_total", {"group": GROUP, "type": type_}
        )
        return value or 0.0


GROUP = "testers"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


def replica(
    redis: aioredis.Redis,
    key: str,
    name: str,
    codec: Codec = CODEC,
    *,
    wants: tuple[type[Event], ...] = (FileSeen,),
    concurrency: int = 4,
    claim_idle_seconds: float = 30.0,
) -> Replica:
    registry = CollectorRegistry()
    handler = Recorder(GROUP, wants)
    consumer = GroupConsumer(
        EventLog(redis, key, name, codec=codec),
        handler,
        consumer=name,
        fail=_no_failures,
        metrics=Metrics(registry),
        concurrency=concurrency,
        claim_idle_seconds=claim_idle_seconds,
    )
    return Replica(consumer, handler, registry)


async def pending(redis: aioredis.Redis, key: str) -> dict[str, str]:
    """Entry id -> the consumer holding it, for the group's pending entries."""
    rows = await redis.xpending_range(key, GROUP, min="-", max="+", count=100_000)
    return {_text(row["message_id"]): _text(row["consumer"]) for row in rows}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def xadd(redis: aioredis.Redis, key: str, fields: dict[bytes, bytes]) -> str:
    entry_id = await redis.xadd(key, fields)  # type: ignore[arg-type]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def test_undecodable_entries_stay_pending_and_unwanted_ones_are_acked(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    key = f"{key_prefix}:events"
    old = replica(redis, key, "old")
    await old.consumer.start()
    new_type = await xadd(redis, key, {**wire(SEEN_V1), b"type": b"FileRenamed"})
    new_version = await xadd(redis, key, {**wire(SEEN_V1), b"v": b"9"})
    unwanted = await xadd(
        redis, key, wire(BytesAvailable(stream_id="s1", at=AT, size=1, mtime_ns=1))
    )
    wanted = await xadd(redis, key, wire(SEEN_V1))

    with structlog.testing.capture_logs() as logs:
        assert await old.consumer.run_once() == 4
        # Released at once, so the next claim pass takes them again: still
        # pending, not handled, and neither logged nor counted a second time.
        await old.consumer.run_once()

    assert await pending(redis, key) == {new_type: "old", new_version: "old"}
    assert old.handler.seen == [SEEN_V1]
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert sorted(w["id"] for w in warnings) == sorted([new_type, new_version])
    assert old.undecodable("FileRenamed") == 1
    assert old.undecodable("FileSeen") == 1
    assert unwanted not in await pending(redis, key) and wanted not in await pending(redis, key)


@pytest.mark.parametrize(
    "newer",
    [
        pytest.param(CODEC_V2, id="a known type at a higher version"),
        pytest.param(Codec([*EVENT_TYPES.values(), v2.FileRenamed], UPCASTERS), id="a new type"),
    ],
)
async def test_old_and_new_replicas_side_by_side(
    redis: aioredis.Redis, key_prefix: str, newer: Codec
) -> None:
    key = f"{key_prefix}:events"
    old = replica(redis, key, "old", wants=tuple(CODEC.types.values()))
    new = replica(redis, key, "new", newer, wants=tuple(newer.types.values()))
    await old.consumer.start()
    writer = EventLog(redis, key, "new", codec=newer)
    event: Event = (
        v2.FileRenamed(stream_id="s1", at=AT, path="/w/b.mp4", old_path="/w/a.mp4")
        if "FileRenamed" in newer.types
        else v2.FileSeen(**_fields(SEEN_V1), host="h")
    )
    entry_id = await writer.append(event)

    # The old replica reads it first and cannot decode it; on its next claim
    # pass it takes it again (the race an old replica would win forever if it
    # did not release the entry each time).
    await old.consumer.run_once()
    await old.consumer.run_once()
    assert await pending(redis, key) == {entry_id: "old"}
    assert old.handler.seen == []

    # The new replica's claim pass takes it without waiting for the claim
    # idle time (30 s here) to pass again, handles and acks it.
    await new.consumer.run_once()
    assert new.handler.seen == [event]
    assert await pending(redis, key) == {}
    assert new.undecodable(type(event).__name__) == 0


async def test_a_claim_pass_drains_a_backlog_behind_undecodable_entries(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """A dead consumer left 40 entries this replica cannot read, then 25 it
    can. With concurrency 2 a claim page is 2 entries (Redis scans at most 20
    pending entries per call), and passes start every 30 min: the decodable
    entries are handled only if the pass goes on, page after page, without
    waiting for the next one - and without the undecodable ones crowding
    them out."""
    key = f"{key_prefix}:events"
    live = replica(redis, key, "live", concurrency=2, claim_idle_seconds=3600.0)
    await live.consumer.start()
    undecodable = [
        await xadd(redis, key, {**wire(SEEN_V1), b"v": b"9", b"data": str(i).encode()})
        for i in range(40)
    ]
    seen = [msgspec.structs.replace(SEEN_V1, stream_id=f"s{i}", inode=i) for i in range(25)]
    for event in seen:
        await xadd(redis, key, wire(event))
    await redis.xreadgroup(GROUP, "dead", {key: ">"})
    ids: list[Any] = list(await pending(redis, key))
    assert len(ids) == 65
    # Age them past the claim threshold: the consumer died an hour ago.
    await redis.xclaim(key, GROUP, "dead", 0, ids, idle=7_200_000, justid=True)

    live.handler.expect = len(seen)
    stop = asyncio.Event()
    task = asyncio.create_task(live.consumer.run(stop, block_ms=50))
    try:
        # The next pass would start in 30 minutes: only the pass under way
        # can get there in time.
        async with asyncio.timeout(60):
            await live.handler.done.wait()
    finally:
        stop.set()
        await task
    assert sorted(e.stream_id for e in live.handler.seen) == sorted(e.stream_id for e in seen)
    assert await pending(redis, key) == dict.fromkeys(undecodable, "live")
    assert live.undecodable("FileSeen") == 40


def _fields(event: Event, drop: str = "") -> dict[str, Any]:
    # The made-up FileSeen v2/v3 above extend v1's original fields; the
    # optional `continues` and `plan` came later (v1 entries without them decode).
    skip = (drop, "continues", "plan")
    return {k: v for k, v in msgspec.structs.asdict(event).items() if k not in skip}


# -- FileSeen.plan: an optional field, no version bump ---------------------------


def test_a_replica_from_before_plans_reads_a_file_seen_with_one() -> None:
    """It must not skip the stream (it would acknowledge the stream's later
    events unhandled and snapshot past it): it reads it and cuts the file by
    its own CHUNK_SIZE_BYTES, which costs re-sent parts, never a wrong object
    (``test_handlers_fast::test_parts_cut_by_another_plan_are_sent_again_under_this_one``)."""
    seen = msgspec.structs.replace(SEEN_V1, plan=PartPlan(5 << 20, 10 << 20))
    old = Codec(with_type(before_plans.FileSeen), UPCASTERS)
    assert decode(wire(seen), old) == before_plans.FileSeen(**_fields(seen))


@settings(max_examples=examples(60), deadline=None)
@given(event=event_strategy(FileSeen))
def test_a_file_seen_from_before_plans_decodes_with_none(event: FileSeen) -> None:
    """No ``plan`` in the entry: ``None``, which consumers read as
    CHUNK_SIZE_BYTES for every part, as such a stream was cut."""
    doc = msgspec.json.decode(wire(event)[b"data"])
    doc.pop("plan", None)
    entry = {**wire(event), b"data": msgspec.json.encode(doc)}
    assert decode(entry) == msgspec.structs.replace(event, plan=None)


# -- the real upcaster: StreamFailed v1 (free-form reason) -> v2 (closed set) ---


@pytest.mark.parametrize(
    ("old_reason", "old_detail", "reason", "detail"),
    [
        ("s3_accessdenied", "denied", "s3_rejected", "s3_accessdenied: denied"),
        ("s3_invalidpart", "", "s3_invalid_part", "s3_invalidpart"),
        ("permanent_error", "boom", "internal_error", "permanent_error: boom"),
        ("something_else", "", "internal_error", "something_else"),
        ("deleted", "/w/a.mp4 deleted", "deleted", "/w/a.mp4 deleted"),  # already in the set
    ],
)
def test_stream_failed_v1_reasons_map_into_the_closed_set(
    old_reason: str, old_detail: str, reason: str, detail: str
) -> None:
    data = msgspec.json.encode(
        {"stream_id": "s", "at": "2024-01-01T00:00:00Z", "reason": old_reason, "detail": old_detail}
    )
    event = decode({b"type": b"StreamFailed", b"v": b"1", b"data": data})
    assert isinstance(event, StreamFailed)
    assert (event.reason, event.detail) == (reason, detail)
