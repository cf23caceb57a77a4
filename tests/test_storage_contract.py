"""The ObjectStore contract: what CefMP4 relies on from any S3-compatible store.

One suite, run against every backend we ship with (after litestream's
replica-client tests): SeaweedFS (tests and local default) and the JuiceFS S3
gateway (benchmarks); MinIO takes SeaweedFS's place where Docker runs. A
backend that breaks a rule here would break byte-exactness or cleanup.
"""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aioboto3
import pytest

from cefmp4.adapters.checksums import Crc, multipart_etag
from cefmp4.adapters.s3store import S3Store, boto_config
from cefmp4.dev.localservers import JuiceFSGateway, S3Endpoint, free_port
from cefmp4.domain.errors import NoSuchKey, NoSuchUpload, PermanentError, TransientError

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def juicefs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    with JuiceFSGateway(tmp_path_factory.mktemp("juicefs")) as gateway:
        yield gateway.endpoint


@pytest.fixture(params=["seaweedfs", "juicefs"])
def endpoint(request: pytest.FixtureRequest, s3_endpoint: S3Endpoint) -> S3Endpoint:
    if request.param == "juicefs":
        juicefs_endpoint: S3Endpoint = request.getfixturevalue("juicefs")
        return juicefs_endpoint
    return s3_endpoint


async def _store(
    endpoint: S3Endpoint, bucket: str, attempts: int = 3, list_page_size: int = 1000
) -> AsyncIterator[S3Store]:
    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=endpoint.url,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        region_name=endpoint.region,
        config=boto_config(pool=8, timeout=10),
    ) as client:
        yield S3Store(client, bucket, timeout=10, attempts=attempts, list_page_size=list_page_size)


@pytest.fixture
async def store(endpoint: S3Endpoint) -> AsyncIterator[S3Store]:
    async for s in _store(endpoint, f"contract-{uuid.uuid4().hex[:20]}"):
        await s.ensure_bucket()
        yield s


def md5s(data: bytes) -> tuple[str, str]:
    digest = hashlib.md5(data).digest()
    return digest.hex(), base64.b64encode(digest).decode()


async def test_ensure_bucket_is_idempotent(store: S3Store) -> None:
    await store.ensure_bucket()
    await store.ensure_bucket()
    assert await store.head_object("nothing/here") is None


async def test_multipart_round_trip_and_etags(store: S3Store) -> None:
    key = "streams/s1/cam/a.mp4"
    first, last = os.urandom(5 * MiB), os.urandom(1234)
    upload_id = await store.create_multipart(key, "video/mp4")
    assert [u.upload_id for u in await store.list_uploads("streams/s1/")] == [upload_id]
    assert await store.list_uploads("streams/other/") == []
    etag1 = await store.upload_part(key, upload_id, 1, first, md5s(first)[1])
    etag2 = await store.upload_part(key, upload_id, 2, last, md5s(last)[1])
    # ETag = MD5 of the part: what a restart uses to adopt parts the log lacks.
    assert (etag1, etag2) == (md5s(first)[0], md5s(last)[0])
    listed = await store.list_parts(key, upload_id)
    assert [(p.number, p.size, p.etag) for p in listed] == [
        (1, len(first), etag1),
        (2, len(last), etag2),
    ]
    # Re-sending a part under the same number replaces it (idempotent resend).
    assert await store.upload_part(key, upload_id, 2, last, md5s(last)[1]) == etag2
    etag = await store.complete_multipart(key, upload_id, [(1, etag1), (2, etag2)])
    assert etag == multipart_etag([etag1, etag2])
    info = await store.head_object(key)
    assert info is not None and info.size == len(first) + len(last) and info.etag == etag
    assert await store.list_uploads("streams/s1/") == []


# Whether the backend enforces S3's 5 MiB minimum for non-last parts. The
# service never relies on a rejection (it never sends a short non-last part);
# tests run on a strict backend so that such a bug could not pass unnoticed.
STRICT_PART_SIZE = {"seaweedfs": True, "juicefs": False}


async def test_small_non_last_part_at_completion(
    store: S3Store, endpoint: S3Endpoint, request: pytest.FixtureRequest
) -> None:
    backend = request.node.callspec.params["endpoint"]
    key = "small-parts.mp4"
    upload_id = await store.create_multipart(key, "video/mp4")
    a, b = os.urandom(MiB), os.urandom(MiB)
    e1 = await store.upload_part(key, upload_id, 1, a, md5s(a)[1])
    e2 = await store.upload_part(key, upload_id, 2, b, md5s(b)[1])
    if STRICT_PART_SIZE[backend]:
        with pytest.raises(PermanentError) as caught:
            await store.complete_multipart(key, upload_id, [(1, e1), (2, e2)])
        assert not isinstance(caught.value, NoSuchUpload)
        assert caught.value.reason == "s3_rejected" and "EntityTooSmall" in str(caught.value)
        await store.abort_multipart(key, upload_id)
    else:
        await store.complete_multipart(key, upload_id, [(1, e1), (2, e2)])
        info = await store.head_object(key)
        assert info is not None and info.size == 2 * MiB


async def test_wrong_content_md5_is_refused(store: S3Store) -> None:
    key = "bad-digest.mp4"
    upload_id = await store.create_multipart(key, "video/mp4")
    with pytest.raises(PermanentError):
        await store.upload_part(key, upload_id, 1, b"x" * 1000, md5s(b"y" * 1000)[1])
    await store.abort_multipart(key, upload_id)


async def test_abort_makes_the_upload_gone(store: S3Store) -> None:
    key = "aborted.mp4"
    upload_id = await store.create_multipart(key, "video/mp4")
    await store.abort_multipart(key, upload_id)
    assert await store.list_uploads("aborted") == []
    with pytest.raises(NoSuchUpload):
        await store.upload_part(key, upload_id, 1, b"data", md5s(b"data")[1])
    with pytest.raises(NoSuchUpload):
        await store.list_parts(key, upload_id)


async def test_put_object_and_overwrite_same_key(store: S3Store) -> None:
    first, second = b'{"a": 1}', b'{"a": 2, "b": "longer"}'
    assert (
        await store.put_object("x.json", first, md5s(first)[1], "application/json")
        == md5s(first)[0]
    )
    # A second put to the key replaces the body (a sidecar written twice).
    assert (
        await store.put_object("x.json", second, md5s(second)[1], "application/json")
        == md5s(second)[0]
    )
    info = await store.head_object("x.json")
    assert info is not None and info.size == len(second) and info.etag == md5s(second)[0]
    assert await store.get_object("x.json") == second


async def _put(store: S3Store, key: str, body: bytes) -> None:
    await store.put_object(key, body, md5s(body)[1], "application/octet-stream")


async def test_get_object_returns_the_body_or_none(store: S3Store) -> None:
    body = os.urandom(300_000) + b"\x00end"
    await _put(store, "archive/blob.bin", body)
    assert await store.get_object("archive/blob.bin") == body
    assert await store.get_object("archive/missing.bin") is None
    await _put(store, "archive/empty.bin", b"")
    assert await store.get_object("archive/empty.bin") == b""


async def test_list_keys_is_ascending_under_the_prefix_after_start_after(store: S3Store) -> None:
    # (no key that is also a "directory" of another: JuiceFS is a file system)
    keys = ["ev/b", "ev/a", "ev/d/x", "ev/c-1", "ev/c", "ev0", "other/a", "e"]
    for key in keys:
        await _put(store, key, b"x")
    under = sorted(k for k in keys if k.startswith("ev/"))
    assert await store.list_keys("ev/") == under == ["ev/a", "ev/b", "ev/c", "ev/c-1", "ev/d/x"]
    assert await store.list_keys("ev/", start_after="ev/b") == ["ev/c", "ev/c-1", "ev/d/x"]
    # start_after need not be a key that exists
    assert await store.list_keys("ev/", start_after="ev/bb") == ["ev/c", "ev/c-1", "ev/d/x"]
    assert await store.list_keys("ev/", start_after="ev/d/x") == []
    assert await store.list_keys("nothing/") == []


async def test_list_keys_pages_through_more_keys_than_one_page(endpoint: S3Endpoint) -> None:
    async for store in _store(endpoint, f"contract-{uuid.uuid4().hex[:20]}", list_page_size=3):
        await store.ensure_bucket()
        keys = [f"seg/{i:04d}" for i in range(11)]
        for key in keys:
            await _put(store, key, b"")
        await _put(store, "segz", b"")  # sorts right after the prefix's keys
        assert await store.list_keys("seg/") == keys
        assert await store.list_keys("seg/", start_after=keys[4]) == keys[5:]
        assert await store.list_keys("seg/", start_after=keys[8]) == keys[9:]


async def test_unreachable_endpoint_is_transient(tmp_path: Path) -> None:
    dead = S3Endpoint(f"http://127.0.0.1:{free_port()}", "k", "s", "us-east-1")
    async for store in _store(dead, "nobucket", attempts=1):
        with pytest.raises(TransientError):
            await store.head_object("x")


# Whether UploadPartCopy answers with the MD5 of the copied bytes as the part's
# ETag (AWS and JuiceFS do). SeaweedFS does not: it returns an ETag of its own
# chunks (e.g. "...-2" for a range over two of them), the same one list_parts
# reports and complete accepts. So the service never takes a copied part's
# ETag for its MD5: the MD5 it records is the one it computed from the file.
COPY_ETAG_IS_MD5 = {"seaweedfs": False, "juicefs": True}


async def test_upload_part_copy_copies_a_range_inside_the_store(
    store: S3Store, request: pytest.FixtureRequest
) -> None:
    # What a continuation relies on: a range of a completed object becomes a
    # part of another upload without its bytes crossing the network.
    backend = request.node.callspec.params["endpoint"]
    earlier = os.urandom(11 * MiB)
    await _put(store, "streams/s1/a.mp4", earlier)
    key = "streams/s2/a.mp4"
    first = earlier[: 5 * MiB]
    middle = earlier[5 * MiB + 7 : 10 * MiB + 7]  # any range, not only a part's
    tail = os.urandom(2 * MiB)
    upload_id = await store.create_multipart(key, "video/mp4")
    etag1 = await store.upload_part_copy(key, upload_id, 1, "streams/s1/a.mp4", 0, 5 * MiB)
    etag2 = await store.upload_part_copy(
        key, upload_id, 2, "streams/s1/a.mp4", 5 * MiB + 7, 5 * MiB
    )
    if COPY_ETAG_IS_MD5[backend]:
        assert (etag1, etag2) == (md5s(first)[0], md5s(middle)[0])
    listed = await store.list_parts(key, upload_id)
    assert [(p.number, p.size, p.etag) for p in listed] == [
        (1, 5 * MiB, etag1),
        (2, 5 * MiB, etag2),
    ]
    etag3 = await store.upload_part(key, upload_id, 3, tail, md5s(tail)[1])
    await store.complete_multipart(key, upload_id, [(1, etag1), (2, etag2), (3, etag3)])
    assert await store.get_object(key) == first + middle + tail
    assert await store.get_object("streams/s1/a.mp4") == earlier  # the source is untouched
    assert await store.list_uploads("streams/") == []


async def test_upload_part_copy_errors(store: S3Store) -> None:
    key = "streams/s3/a.mp4"
    upload_id = await store.create_multipart(key, "video/mp4")
    with pytest.raises(NoSuchKey):
        await store.upload_part_copy(key, upload_id, 1, "streams/none/a.mp4", 0, 5 * MiB)
    await _put(store, "streams/s1/a.mp4", b"x" * 100)
    with pytest.raises(PermanentError) as caught:  # InvalidRange, or InvalidArgument (JuiceFS)
        await store.upload_part_copy(key, upload_id, 1, "streams/s1/a.mp4", 50, 100)
    assert not isinstance(caught.value, NoSuchUpload)
    await store.abort_multipart(key, upload_id)
    with pytest.raises(NoSuchUpload):
        await store.upload_part_copy(key, upload_id, 1, "streams/s1/a.mp4", 0, 100)


@pytest.mark.parametrize("algorithm", ["crc64nvme", "crc32c"])
async def test_checksum_probe_answers_and_leaves_nothing(store: S3Store, algorithm: Crc) -> None:
    why = await store.probe_checksum(algorithm, "probe/scratch")
    assert why is None or why  # None: verified end to end; else a reason
    assert await store.list_uploads("probe/") == []
    assert await store.list_keys("probe/") == []
