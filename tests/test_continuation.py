"""A recording that pauses past STREAM_TIMEOUT_SECONDS and then goes on.

The first stream completes during the pause (its object is the file as it was
then, and stays so). The continued file becomes a second stream and a second
object holding the whole file; the parts the first object already holds are
copied inside S3 (UploadPartCopy), so the bytes *sent* for the continuation
are only those outside the copied parts. That is measured with the service's
own ``cefmp4_bytes_uploaded``, before and after the continuation.

Real Redis, real SeaweedFS (whose copy ETags are not MD5s, see the storage
contract), the service running in-process; the pure rule behind the copy
(``unchanged_in``) and the sidecar's ``continues`` are tested on their own
below.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cefmp4.adapters import checksums
from cefmp4.domain.events import Continues, StreamCompleted
from cefmp4.domain.partplan import PartPlan, Span, final_parts
from consumers.metadata import Probe, checksum_field, sidecar
from consumers.uploads import unchanged_in
from projections.streams import Completion, Part, StreamState
from tests.harness import Harness, History, MiB, objects, open_uploads, running

CHUNK = 5 * MiB  # the harness default; STREAM_TIMEOUT_SECONDS is 3 s there


def _sent(h: Harness) -> float:
    return h.registry.get_sample_value("cefmp4_bytes_uploaded_total") or 0.0


def _copied_parts(h: Harness) -> float:
    value = h.registry.get_sample_value("cefmp4_parts_uploaded_total", {"why": "copied"})
    return value or 0.0


async def _first_completion(h: Harness, path: Path) -> StreamState:
    def completed(p: History) -> bool:
        s = p.for_path(str(path))
        return s is not None and s.status == "completed"

    state = (await h.until(completed, what=f"{path} completed")).for_path(str(path))
    assert state is not None
    return state


async def _continuation_done(h: Harness, path: Path, first: StreamState) -> StreamState:
    def done(p: History) -> bool:
        s = p.for_path(str(path))
        return s is not None and s.stream_id != first.stream_id and s.metadata_key is not None

    state = (await h.until(done, what=f"{path} continued and finished")).for_path(str(path))
    assert state is not None
    assert state.status == "completed", (state.failure_reason, state.failure_detail)
    return state


def _unchanged_parts(old: bytes, new: bytes) -> list[int]:
    """Parts of ``new``'s plan that ``old``'s plan has with the same bytes."""
    earlier = {(sp.offset, sp.size) for sp in final_parts(len(old), PartPlan.uniform(CHUNK))}
    return [
        sp.number
        for sp in final_parts(len(new), PartPlan.uniform(CHUNK))
        if (sp.offset, sp.size) in earlier and old[sp.offset : sp.end] == new[sp.offset : sp.end]
    ]


def _assert_objects(
    s3_client: Any, bucket: str, first: StreamState, second: StreamState, old: bytes, new: bytes
) -> dict[str, Any]:
    """Both objects byte-exact, nothing else, no upload left open; returns the
    second object's sidecar."""
    stored = objects(s3_client, bucket)
    assert stored[first.key] == old, "the first object is not the file as it was"
    assert stored[second.key] == new, "the second object is not the whole file"
    videos = [k for k in stored if not k.endswith(".metadata.json")]
    assert sorted(videos) == sorted([first.key, second.key])
    assert open_uploads(s3_client, bucket) == []
    doc: dict[str, Any] = json.loads(stored[f"{second.key}.metadata.json"])
    assert doc["sha256"] in (None, hashlib.sha256(new).hexdigest())
    assert doc["checksum"] == checksum_field(checksums.checksum_of("crc64nvme", new))
    assert doc["continues"] == {
        "stream_id": first.stream_id,
        "s3_key": first.key,
        "size_bytes": len(old),
    }
    return doc


async def test_pause_past_timeout_then_append_copies_the_unchanged_prefix(
    make_config: Any, watch: Path, s3_client: Any, bucket: str
) -> None:
    dst = watch / "cam" / "long.mp4"
    dst.parent.mkdir()
    old = os.urandom(12 * MiB)
    new = old + os.urandom(6 * MiB)
    async with running(make_config()) as h:
        dst.write_bytes(old)
        first = await _first_completion(h, dst)
        sent, copied = _sent(h), _copied_parts(h)
        with dst.open("ab") as recorder:  # the same inode: the recorder goes on
            recorder.write(new[len(old) :])
        second = await _continuation_done(h, dst, first)
        sent, copied = _sent(h) - sent, _copied_parts(h) - copied
    doc = _assert_objects(s3_client, bucket, first, second, old, new)
    # Parts 1 and 2 ([0, 10 MiB)) are the first object's parts 1 and 2: copied.
    # Part 3 covered [10, 12 MiB) there and is [10, 15 MiB) now: sent, like the tail.
    assert _unchanged_parts(old, new) == [1, 2]
    assert copied == 2
    assert sent == len(new) - 2 * CHUNK
    assert second.continues is not None and second.continues.stream_id == first.stream_id
    assert [c["copied"] for c in doc["chunks"]] == [True, True, False, False]
    assert [second.parts[n].copied for n in (1, 2, 3, 4)] == [True, True, False, False]
    # The MD5 recorded for a copied part is the file's, whatever the copy's ETag.
    assert second.parts[1].md5 == hashlib.md5(new[:CHUNK]).hexdigest()


async def test_continuation_with_a_patched_header_sends_that_part_and_copies_the_rest(
    make_config: Any, watch: Path, s3_client: Any, bucket: str
) -> None:
    dst = watch / "patched.mp4"
    old = os.urandom(12 * MiB)
    patched = bytearray(old + os.urandom(6 * MiB))
    patched[40] ^= 0xFF  # e.g. the mdat size in the header, rewritten as the recording goes on
    new = bytes(patched)
    async with running(make_config()) as h:
        dst.write_bytes(old)
        first = await _first_completion(h, dst)
        sent = _sent(h)
        with dst.open("r+b") as recorder:
            # Append first, then patch: every look the watcher takes at the
            # file sees it grown. (Patching first would let it catch a
            # same-size rewrite in between: a plain new stream, all sent.)
            recorder.seek(len(old))
            recorder.write(new[len(old) :])
            recorder.flush()
            recorder.seek(40)
            recorder.write(new[40:41])
        second = await _continuation_done(h, dst, first)
        sent = _sent(h) - sent
        events = await h.events()
    _assert_objects(s3_client, bucket, first, second, old, new)
    assert _unchanged_parts(old, new) == [2]
    # Part 1 may have been copied before the patch landed and then sent again
    # by the finalizer's re-read, or sent at once: either way it went up once,
    # and only the unchanged part 2 stays copied.
    assert sent == len(new) - CHUNK
    assert [second.parts[n].copied for n in (1, 2, 3, 4)] == [False, True, False, False]
    assert any(
        isinstance(e, StreamCompleted) and e.stream_id == second.stream_id for _, e in events
    )


async def test_continued_object_deleted_meanwhile_sends_every_part(
    make_config: Any, watch: Path, s3_client: Any, bucket: str
) -> None:
    # The copy is an optimisation: a first object that is gone (deleted by
    # hand, a lifecycle rule) costs the bytes, never the recording.
    dst = watch / "gone.mp4"
    old = os.urandom(12 * MiB)
    new = old + os.urandom(6 * MiB)
    async with running(make_config()) as h:
        dst.write_bytes(old)
        first = await _first_completion(h, dst)
        s3_client.delete_object(Bucket=bucket, Key=first.key)
        sent = _sent(h)
        with dst.open("ab") as recorder:
            recorder.write(new[len(old) :])
        second = await _continuation_done(h, dst, first)
        sent = _sent(h) - sent
    stored = objects(s3_client, bucket)
    assert first.key not in stored
    assert stored[second.key] == new
    assert sent == len(new)
    assert not any(p.copied for p in second.parts.values())
    assert open_uploads(s3_client, bucket) == []


# --- the pure parts ---------------------------------------------------------

MD5S = ("a" * 32, "b" * 32, "c" * 32)
EARLIER = Continues("s0", "k/s0", 12 * MiB, CHUNK, MD5S)  # parts 5, 5 and 2 MiB


@pytest.mark.parametrize(
    ("continues", "span", "md5", "copy"),
    [
        (EARLIER, Span(1, 0, CHUNK), "a" * 32, True),
        (EARLIER, Span(2, CHUNK, CHUNK), "b" * 32, True),
        # same number and span, other bytes: the recorder patched it
        (EARLIER, Span(1, 0, CHUNK), "f" * 32, False),
        # another part's MD5 does not count: it is about the same span
        (EARLIER, Span(2, CHUNK, CHUNK), "a" * 32, False),
        # the earlier tail was 2 MiB; a whole part 3 goes past the earlier object
        (EARLIER, Span(3, 2 * CHUNK, CHUNK), "c" * 32, False),
        # the tail's own span is copyable (a file that ended on a part boundary)
        (EARLIER, Span(3, 2 * CHUNK, 2 * MiB), "c" * 32, True),
        (EARLIER, Span(4, 3 * CHUNK, CHUNK), "c" * 32, False),  # beyond its parts
        # another CHUNK_SIZE_BYTES since: other spans, nothing copied
        (EARLIER, Span(1, 0, 2 * CHUNK), "a" * 32, False),
        (Continues("s0", "k/s0", 12 * MiB), Span(1, 0, CHUNK), "a" * 32, False),  # one PutObject
        (None, Span(1, 0, CHUNK), "a" * 32, False),
    ],
)
def test_unchanged_in(continues: Continues | None, span: Span, md5: str, copy: bool) -> None:
    assert unchanged_in(continues, span, md5) is copy


T0 = datetime(2024, 5, 17, 13, 0, tzinfo=UTC)


def test_sidecar_names_the_continued_object_and_marks_copied_chunks() -> None:
    parts = {
        1: Part(1, 0, CHUNK, "x-2", "a" * 32, T0, copied=True),
        2: Part(2, CHUNK, MiB, "e2", "d" * 32, T0),
    }
    completion = Completion(CHUNK + MiB, 1, "m-2", "h", 2, "invalid", "", T0)
    s = StreamState(
        "s1", "/w/a.mp4", "a.mp4", "b", "k/s1", 1, T0, "completed",
        parts=parts, completion=completion, continues=EARLIER,
    )  # fmt: skip
    event = StreamCompleted(
        stream_id="s1", at=T0, bucket="b", key="k/s1", size=CHUNK + MiB, etag="m-2",
        sha256="h", mtime_ns=1, parts=2, mp4="invalid",
    )  # fmt: skip
    probe = Probe(None, None, [], "not an mp4")
    doc = sidecar(s, event, probe, "streams/", T0)
    assert doc["continues"] == {"stream_id": "s0", "s3_key": "k/s0", "size_bytes": 12 * MiB}
    assert [(c["part_number"], c["copied"]) for c in doc["chunks"]] == [(1, True), (2, False)]
    plain = sidecar(msgspec.structs.replace(s, continues=None), event, probe, "streams/", T0)
    assert "continues" not in plain and all("copied" not in c for c in plain["chunks"])
