"""The ObjectStore contract: what CefMP4 relies on from any S3-compatible store.

Subclass :class:`StorageContract` in a ``test_*.py`` module, give it a
``store`` fixture (an empty bucket, ``ensure_bucket`` done) and a
``paged_store`` fixture (the same kind of store, listing at most three keys
per request, so that pagination is exercised), and set the class attributes
that say where the backend is more lenient than S3. ``tests/test_storage_contract.py``
runs it against S3Store on SeaweedFS and on the JuiceFS gateway, and against
MemoryStore. A backend that breaks a rule here would break byte-exactness or
cleanup.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from datetime import UTC, datetime, timedelta

import prometheus_client
import pytest

from cefmp4.adapters.blocked import Blocked
from cefmp4.adapters.checksums import Crc, checksum_of, combine_tagged, md5_of, multipart_etag
from cefmp4.adapters.metrics import Metrics
from cefmp4.adapters.storage import ObjectStore
from cefmp4.domain.errors import NoSuchKey, NoSuchUpload, PermanentError

MiB = 1024 * 1024


async def put(store: ObjectStore, key: str, body: bytes) -> str:
    return await store.put_object(key, body, md5_of(body)[1], "application/octet-stream")


async def two_part_upload(store: ObjectStore, key: str) -> tuple[str, bytes, list[tuple[int, str]]]:
    """An upload holding a 5 MiB part 1 and a short part 2: (id, bytes, layout)."""
    first, last = os.urandom(5 * MiB), os.urandom(1234)
    upload_id = await store.create_multipart(key, "video/mp4")
    e1 = await store.upload_part(key, upload_id, 1, first, md5_of(first)[1])
    e2 = await store.upload_part(key, upload_id, 2, last, md5_of(last)[1])
    return upload_id, first + last, [(1, e1), (2, e2)]


class StorageContract:
    # Whether the backend enforces S3's 5 MiB minimum for non-last parts. The
    # service never relies on a rejection (it never sends a short non-last
    # part); tests run on a strict backend so that such a bug cannot pass.
    strict_part_size = True
    # Whether part numbers outside 1..10,000 are refused (JuiceFS takes 0).
    strict_part_numbers = True
    # Whether UploadPartCopy answers with the MD5 of the copied bytes as the
    # part's ETag (AWS, JuiceFS and MemoryStore do). SeaweedFS does not: it
    # returns an ETag of its own chunks (e.g. "...-2" for a range over two of
    # them), the same one list_parts reports and complete accepts. So the
    # service never takes a copied part's ETag for its MD5.
    copy_etag_is_md5 = True
    # Whether list_parts may list a part number twice after it was sent again
    # with other bytes: SeaweedFS reports the earlier version as well (both,
    # in sending order), and completion takes the newer. Uploads.reconcile
    # copes (it drops the stale one, whose ETag is not the file's MD5).
    lists_replaced_parts = False
    # Whether an upload id is refused (NoSuchUpload) with a key other than its
    # own. JuiceFS takes the part; the service always sends the stream's key.
    checks_upload_key = True
    # Whether a body whose signed SHA-256 (x-amz-content-sha256) does not
    # match is refused: True/False where the backend is known, None where the
    # session's server may be either (SeaweedFS does not check; MinIO does).
    verifies_signed_payload: bool | None = None

    @pytest.fixture
    def store(self) -> ObjectStore:
        raise NotImplementedError("a StorageContract subclass provides the store fixture")

    @pytest.fixture
    def paged_store(self) -> ObjectStore:
        raise NotImplementedError("a StorageContract subclass provides the paged_store fixture")

    async def test_ensure_bucket_is_idempotent(self, store: ObjectStore) -> None:
        await put(store, "kept", b"x")
        await store.ensure_bucket()
        await store.ensure_bucket()
        assert await store.head_object("nothing/here") is None
        assert await store.get_object("kept") == b"x"  # ensuring does not empty it

    async def test_waiting_while_blocked_is_the_same_bucket(self, store: ObjectStore) -> None:
        blocked = Blocked(Metrics(prometheus_client.CollectorRegistry()).blocked)
        waiting = store.waiting_while_blocked(blocked)
        assert waiting.bucket == store.bucket
        await put(waiting, "through-the-wrapper", b"abc")
        info = await store.head_object("through-the-wrapper")
        assert info is not None and info.size == 3

    async def test_multipart_round_trip_and_etags(self, store: ObjectStore) -> None:
        key = "streams/s1/cam/a.mp4"
        first, last = os.urandom(5 * MiB), os.urandom(1234)
        before = datetime.now(UTC) - timedelta(minutes=1)
        upload_id = await store.create_multipart(key, "video/mp4")
        uploads = await store.list_uploads("streams/s1/")
        assert [(u.key, u.upload_id) for u in uploads] == [(key, upload_id)]
        initiated = uploads[0].initiated
        assert initiated.utcoffset() == timedelta(0)  # aware, UTC
        assert before <= initiated <= datetime.now(UTC) + timedelta(minutes=1)
        assert await store.list_uploads("streams/other/") == []
        assert await store.list_parts(key, upload_id) == []
        etag1 = await store.upload_part(key, upload_id, 1, first, md5_of(first)[1])
        etag2 = await store.upload_part(key, upload_id, 2, last, md5_of(last)[1])
        # ETag = MD5 of the part: what a restart uses to adopt parts the log lacks.
        assert (etag1, etag2) == (md5_of(first)[0], md5_of(last)[0])
        listed = await store.list_parts(key, upload_id)
        assert [(p.number, p.size, p.etag) for p in listed] == [
            (1, len(first), etag1),
            (2, len(last), etag2),
        ]
        # Re-sending a part under the same number replaces it (idempotent resend).
        assert await store.upload_part(key, upload_id, 2, last, md5_of(last)[1]) == etag2
        assert await store.head_object(key) is None  # nothing visible before completion
        etag = await store.complete_multipart(key, upload_id, [(1, etag1), (2, etag2)])
        assert etag == multipart_etag([etag1, etag2])
        info = await store.head_object(key)
        assert info is not None and info.size == len(first) + len(last) and info.etag == etag
        assert await store.get_object(key) == first + last
        assert await store.list_uploads("streams/s1/") == []

    async def test_a_part_sent_again_with_other_bytes_replaces_it(self, store: ObjectStore) -> None:
        # What the finalizer does when the recorder patched bytes already sent.
        key = "patched.mp4"
        upload_id, _, _ = await two_part_upload(store, key)
        patched = os.urandom(5 * MiB)
        etag = await store.upload_part(key, upload_id, 1, patched, md5_of(patched)[1])
        assert etag == md5_of(patched)[0]
        parts = await store.list_parts(key, upload_id)
        listed = [(p.number, p.etag) for p in parts]
        if self.lists_replaced_parts:
            assert (1, etag) in listed
        else:
            assert listed[0] == (1, etag) and [n for n, _ in listed] == [1, 2]
        last = [p for p in parts if p.number == 2][-1]
        await store.complete_multipart(key, upload_id, [(1, etag), (2, last.etag)])
        body = await store.get_object(key)
        assert body is not None and body[: 5 * MiB] == patched
        assert len(body) == 5 * MiB + last.size

    async def test_list_parts_is_ascending_whatever_the_sending_order(
        self, store: ObjectStore
    ) -> None:
        key = "out-of-order.mp4"
        upload_id = await store.create_multipart(key, "video/mp4")
        for number in (3, 1, 2):
            body = bytes([number]) * 10
            await store.upload_part(key, upload_id, number, body, md5_of(body)[1])
        assert [p.number for p in await store.list_parts(key, upload_id)] == [1, 2, 3]
        await store.abort_multipart(key, upload_id)

    async def test_small_non_last_part_at_completion(self, store: ObjectStore) -> None:
        key = "small-parts.mp4"
        upload_id = await store.create_multipart(key, "video/mp4")
        a, b = os.urandom(MiB), os.urandom(MiB)
        e1 = await store.upload_part(key, upload_id, 1, a, md5_of(a)[1])
        e2 = await store.upload_part(key, upload_id, 2, b, md5_of(b)[1])
        if self.strict_part_size:
            with pytest.raises(PermanentError) as caught:
                await store.complete_multipart(key, upload_id, [(1, e1), (2, e2)])
            assert not isinstance(caught.value, NoSuchUpload)
            assert caught.value.reason == "s3_rejected" and "EntityTooSmall" in str(caught.value)
            assert await store.head_object(key) is None
            await store.abort_multipart(key, upload_id)  # the refusal left the upload open
        else:
            await store.complete_multipart(key, upload_id, [(1, e1), (2, e2)])
            info = await store.head_object(key)
            assert info is not None and info.size == 2 * MiB

    async def test_a_single_short_part_completes(self, store: ObjectStore) -> None:
        key = "one-part.mp4"
        upload_id = await store.create_multipart(key, "video/mp4")
        body = b"short last part"
        etag = await store.upload_part(key, upload_id, 1, body, md5_of(body)[1])
        assert await store.complete_multipart(key, upload_id, [(1, etag)]) == multipart_etag([etag])
        assert await store.get_object(key) == body

    async def test_completion_checks_the_layout(self, store: ObjectStore) -> None:
        key = "layout.mp4"
        upload_id, body, layout = await two_part_upload(store, key)
        (n1, e1), (n2, e2) = layout
        # A part the store does not hold under that ETag: the finalizer's cue
        # to list the parts again (reason s3_invalid_part), never NoSuchUpload.
        with pytest.raises(PermanentError) as caught:
            await store.complete_multipart(key, upload_id, [(n1, e1), (n2, e1)])
        assert not isinstance(caught.value, NoSuchUpload)
        assert caught.value.reason == "s3_invalid_part"
        with pytest.raises(PermanentError) as caught:
            await store.complete_multipart(key, upload_id, [(n2, e2), (n1, e1)])
        assert not isinstance(caught.value, NoSuchUpload)
        assert "InvalidPartOrder" in str(caught.value)
        # Refusals leave the upload as it was.
        assert [p.number for p in await store.list_parts(key, upload_id)] == [1, 2]
        await store.complete_multipart(key, upload_id, layout)
        assert await store.get_object(key) == body

    async def test_part_numbers_outside_the_range_are_refused(self, store: ObjectStore) -> None:
        key = "numbers.mp4"
        upload_id = await store.create_multipart(key, "video/mp4")
        body = b"data"
        with pytest.raises(PermanentError) as caught:
            await store.upload_part(key, upload_id, 10_001, body, md5_of(body)[1])
        assert not isinstance(caught.value, NoSuchUpload)
        if self.strict_part_numbers:
            with pytest.raises(PermanentError) as caught:
                await store.upload_part(key, upload_id, 0, body, md5_of(body)[1])
            assert not isinstance(caught.value, NoSuchUpload)
            assert await store.list_parts(key, upload_id) == []
        await store.abort_multipart(key, upload_id)

    async def test_wrong_content_md5_is_refused(self, store: ObjectStore) -> None:
        key = "bad-digest.mp4"
        upload_id = await store.create_multipart(key, "video/mp4")
        with pytest.raises(PermanentError) as caught:
            await store.upload_part(key, upload_id, 1, b"x" * 1000, md5_of(b"y" * 1000)[1])
        assert caught.value.reason == "s3_rejected" and "BadDigest" in str(caught.value)
        assert await store.list_parts(key, upload_id) == []
        await store.abort_multipart(key, upload_id)
        with pytest.raises(PermanentError) as caught:
            await store.put_object("bad.json", b"x", md5_of(b"y")[1], "application/json")
        assert caught.value.reason == "s3_rejected" and "BadDigest" in str(caught.value)
        with pytest.raises(PermanentError) as caught:
            await store.put_object("bad.json", b"x", "not base64!", "application/json")
        assert caught.value.reason == "s3_rejected" and "InvalidDigest" in str(caught.value)
        assert await store.head_object("bad.json") is None

    async def test_abort_makes_the_upload_gone(self, store: ObjectStore) -> None:
        key = "aborted.mp4"
        upload_id, _, layout = await two_part_upload(store, key)
        await store.abort_multipart(key, upload_id)
        assert await store.list_uploads("aborted") == []
        with pytest.raises(NoSuchUpload):
            await store.upload_part(key, upload_id, 1, b"data", md5_of(b"data")[1])
        with pytest.raises(NoSuchUpload):
            await store.list_parts(key, upload_id)
        with pytest.raises(NoSuchUpload):
            await store.complete_multipart(key, upload_id, layout)
        assert await store.head_object(key) is None
        # Aborting again: done already. S3 and JuiceFS say NoSuchUpload,
        # SeaweedFS says nothing; callers take either as success.
        with contextlib.suppress(NoSuchUpload):
            await store.abort_multipart(key, upload_id)

    async def test_a_completed_upload_is_gone(self, store: ObjectStore) -> None:
        key = "completed.mp4"
        upload_id, body, layout = await two_part_upload(store, key)
        etag = await store.complete_multipart(key, upload_id, layout)
        with pytest.raises(NoSuchUpload):
            await store.upload_part(key, upload_id, 3, b"late", md5_of(b"late")[1])
        with pytest.raises(NoSuchUpload):
            await store.list_parts(key, upload_id)
        # Completing again (a crash swallowed the answer): NoSuchUpload, which
        # the finalizer resolves with head_object, or (SeaweedFS) the same ETag.
        with contextlib.suppress(NoSuchUpload):
            assert await store.complete_multipart(key, upload_id, layout) == etag
        with contextlib.suppress(NoSuchUpload):
            await store.abort_multipart(key, upload_id)
        info = await store.head_object(key)
        assert info is not None and info.etag == etag  # the object outlives its upload
        assert await store.get_object(key) == body

    async def test_unknown_upload_id_is_no_such_upload(self, store: ObjectStore) -> None:
        real = await store.create_multipart("known.mp4", "video/mp4")
        wrong = [("known.mp4", "no-such-id")]
        if self.checks_upload_key:
            wrong.append(("other.mp4", real))
        for key, upload_id in wrong:
            with pytest.raises(NoSuchUpload):
                await store.upload_part(key, upload_id, 1, b"d", md5_of(b"d")[1])
            with pytest.raises(NoSuchUpload):
                await store.abort_multipart(key, upload_id)
        with pytest.raises(NoSuchUpload):
            await store.list_parts("known.mp4", "no-such-id")
        await store.abort_multipart("known.mp4", real)

    async def test_list_uploads_by_prefix(self, store: ObjectStore) -> None:
        a1 = await store.create_multipart("up/b.mp4", "video/mp4")
        a2 = await store.create_multipart("up/b.mp4", "video/mp4")  # a second one, same key
        c = await store.create_multipart("up/a.mp4", "video/mp4")
        await store.create_multipart("upper.mp4", "video/mp4")
        listed = await store.list_uploads("up/")
        assert [u.key for u in listed] == ["up/a.mp4", "up/b.mp4", "up/b.mp4"]  # by key
        assert {u.upload_id for u in listed} == {a1, a2, c}
        assert len(await store.list_uploads("up")) == 4
        await store.abort_multipart("up/b.mp4", a1)
        assert [u.upload_id for u in await store.list_uploads("up/b")] == [a2]

    async def test_put_object_and_overwrite_same_key(self, store: ObjectStore) -> None:
        first, second = b'{"a": 1}', b'{"a": 2, "b": "longer"}'
        assert await put(store, "x.json", first) == md5_of(first)[0]
        # A second put to the key replaces the body (a sidecar written twice).
        assert await put(store, "x.json", second) == md5_of(second)[0]
        info = await store.head_object("x.json")
        assert info is not None and info.size == len(second) and info.etag == md5_of(second)[0]
        assert await store.get_object("x.json") == second

    async def test_get_object_returns_the_body_or_none(self, store: ObjectStore) -> None:
        body = os.urandom(300_000) + b"\x00end"
        await put(store, "archive/blob.bin", body)
        assert await store.get_object("archive/blob.bin") == body
        assert await store.get_object("archive/missing.bin") is None
        assert await store.head_object("archive/missing.bin") is None
        await put(store, "archive/empty.bin", b"")
        assert await store.get_object("archive/empty.bin") == b""
        info = await store.head_object("archive/empty.bin")
        assert info is not None and info.size == 0 and info.etag == md5_of(b"")[0]

    async def test_list_keys_is_ascending_under_the_prefix_after_start_after(
        self, store: ObjectStore
    ) -> None:
        # (no key that is also a "directory" of another: JuiceFS is a file system)
        keys = ["ev/b", "ev/a", "ev/d/x", "ev/c-1", "ev/c", "ev0", "other/a", "e"]
        for key in keys:
            await put(store, key, b"x")
        under = sorted(k for k in keys if k.startswith("ev/"))
        assert await store.list_keys("ev/") == under == ["ev/a", "ev/b", "ev/c", "ev/c-1", "ev/d/x"]
        assert await store.list_keys("ev/", start_after="ev/b") == ["ev/c", "ev/c-1", "ev/d/x"]
        # start_after need not be a key that exists
        assert await store.list_keys("ev/", start_after="ev/bb") == ["ev/c", "ev/c-1", "ev/d/x"]
        assert await store.list_keys("ev/", start_after="ev/d/x") == []
        assert await store.list_keys("nothing/") == []
        # multipart uploads under way are not objects
        await store.create_multipart("ev/open", "video/mp4")
        assert "ev/open" not in await store.list_keys("ev/")

    async def test_list_keys_pages_through_more_keys_than_one_page(
        self, paged_store: ObjectStore
    ) -> None:
        keys = [f"seg/{i:04d}" for i in range(11)]
        for key in keys:
            await put(paged_store, key, b"")
        await put(paged_store, "segz", b"")  # sorts right after the prefix's keys
        assert await paged_store.list_keys("seg/") == keys
        assert await paged_store.list_keys("seg/", start_after=keys[4]) == keys[5:]
        assert await paged_store.list_keys("seg/", start_after=keys[8]) == keys[9:]

    async def test_upload_part_copy_copies_a_range_inside_the_store(
        self, store: ObjectStore
    ) -> None:
        # What a continuation relies on: a range of a completed object becomes a
        # part of another upload without its bytes crossing the network.
        earlier = os.urandom(11 * MiB)
        await put(store, "streams/s1/a.mp4", earlier)
        key = "streams/s2/a.mp4"
        first = earlier[: 5 * MiB]
        middle = earlier[5 * MiB + 7 : 10 * MiB + 7]  # any range, not only a part's
        tail = os.urandom(2 * MiB)
        upload_id = await store.create_multipart(key, "video/mp4")
        etag1 = await store.upload_part_copy(key, upload_id, 1, "streams/s1/a.mp4", 0, 5 * MiB)
        etag2 = await store.upload_part_copy(
            key, upload_id, 2, "streams/s1/a.mp4", 5 * MiB + 7, 5 * MiB
        )
        if self.copy_etag_is_md5:
            assert (etag1, etag2) == (md5_of(first)[0], md5_of(middle)[0])
        listed = await store.list_parts(key, upload_id)
        assert [(p.number, p.size, p.etag) for p in listed] == [
            (1, 5 * MiB, etag1),
            (2, 5 * MiB, etag2),
        ]
        etag3 = await store.upload_part(key, upload_id, 3, tail, md5_of(tail)[1])
        await store.complete_multipart(key, upload_id, [(1, etag1), (2, etag2), (3, etag3)])
        assert await store.get_object(key) == first + middle + tail
        assert await store.get_object("streams/s1/a.mp4") == earlier  # the source is untouched
        assert await store.list_uploads("streams/") == []

    async def test_upload_part_copy_errors(self, store: ObjectStore) -> None:
        key = "streams/s3/a.mp4"
        upload_id = await store.create_multipart(key, "video/mp4")
        with pytest.raises(NoSuchKey):
            await store.upload_part_copy(key, upload_id, 1, "streams/none/a.mp4", 0, 5 * MiB)
        await put(store, "streams/s1/a.mp4", b"x" * 100)
        with pytest.raises(PermanentError) as caught:  # InvalidRange, or InvalidArgument (JuiceFS)
            await store.upload_part_copy(key, upload_id, 1, "streams/s1/a.mp4", 50, 100)
        assert not isinstance(caught.value, NoSuchUpload | NoSuchKey)
        with pytest.raises(ValueError):  # refused before any request
            await store.upload_part_copy(key, upload_id, 1, "streams/s1/a.mp4", 0, 0)
        assert await store.list_parts(key, upload_id) == []
        await store.abort_multipart(key, upload_id)
        with pytest.raises(NoSuchUpload):
            await store.upload_part_copy(key, upload_id, 1, "streams/s1/a.mp4", 0, 100)

    @pytest.mark.parametrize("algorithm", ["crc64nvme", "crc32c"])
    async def test_checksum_probe_answers_and_leaves_nothing(
        self, store: ObjectStore, algorithm: Crc
    ) -> None:
        why = await store.probe_checksum(algorithm, "probe/scratch")
        assert why is None or why  # None: verified end to end; else a reason
        assert await store.list_uploads("probe/") == []
        assert await store.list_keys("probe/") == []

    async def test_clear_scratch_removes_objects_and_uploads_under_the_prefix_only(
        self, store: ObjectStore
    ) -> None:
        await store.put_object("s/.probe-1", b"left", "", "text/plain")
        upload_id = await store.create_multipart("s/.probe-2", "video/mp4")
        await store.put_object("s/.probf", b"kept", "", "text/plain")  # another prefix
        kept_upload = await store.create_multipart("s/1/a.mp4", "video/mp4")
        assert await store.clear_scratch("s/.probe-") == 2
        assert await store.list_keys("s/") == ["s/.probf"]
        assert [u.upload_id for u in await store.list_uploads("s/")] == [kept_upload]
        with pytest.raises(NoSuchUpload):
            await store.list_parts("s/.probe-2", upload_id)
        assert await store.clear_scratch("s/.probe-") == 0  # idempotent
        await store.abort_multipart("s/1/a.mp4", kept_upload)

    async def test_signed_payload_probe_says_what_the_store_does_and_leaves_nothing(
        self, store: ObjectStore
    ) -> None:
        why = await store.probe_signed_payload("probe/signed")
        if self.verifies_signed_payload is not None:
            assert (why is None) == self.verifies_signed_payload, why
        assert why is None or why
        assert await store.list_keys("probe/") == []

    async def test_signed_bodies_are_stored_exactly(self, store: ObjectStore) -> None:
        key = "streams/signed/a.mp4"
        first, last = os.urandom(5 * MiB), os.urandom(1000)
        upload_id = await store.create_multipart(key, "video/mp4")
        h1, h2 = hashlib.sha256(first).hexdigest(), hashlib.sha256(last).hexdigest()
        if self.verifies_signed_payload:
            with pytest.raises(PermanentError):  # XAmzContentSHA256Mismatch, after the retries
                await store.upload_part(key, upload_id, 1, first, "", payload_sha256=h2)
        e1 = await store.upload_part(key, upload_id, 1, memoryview(first), "", payload_sha256=h1)
        e2 = await store.upload_part(key, upload_id, 2, bytearray(last), "", payload_sha256=h2)
        assert (e1, e2) == (md5_of(first)[0], md5_of(last)[0])
        await store.complete_multipart(key, upload_id, [(1, e1), (2, e2)])
        assert await store.get_object(key) == first + last
        tiny = hashlib.sha256(b"tiny").hexdigest()
        assert await store.put_object("signed/s", b"tiny", "", "text/plain", payload_sha256=tiny)
        assert await store.get_object("signed/s") == b"tiny"

    @pytest.mark.parametrize("algorithm", ["crc64nvme", "crc32c"])
    async def test_a_full_object_crc_upload_where_the_probe_says_so(
        self, store: ObjectStore, algorithm: Crc
    ) -> None:
        if await store.probe_checksum(algorithm, "probe/scratch") is not None:
            return  # what S3_CHECKSUM=auto then does: MD5 (the other tests)
        key = f"streams/crc/{algorithm}.mp4"
        first, last = os.urandom(5 * MiB), os.urandom(1000)
        upload_id = await store.create_multipart(key, "video/mp4", checksum=algorithm)
        c1, c2 = checksum_of(algorithm, first), checksum_of(algorithm, last)
        with pytest.raises(PermanentError):  # BadDigest, after the retries
            await store.upload_part(key, upload_id, 1, first, "", checksum=c2)
        e1 = await store.upload_part(key, upload_id, 1, bytearray(first), "", checksum=c1)
        e2 = await store.upload_part(key, upload_id, 2, last, "", checksum=c2)
        assert (e1, e2) == (md5_of(first)[0], md5_of(last)[0])  # still MD5 ETags
        whole = combine_tagged([(c1, len(first)), (c2, len(last))])
        assert whole == checksum_of(algorithm, first + last)
        layout = [(1, e1), (2, e2)]
        with pytest.raises(PermanentError):  # the object's CRC is checked at completion
            await store.complete_multipart(
                key, upload_id, layout, part_checksums={1: c1, 2: c2}, checksum=c1
            )
        etag = await store.complete_multipart(
            key, upload_id, layout, part_checksums={1: c1, 2: c2}, checksum=whole
        )
        assert etag == multipart_etag([e1, e2])
        info = await store.head_object(key)
        assert info is not None and info.checksum == whole
        assert await store.get_object(key) == first + last
