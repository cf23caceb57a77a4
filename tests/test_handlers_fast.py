"""The finalizer's and the multipart mechanics' decisions, in milliseconds.

Real files in a temp dir, the real handlers, the real fold and codec; the
store is ``MemoryStore`` and the Redis side is ``tests.contracts.memorylog``
(both pass the contract suites their real counterparts pass). What crosses
Redis or S3 for real (leases between processes, fenced appends, SeaweedFS's
own answers, crashes) stays in the server tests (test_pipeline, test_fencing,
test_faults, ...); these cover the branches of one handler call: a small file
in one put, multipart, a second delivery, a completion whose event was lost,
an upload the store lost, a patched part, an adopted orphan, a lost lease, a
file that moved, an empty file, and the failer.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import msgspec
import prometheus_client
import pytest

import consumers.uploads as uploads_module
from cefmp4.adapters import checksums
from cefmp4.adapters.checksums import checksum_of, md5_of, multipart_etag
from cefmp4.adapters.eventlog import EventLog
from cefmp4.adapters.leases import Fence, LeaseLost, StreamLeases
from cefmp4.adapters.memorystore import MemoryStore
from cefmp4.adapters.metrics import Metrics
from cefmp4.adapters.storage import RemotePart
from cefmp4.dev.localservers import S3Endpoint
from cefmp4.domain.errors import NoSuchUpload, StreamEnded
from cefmp4.domain.events import (
    Event,
    FileSeen,
    PartUploaded,
    StreamCompleted,
    StreamFailed,
    StreamIdle,
    UploadStarted,
)
from cefmp4.domain.partplan import PartPlan, Span, final_parts, whole_parts
from consumers.deps import Deps
from consumers.finalizer import Finalizer
from consumers.metadata import MetadataWriter
from consumers.uploads import Uploads, failer
from projections.live import LiveProjection
from projections.streams import StreamState
from tests.contracts.memorylog import MemoryEventLog, MemoryLeases
from tests.harness import service_config

# A scale model: parts of 64 KiB instead of S3's 5 MiB, the store enforcing
# the same minimum at that scale (the plan only depends on the chunk size), so
# that hashing a few files costs microseconds. The 5 MiB runs are the server tests.
C = 64 * 1024
AT = datetime(2026, 1, 1, tzinfo=UTC)
STREAM = "s-1"
KEY = "streams/cam/a.mp4"


@dataclass
class World:
    path: Path
    log: MemoryEventLog
    store: MemoryStore
    guard: MemoryLeases
    deps: Deps
    uploads: Uploads
    finalizer: Finalizer

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.log.events if isinstance(e, kind)]

    async def state(self) -> StreamState:
        return (await self.deps.projection.catch_up()).streams[STREAM]

    async def idle(self) -> StreamIdle:
        st = self.path.stat()
        event = StreamIdle(
            stream_id=STREAM,
            at=AT,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            reason="settled",
            mp4="complete",
        )
        await self.log.append(event)
        return event

    async def send_parts(self, *numbers: int) -> str:
        """What the uploader does before the file settles: parts up to ``numbers``."""
        s = await self.state()
        async with self.guard.hold(STREAM) as fence:
            f = cast(Fence, fence)
            upload_id = await self.uploads.ensure_upload(s, f)
            s = await self.state()
            spans = [Span(n, (n - 1) * C, C) for n in numbers]
            await self.uploads.send(s, upload_id, spans, "growing", f)
        return upload_id


def make_world(
    tmp_path: Path, store: MemoryStore, guard: MemoryLeases, **config_overrides: Any
) -> World:
    path = tmp_path / "a.mp4"
    log = guard.log
    unused = S3Endpoint("http://127.0.0.1:9", "k", "s", "us-east-1")  # never contacted
    # Config() does not apply the decoder's 5 MiB floor: the scale model's way in.
    config = service_config(
        tmp_path, "redis://127.0.0.1:9/0", "t", "bucket", unused, chunk_size_bytes=C,
        **config_overrides,
    )  # fmt: skip
    projection = LiveProjection(cast(EventLog, log))
    deps = Deps(
        config=config,
        events=cast(EventLog, log),
        projection=projection,
        store=store,
        stream_leases=cast(StreamLeases, guard),
        metrics=Metrics(prometheus_client.CollectorRegistry()),
        now=lambda: AT,
    )
    uploads = Uploads(deps)
    return World(path, log, store, guard, deps, uploads, Finalizer(deps, uploads))


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(
        tmp_path, MemoryStore("bucket", min_part_size=C), MemoryLeases(MemoryEventLog())
    )


async def record(world: World, data: bytes, plan: PartPlan | None = None) -> None:
    """The recording is on disk and the watcher has seen it (with no plan:
    as before plans were recorded, cut by the config's chunk size)."""
    world.path.write_bytes(data)
    st = world.path.stat()
    await world.log.append(
        FileSeen(
            stream_id=STREAM,
            at=AT,
            path=str(world.path),
            rel_path="a.mp4",
            bucket="bucket",
            key=KEY,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            inode=st.st_ino,
            plan=plan,
        )
    )


def completed(world: World) -> StreamCompleted:
    [event] = world.of(StreamCompleted)
    assert isinstance(event, StreamCompleted)
    return event


async def test_a_small_file_goes_up_in_one_put(world: World) -> None:
    data = os.urandom(C // 2)
    await record(world, data)
    await world.finalizer.handle(await world.idle())
    done = completed(world)
    assert await world.store.get_object(KEY) == data
    assert (done.etag, done.parts, done.size) == (md5_of(data)[0], 0, len(data))
    assert done.sha256 == ""  # SIDECAR_SHA256 is off: the CRC below is the proof
    info = await world.store.head_object(KEY)
    assert info is not None and info.checksum == checksum_of("crc64nvme", data)
    assert world.of(UploadStarted) == [] and await world.store.list_uploads("") == []


async def test_a_large_file_is_completed_from_its_parts(world: World) -> None:
    data = os.urandom(2 * C + C // 2 + 5)
    await record(world, data)
    await world.finalizer.handle(await world.idle())
    done = completed(world)
    parts = sorted(
        (e for e in world.of(PartUploaded) if isinstance(e, PartUploaded)),
        key=lambda p: p.part_number,
    )
    assert [p.part_number for p in parts] == [1, 2, 3]
    assert done.parts == 3 and done.etag == multipart_etag([p.etag for p in parts])
    assert await world.store.get_object(KEY) == data
    assert await world.store.list_uploads("") == []


async def test_a_recorded_plan_cuts_the_file_not_the_chunk_size(world: World) -> None:
    """Part 1 of C and later parts of 2C, as FileSeen recorded, while the
    config says C: the object is the file, and a patched part 1 is the only
    part sent again (the resend a small part 1 keeps small)."""
    plan = PartPlan(C, 2 * C)
    data = bytearray(os.urandom(C + 2 * 2 * C + C // 3))
    await record(world, bytes(data), plan)
    s = await world.state()
    async with world.guard.hold(STREAM) as fence:
        f = cast(Fence, fence)
        upload_id = await world.uploads.ensure_upload(s, f)
        s = await world.state()
        await world.uploads.send(s, upload_id, list(whole_parts(len(data), plan)), "growing", f)
    data[40:44] = b"\x00\x00\x10\x00"  # the recorder rewrites the mdat size at the end
    world.path.write_bytes(bytes(data))
    await world.finalizer.handle(await world.idle())
    sent = [(e.part_number, e.offset, e.size) for e in world.of(PartUploaded)
            if isinstance(e, PartUploaded)]  # fmt: skip
    assert sorted(sent) == [(1, 0, C), (1, 0, C), (2, C, 2 * C), (3, 3 * C, 2 * C),
                            (4, 5 * C, C // 3)]  # fmt: skip
    assert completed(world).parts == 4 and await world.store.get_object(KEY) == bytes(data)


@pytest.mark.parametrize(
    ("recorded", "sent_by"),
    [
        # A replica from before plans (it ignores FileSeen.plan) sent parts 1-2
        # by its CHUNK_SIZE_BYTES; this one finalizes by the recorded plan ...
        (PartPlan(C, 2 * C), PartPlan.uniform(C)),
        # ... and the other way round: the stream recorded no plan (this
        # finalizer cuts by C), the parts were sent under a (C, 2C) plan.
        (None, PartPlan(C, 2 * C)),
    ],
)
async def test_parts_cut_by_another_plan_are_sent_again_under_this_one(
    world: World, recorded: PartPlan | None, sent_by: PartPlan
) -> None:
    """Replicas of two versions on one stream: the finalizer sends again every
    part whose recorded span is not its own plan's, so the object is the file."""
    data = os.urandom(5 * C + C // 3)
    await record(world, data, recorded)
    s = await world.state()
    early = list(whole_parts(3 * C, sent_by))[:2]
    async with world.guard.hold(STREAM) as fence:
        f = cast(Fence, fence)
        upload_id = await world.uploads.ensure_upload(s, f)
        await world.uploads.send(await world.state(), upload_id, early, "growing", f)
    await world.finalizer.handle(await world.idle())
    final = final_parts(len(data), recorded or PartPlan.uniform(C))
    sent = [(e.part_number, e.offset, e.size) for e in world.of(PartUploaded)
            if isinstance(e, PartUploaded)]  # fmt: skip
    assert sorted(sent[:2]) == [(sp.number, sp.offset, sp.size) for sp in early]
    assert sorted(sent[2:]) == [(sp.number, sp.offset, sp.size) for sp in final
                                if (sp.number, sp.offset, sp.size) not in sent[:2]]  # fmt: skip
    assert completed(world).parts == len(final)
    assert await world.store.get_object(KEY) == data


async def test_a_second_delivery_does_nothing(world: World) -> None:
    await record(world, os.urandom(2 * C + C // 5))
    idle = await world.idle()
    await world.finalizer.handle(idle)
    before = list(world.log.events)
    await world.finalizer.handle(idle)
    assert world.log.events == before


async def test_parts_sent_while_growing_are_not_sent_again(world: World) -> None:
    data = os.urandom(2 * C + C // 5)
    await record(world, data)
    await world.send_parts(1, 2)
    await world.finalizer.handle(await world.idle())
    sent = [e.part_number for e in world.of(PartUploaded) if isinstance(e, PartUploaded)]
    assert sorted(sent) == [1, 2, 3]  # 1 and 2 once, while growing; only the tail at the end
    assert completed(world).parts == 3 and await world.store.get_object(KEY) == data


async def test_a_completion_after_a_crash_before_its_event(world: World) -> None:
    # The process completed the upload and died before StreamCompleted. On
    # redelivery the upload is gone (list_parts: NoSuchUpload), so today the
    # finalizer starts a new one and sends the file again: correct, not cheap.
    data = os.urandom(2 * C)
    await record(world, data)
    upload_id = await world.send_parts(1, 2)
    layout = [(p.number, p.etag) for p in await world.store.list_parts(KEY, upload_id)]
    await world.store.complete_multipart(KEY, upload_id, layout)
    await world.finalizer.handle(await world.idle())
    assert completed(world).parts == 2
    assert await world.store.get_object(KEY) == data


class AnswerLost(MemoryStore):
    """CompleteMultipartUpload succeeds but its answer is lost: the retry of
    the request (inside S3Store) then hears NoSuchUpload."""

    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[tuple[int, str]], **checksums: Any
    ) -> str:
        await super().complete_multipart(key, upload_id, parts, **checksums)
        raise NoSuchUpload("s3 NoSuchUpload: completed by the attempt whose answer was lost")


async def test_a_completion_whose_answer_was_lost_is_recognised(tmp_path: Path) -> None:
    world = make_world(
        tmp_path, AnswerLost("bucket", min_part_size=C), MemoryLeases(MemoryEventLog())
    )
    data = os.urandom(2 * C)
    await record(world, data)
    await world.finalizer.handle(await world.idle())
    done = completed(world)
    info = await world.store.head_object(KEY)
    assert info is not None and done.etag == info.etag and done.parts == 2
    assert len(world.of(UploadStarted)) == 1  # not started again


class ExpiresOnListing(MemoryStore):
    """The stream's lease expires while the finalizer lists the parts."""

    guard: MemoryLeases

    async def list_parts(self, key: str, upload_id: str) -> list[RemotePart]:
        parts = await super().list_parts(key, upload_id)
        self.guard.expire(STREAM)
        return parts


async def test_a_lease_lost_before_completion_leaves_the_upload_open(tmp_path: Path) -> None:
    # Every part is in the store already, so nothing is appended between the
    # listing and the completion: only the lease check before it can notice.
    store, guard = ExpiresOnListing("bucket", min_part_size=C), MemoryLeases(MemoryEventLog())
    world = make_world(tmp_path, store, guard)
    await record(world, os.urandom(3 * C))
    upload_id = await world.send_parts(1, 2, 3)
    store.guard = guard
    with pytest.raises(LeaseLost):
        await world.finalizer.handle(await world.idle())
    assert await world.store.head_object(KEY) is None
    assert [u.upload_id for u in await world.store.list_uploads("")] == [upload_id]


async def test_an_upload_the_store_lost_is_started_again(world: World) -> None:
    data = os.urandom(2 * C + C // 5)
    await record(world, data)
    lost = await world.send_parts(1, 2)
    await world.store.abort_multipart(KEY, lost)  # a lifecycle rule, a hand
    await world.finalizer.handle(await world.idle())
    started = [e.upload_id for e in world.of(UploadStarted) if isinstance(e, UploadStarted)]
    assert len(started) == 2 and started[0] == lost and started[1] != lost
    assert completed(world).parts == 3 and await world.store.get_object(KEY) == data


async def test_a_part_patched_after_it_was_sent_is_sent_again(world: World) -> None:
    data = bytearray(os.urandom(2 * C + C // 5))
    await record(world, bytes(data))
    await world.send_parts(1, 2)
    data[40:44] = b"\x00\x00\x10\x00"  # the recorder rewrites the mdat size at the end
    world.path.write_bytes(bytes(data))
    await world.finalizer.handle(await world.idle())
    again = [e.part_number for e in world.of(PartUploaded) if isinstance(e, PartUploaded)]
    assert sorted(again) == [1, 1, 2, 3]  # part 1 twice, 2 (unchanged) once
    assert await world.store.get_object(KEY) == bytes(data)


async def test_an_orphan_upload_in_the_store_is_adopted_and_extras_aborted(
    world: World,
) -> None:
    # A crash after CreateMultipartUpload, twice, before UploadStarted (by a
    # service like this one: S3_CHECKSUM=auto, which MemoryStore verifies).
    await record(world, os.urandom(2 * C + C // 5))
    first = await world.store.create_multipart(KEY, "video/mp4", checksum="crc64nvme")
    await world.store.create_multipart(KEY, "video/mp4", checksum="crc64nvme")
    await world.finalizer.handle(await world.idle())
    started = [e.upload_id for e in world.of(UploadStarted) if isinstance(e, UploadStarted)]
    assert started == [first]
    assert await world.store.list_uploads("") == []
    assert completed(world).parts == 3


async def test_a_lost_lease_completes_nothing(world: World) -> None:
    await record(world, os.urandom(2 * C + C // 5))
    world.guard.lose(STREAM)
    with pytest.raises(LeaseLost):
        await world.finalizer.handle(await world.idle())
    assert world.of(StreamCompleted) == [] and await world.store.head_object(KEY) is None
    assert await world.store.list_uploads("") == []  # checked before CreateMultipartUpload


async def test_a_file_that_changed_since_it_went_idle_is_left_for_the_next_idle(
    world: World,
) -> None:
    await record(world, os.urandom(2 * C + C // 5))
    idle = await world.idle()
    with world.path.open("ab") as f:
        f.write(b"more")
    await world.finalizer.handle(idle)
    assert world.of(StreamCompleted) == [] and await world.store.head_object(KEY) is None


async def test_an_empty_file_ends_the_stream(world: World) -> None:
    await record(world, b"")
    with pytest.raises(StreamEnded) as caught:
        await world.finalizer.handle(await world.idle())
    assert caught.value.reason == "empty"


async def test_the_failer_aborts_the_upload_and_records_why(world: World) -> None:
    await record(world, os.urandom(2 * C + C // 5))
    await world.send_parts(1)
    await failer(world.deps, world.uploads)(STREAM, "unreadable", "EIO")
    [failed] = world.of(StreamFailed)
    assert isinstance(failed, StreamFailed) and failed.reason == "unreadable"
    assert await world.store.list_uploads("") == []
    s = (await world.deps.projection.catch_up()).streams.get(STREAM)
    assert s is None or s.terminal


class CountsHeads(MemoryStore):
    heads = 0

    async def head_object(self, key: str) -> Any:
        self.heads += 1
        return await super().head_object(key)


async def test_the_sidecar_takes_the_checksum_the_finalizer_saw(tmp_path: Path) -> None:
    # A small file on a store the probe showed verifying CRCs: the accepted
    # PutObject is the proof, so no HEAD at all; the completion carries the
    # verified checksum to the metadata writer, which asks nothing either.
    store = CountsHeads("bucket", min_part_size=C)
    world = make_world(tmp_path, store, MemoryLeases(MemoryEventLog()))
    data = os.urandom(C // 2)
    await record(world, data)
    await world.finalizer.handle(await world.idle())
    done = completed(world)
    assert done.checksum == checksum_of("crc64nvme", data) and store.heads == 0
    await MetadataWriter(world.deps).handle(done)
    assert store.heads == 0
    body = await store.get_object(f"{KEY}.metadata.json")
    assert body is not None
    sidecar = msgspec.json.decode(body)
    assert sidecar["checksum"]["value"] == done.checksum.split(":", 1)[1]


@pytest.mark.parametrize(
    ("size", "mode", "heads"),
    [
        (3 * C + 5, "auto", 1),  # multipart: the completion's object is HEADed
        (C // 2, "crc64nvme", 1),  # forced, not probed: this store may ignore it
        (C // 2, "md5", 1),  # Content-MD5 only: HEAD checks size (and any CRC)
    ],
)
async def test_other_completions_are_verified_with_a_head(
    tmp_path: Path, size: int, mode: str, heads: int
) -> None:
    store = CountsHeads("bucket", min_part_size=C)
    world = make_world(tmp_path, store, MemoryLeases(MemoryEventLog()), s3_checksum=mode)
    await record(world, os.urandom(size))
    await world.finalizer.handle(await world.idle())
    assert completed(world).size == size and store.heads == heads


class RecordsIntegrity(MemoryStore):
    """Records what each UploadPart carried to prove its body: (part number,
    Content-MD5) in ``content_md5``, (part number, signed SHA-256) in ``signed``."""

    def __init__(self, bucket: str, *, min_part_size: int) -> None:
        super().__init__(bucket, min_part_size=min_part_size)
        self.content_md5: list[tuple[int, str]] = []
        self.signed: list[tuple[int, str]] = []

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: Any, md5_b64: str, **kw: Any
    ) -> str:
        self.content_md5.append((number, md5_b64))
        self.signed.append((number, kw.get("payload_sha256", "")))
        return await super().upload_part(key, upload_id, number, body, md5_b64, **kw)


async def recorded_with(tmp_path: Path, mode: str) -> tuple[RecordsIntegrity, World, bytearray]:
    """A recording of three whole parts and a tail, in ``mode``, on a store
    that records what proved each part."""
    store = RecordsIntegrity("bucket", min_part_size=C)
    world = make_world(tmp_path, store, MemoryLeases(MemoryEventLog()), s3_checksum=mode)
    data = bytearray(os.urandom(3 * C + C // 5))
    await record(world, bytes(data))
    return store, world, data


async def test_md5_mode_rechecks_by_a_local_crc_and_resends_with_content_md5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store that verifies only Content-MD5 (S3_CHECKSUM=md5, the JuiceFS
    # gateway): the finalizer's re-read of the parts sent while the file grew
    # compares the CRC recorded with each, not a second MD5; the one part the
    # recorder patched is sent again with its new Content-MD5.
    store, world, data = await recorded_with(tmp_path, "md5")
    await world.send_parts(1, 2, 3)
    sent = [e for e in world.of(PartUploaded) if isinstance(e, PartUploaded)]
    assert all(e.checksum == "" and e.crc.startswith("crc64nvme:") for e in sent)
    data[40:44] = b"\x00\x00\x10\x00"
    world.path.write_bytes(bytes(data))
    hashed: list[int] = []
    real_md5_of = md5_of

    def counting(chunk: Any) -> tuple[str, str]:
        hashed.append(len(chunk))
        return real_md5_of(chunk)

    monkeypatch.setattr("consumers.uploads.md5_of", counting)
    await world.finalizer.handle(await world.idle())
    # MD5 only for what is sent: part 1 (patched) and the tail, not parts 2, 3.
    assert sorted(hashed) == sorted([C, C // 5])
    again = [e.part_number for e in world.of(PartUploaded) if isinstance(e, PartUploaded)]
    assert sorted(again) == [1, 1, 2, 3, 4]
    assert await world.store.get_object(KEY) == bytes(data)
    # Every part went with its Content-MD5, the resent part 1 with the new one.
    assert all(md5 for _, md5 in store.content_md5)
    assert store.content_md5[-2:] in (
        [(1, md5_of(bytes(data[:C]))[1]), (4, md5_of(bytes(data[3 * C :]))[1])],
        [(4, md5_of(bytes(data[3 * C :]))[1]), (1, md5_of(bytes(data[:C]))[1])],
    )


async def test_sidecar_sha256_finalizes_with_a_single_part_in_flight(tmp_path: Path) -> None:
    # The hash of part n holds its buffer; with MAX_PARTS_IN_FLIGHT=1 reading
    # part n+1 before letting it go would wait forever.
    world = make_world(
        tmp_path, MemoryStore("bucket", min_part_size=C), MemoryLeases(MemoryEventLog()),
        sidecar_sha256=True, max_parts_in_flight=1,
    )  # fmt: skip
    data = os.urandom(3 * C + 7)
    await record(world, data)
    await asyncio.wait_for(world.finalizer.handle(await world.idle()), 10)
    assert completed(world).sha256 == hashlib.sha256(data).hexdigest()
    assert await world.store.get_object(KEY) == data
    assert world.uploads.buffers.lent == 0


async def test_a_cancelled_read_keeps_its_buffer_until_the_thread_is_done(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cancelling the await does not stop the thread that fills the buffer: if
    # the buffer were lent again at once, the thread could write into the next
    # part read into it.
    await record(world, os.urandom(C))
    go, started = threading.Event(), threading.Event()
    real = uploads_module._read_and_digest

    def slow(*args: Any) -> Any:
        started.set()
        go.wait(10)
        return real(*args)

    monkeypatch.setattr(uploads_module, "_read_and_digest", slow)
    reading = asyncio.ensure_future(
        world.uploads.read(await world.state(), Span(1, 0, C), "crc64nvme", send=True)
    )
    await asyncio.to_thread(started.wait, 10)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert world.uploads.buffers.lent == 1  # still the thread's
    go.set()
    for _ in range(200):
        if world.uploads.buffers.lent == 0:
            break
        await asyncio.sleep(0.01)
    assert world.uploads.buffers.lent == 0


async def test_sha256_mode_signs_each_send_with_the_digest_read_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store that checks only signed payloads (S3_CHECKSUM=sha256, the
    # JuiceFS gateway; MemoryStore refuses a digest that is not the body's):
    # each part's SHA-256 is computed once, in the thread that read it, and
    # the part the recorder patched goes again with the new one.
    store, world, data = await recorded_with(tmp_path, "sha256")
    hashed: list[int] = []
    callers: list[str] = []
    real = checksums.sha256_hex

    def counting(chunk: Any) -> str:
        hashed.append(len(chunk))
        callers.append(sys._getframe(1).f_code.co_name)
        return real(chunk)

    monkeypatch.setattr(checksums, "sha256_hex", counting)
    await world.send_parts(1, 2, 3)
    assert sorted(hashed) == [C, C, C]  # never twice
    assert callers == ["_read_and_digest"] * 3  # by the thread that read the part
    sent = [e for e in world.of(PartUploaded) if isinstance(e, PartUploaded)]
    assert all(e.checksum == "" and e.crc.startswith("crc64nvme:") for e in sent)
    data[40:44] = b"\x00\x00\x10\x00"
    world.path.write_bytes(bytes(data))
    await world.finalizer.handle(await world.idle())
    assert await world.store.get_object(KEY) == bytes(data)
    # Parts 2 and 3 were compared by their CRC, not hashed: part 1 again and the tail.
    assert sorted(hashed) == sorted([C, C, C, C, C // 5])
    assert sorted(n for n, _ in store.signed[:3]) == [1, 2, 3]  # while it grew
    assert all(digest for _, digest in store.signed)
    # At the end: part 1 with the patch and the tail, each with its own digest.
    want = {1: real(bytes(data[:C])), 4: real(bytes(data[3 * C :]))}
    assert dict(store.signed[3:]) == want
