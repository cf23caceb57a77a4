"""S3_CHECKSUM end to end on SeaweedFS, and the arithmetic behind it.

* Pure (hypothesis): the CRC of the whole == the combination of the CRCs of
  any split, which is what lets a FULL_OBJECT checksum be computed from the
  part CRCs without reading a byte twice.
* The headers botocore actually sends (a ``before-send`` hook on the one
  client factory's client): ``x-amz-content-sha256: UNSIGNED-PAYLOAD`` over
  plain HTTP, our checksum and no second one of botocore's.
* Every mode through the whole service: the object byte-exact, the checksum
  on the object and in the sidecar where the mode has one.
* A store that refuses the checksum headers (the fault proxy answers them
  InvalidRequest): ``auto`` falls back to MD5 and still verifies.
* A part body damaged on the way (the fault proxy flips a byte): the store
  rejects it, the part is sent again, the object is right.
* On the JuiceFS gateway (no flexible checksums, but it checks signed
  payloads) ``auto`` comes to ``sha256``: the same guarantees, from the
  signature's SHA-256.
* A file that was complete and quiet when its parts were read is not read a
  second time by the finalizer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cefmp4.adapters import checksums, files
from cefmp4.adapters.clients import s3_client
from cefmp4.adapters.memorystore import MemoryStore
from cefmp4.adapters.s3store import S3Store
from cefmp4.dev.localservers import S3Endpoint, make_s3_client
from cefmp4.domain.config import Config
from cefmp4.domain.events import PartUploaded, UploadStarted
from cefmp4.ops.doctor import checksum_check, probe_s3
from consumers.uploads import PROBE_MARK, resolve_checksum
from tests import mp4gen
from tests.faultproxy import FaultProxy
from tests.harness import MiB, log_only, running
from tests.test_pipeline import assert_clean, assert_stored

# -- pure --------------------------------------------------------------------


@given(
    data=st.binary(max_size=4096),
    cuts=st.lists(st.integers(min_value=0, max_value=4096), max_size=6),
    algorithm=st.sampled_from(checksums.CRCS),
)
def test_combining_any_split_equals_the_checksum_of_the_whole(
    data: bytes, cuts: list[int], algorithm: checksums.Crc
) -> None:
    bounds = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    blocks = [data[a:b] for a, b in itertools.pairwise(bounds)] or [b""]
    pieces = [(checksums.crc_value(algorithm, b), len(b)) for b in blocks]
    assert checksums.combine(algorithm, pieces) == checksums.crc_value(algorithm, data)
    tagged = [(checksums.checksum_of(algorithm, b), len(b)) for b in blocks]
    assert checksums.combine_tagged(tagged) == checksums.checksum_of(algorithm, data)


@given(value=st.integers(min_value=0, max_value=2**64 - 1))
def test_tag_round_trips_in_s3_encoding(value: int) -> None:
    tagged = checksums.tag("crc64nvme", value)
    found = checksums.untag(tagged)
    assert found is not None and found[0] == "crc64nvme"
    assert checksums.decode("crc64nvme", found[1]) == value
    assert base64.b64decode(found[1]) == value.to_bytes(8, "big")


def test_untag_knows_only_crcs() -> None:
    assert checksums.untag("") is None
    assert checksums.untag("md5:abc") is None
    assert checksums.combine_tagged([("", 3)]) is None
    mixed = [
        (checksums.checksum_of("crc32c", b"a"), 1),
        (checksums.checksum_of("crc64nvme", b"b"), 1),
    ]
    assert checksums.combine_tagged(mixed) is None


def test_crc_matches_the_published_check_values() -> None:
    # CRC-32C and CRC-64/NVME of "123456789" (the catalogue's check values).
    assert checksums.crc_value("crc32c", b"123456789") == 0xE3069283
    assert checksums.crc_value("crc64nvme", b"123456789") == 0xAE8B14860A799888


async def test_buffers_are_reused_bounded_and_dropped_when_nothing_is_lent() -> None:
    pool = files.Buffers(keep=2)
    busy = await pool.take(10)
    a, b, c = await pool.take(10), await pool.take(10), await pool.take(20)
    for buf in (a, b, c):
        pool.give(buf)
    assert pool.idle == 2  # the smaller of a and b went
    again = await pool.take(15)
    assert again is c  # the smallest idle one that fits
    assert len(await pool.take(30)) == 30
    for buf in (again, busy):
        pool.give(buf)
    pool.give(bytearray(1))  # the last one lent
    assert pool.idle == 0


async def test_idle_buffers_too_small_for_the_next_part_are_dropped() -> None:
    # Part 1 (small) came back while larger parts move: keeping it would make
    # memory the parts in flight plus it.
    pool = files.Buffers(keep=4)
    busy = await pool.take(20)
    pool.give(await pool.take(5))
    assert pool.idle == 1
    assert len(await pool.take(20)) == 20
    assert pool.idle == 0 and pool.lent == 2
    pool.give(busy)


async def test_buffers_lend_at_most_limit_at_once_first_come_first_served() -> None:
    pool = files.Buffers(keep=4, limit=2)
    first, second = await pool.take(10), await pool.take(10)
    waiting = [asyncio.ensure_future(pool.take(10)) for _ in range(2)]
    await asyncio.wait(waiting, timeout=0)  # both ran up to their wait
    for _ in range(3):
        await asyncio.sleep(0)
    assert not any(w.done() for w in waiting)  # two lent: the third waits
    pool.give(first)
    await asyncio.wait([waiting[0]], timeout=5)
    assert [w.done() for w in waiting] == [True, False]  # in the order asked
    pool.give(second)
    assert await waiting[1] is not None


def test_read_into_fills_the_view_and_stats_after(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 4)
    buffer = bytearray(100)
    read = files.read_into(str(path), 10, memoryview(buffer)[:50])
    assert bytes(buffer[:50]) == (bytes(range(256)) * 4)[10:60]
    assert read.after.size == 1024
    with pytest.raises(files.FileShrank):
        files.read_into(str(path), 1000, memoryview(buffer))


# -- the headers on the wire ---------------------------------------------------


async def test_upload_part_is_unsigned_and_carries_only_our_checksum(
    make_config: Callable[..., Config], bucket: str
) -> None:
    config = make_config()
    seen: list[tuple[str, dict[str, str]]] = []

    def capture(request: Any, event_name: str, **_: Any) -> None:
        headers = {k.lower(): v.decode() if isinstance(v, bytes) else v
                   for k, v in request.headers.items()}  # fmt: skip
        seen.append((event_name.rsplit(".", 1)[-1], headers))

    body = b"x" * (5 * MiB)
    crc = checksums.checksum_of("crc64nvme", body)
    _, md5_b64 = checksums.md5_of(body)
    async with s3_client(config) as client:
        assert config.s3_endpoint_url is not None and config.s3_endpoint_url.startswith("http:")
        client.meta.events.register("before-send.s3", capture)
        store = S3Store(client, bucket, timeout=20)
        upload = await store.create_multipart("k", "video/mp4", checksum="crc64nvme")
        await store.upload_part("k", upload, 1, bytearray(body), "", checksum=crc)
        await store.abort_multipart("k", upload)
        plain = await store.create_multipart("m", "video/mp4")
        await store.upload_part("m", plain, 1, body, md5_b64)
        await store.abort_multipart("m", plain)
        await store.put_object("p", b"small", "", "text/plain")

    parts = [h for op, h in seen if op == "UploadPart"]
    assert len(parts) == 2
    for headers in [h for _, h in seen]:
        assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD", headers
        assert "x-amz-checksum-crc32" not in headers, headers  # botocore's default
    crc_part, md5_part = parts
    assert crc_part["x-amz-checksum-crc64nvme"] == checksums.untag(crc)[1]  # type: ignore[index]
    assert "content-md5" not in crc_part
    assert md5_part["content-md5"] == md5_b64
    assert not any(k.startswith("x-amz-checksum-") for k in md5_part), md5_part
    [put] = [h for op, h in seen if op == "PutObject"]
    assert not any(k.startswith("x-amz-checksum-") or k == "content-md5" for k in put), put


async def test_a_signed_body_carries_its_sha256_and_only_it_is_signed(
    make_config: Callable[..., Config], bucket: str
) -> None:
    config = make_config()
    seen: list[tuple[str, str]] = []

    def capture(request: Any, event_name: str, **_: Any) -> None:
        value = request.headers["x-amz-content-sha256"]
        seen.append(
            (event_name.rsplit(".", 1)[-1], value.decode() if isinstance(value, bytes) else value)
        )

    body = os.urandom(5 * MiB + 7)
    async with s3_client(config) as client:
        client.meta.events.register("before-send.s3", capture)
        store = S3Store(client, bucket, timeout=20)
        upload = await store.create_multipart("k", "video/mp4")
        digest = hashlib.sha256(body).hexdigest()
        await store.upload_part("k", upload, 1, memoryview(body), "", payload_sha256=digest)
        await store.upload_part("k", upload, 2, body, "")
        await store.abort_multipart("k", upload)
        small = hashlib.sha256(b"small").hexdigest()
        await store.put_object("p", b"small", "", "text/plain", payload_sha256=small)
        await store.put_object("q", b"small", "", "text/plain")
    assert seen == [
        ("CreateMultipartUpload", "UNSIGNED-PAYLOAD"),
        ("UploadPart", hashlib.sha256(body).hexdigest()),
        ("UploadPart", "UNSIGNED-PAYLOAD"),
        ("AbortMultipartUpload", "UNSIGNED-PAYLOAD"),
        ("PutObject", hashlib.sha256(b"small").hexdigest()),
        ("PutObject", "UNSIGNED-PAYLOAD"),
    ]


# -- every mode end to end -----------------------------------------------------


def _head(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    return dict(s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED"))


@pytest.mark.parametrize("mode", ["auto", "crc64nvme", "crc32c", "sha256", "md5", "none"])
async def test_every_mode_stores_the_file_exactly(
    mode: str,
    make_config: Callable[..., Config],
    watch: Path,
    sources: mp4gen.Mp4Sources,
    s3_client: Any,
    bucket: str,
) -> None:
    large, small = watch / "large.mp4", watch / "small.mp4"
    data, little = sources.large.read_bytes(), sources.regular.read_bytes()
    assert len(data) > 2 * 5 * MiB and len(little) < 5 * MiB
    async with running(make_config(s3_checksum=mode, sidecar_sha256=mode == "none")) as h:
        large.write_bytes(data)
        small.write_bytes(little)
        big = await h.terminal(large)
        one = await h.terminal(small)
        events = [e for _, e in await h.events() if isinstance(e, PartUploaded)]
    algorithm = "crc64nvme" if mode == "auto" else mode  # SeaweedFS 4 verifies CRC64NVME
    for state, expected in ((big, data), (one, little)):
        sidecar = assert_stored(s3_client, bucket, state, expected)
        head = _head(s3_client, bucket, state.key)
        if checksums.is_crc(algorithm):
            name = checksums.PARAMETER[algorithm]  # type: ignore[index]
            want = checksums.checksum_of(algorithm, expected)  # type: ignore[arg-type]
            assert f"{algorithm}:{head[name]}" == want
            assert sidecar["checksum"]["value"] == head[name]
            assert sidecar["sha256"] is None  # SIDECAR_SHA256 off by default
        else:
            assert sidecar["checksum"] is None
            assert not any(k.startswith("ChecksumCRC") for k in head), head
    assert big.completion is not None and big.completion.parts > 1
    assert _head(s3_client, bucket, big.key)["ETag"].strip('"').endswith(f"-{big.completion.parts}")
    assert events
    for e in events:
        found = checksums.untag(e.checksum)
        if checksums.is_crc(algorithm):
            assert found is not None and found[0] == algorithm, e
        else:
            assert e.checksum == "", e
        assert len(e.md5) == 32  # the store's MD5 ETag, or our own
        body = data[e.offset : e.offset + e.size]
        assert e.md5 == hashlib.md5(body).hexdigest()
    assert_clean(s3_client, bucket, 2)


# -- a store without flexible checksums ----------------------------------------

# What a store without flexible checksums cannot take (``x-amz-checksum-mode``
# on HEAD/GET it would just ignore, so that one passes).
REFUSED = (
    b"x-amz-checksum-crc",
    b"x-amz-checksum-algorithm",
    b"x-amz-checksum-type",
    b"x-amz-sdk-checksum-algorithm",
)


async def test_auto_falls_back_to_md5_where_the_store_refuses_checksums(
    make_config: Callable[..., Config],
    s3_endpoint: Any,
    watch: Path,
    sources: mp4gen.Mp4Sources,
    s3_client: Any,
    bucket: str,
) -> None:
    large = watch / "large.mp4"
    data = sources.large.read_bytes()
    async with FaultProxy.to(s3_endpoint.url, reject_headers=REFUSED) as proxy:
        async with running(make_config(s3_endpoint_url=proxy.url)) as h:
            large.write_bytes(data)
            state = await h.terminal(large)
            events = [e for _, e in await h.events() if isinstance(e, PartUploaded)]
        assert proxy.injected.rejected >= 2  # the probe of each CRC
    sidecar = assert_stored(s3_client, bucket, state, data)
    assert sidecar["checksum"] is None
    assert events and all(e.checksum == "" for e in events)
    assert_clean(s3_client, bucket, 1)


async def test_a_forced_crc_the_store_refuses_fails_the_stream_loudly(
    make_config: Callable[..., Config],
    s3_endpoint: Any,
    watch: Path,
    sources: mp4gen.Mp4Sources,
    bucket: str,
) -> None:
    path = watch / "large.mp4"
    proxy = FaultProxy.to(s3_endpoint.url, reject_headers=REFUSED)
    async with proxy, running(make_config(s3_endpoint_url=proxy.url, s3_checksum="crc32c")) as h:
        path.write_bytes(sources.large.read_bytes())
        state = await h.terminal(path)
    assert state.status == "failed" and state.failure_reason == "s3_rejected"


# -- damage in transit ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["crc64nvme", "md5"])
async def test_a_part_damaged_on_the_way_is_rejected_and_sent_again(
    mode: str,
    make_config: Callable[..., Config],
    s3_endpoint: Any,
    watch: Path,
    sources: mp4gen.Mp4Sources,
    s3_client: Any,
    bucket: str,
) -> None:
    path = watch / "large.mp4"
    data = sources.large.read_bytes()
    async with FaultProxy.to(s3_endpoint.url, corrupt_bodies=2) as proxy:
        async with running(make_config(s3_endpoint_url=proxy.url, s3_checksum=mode)) as h:
            path.write_bytes(data)
            state = await h.terminal(path)
        assert proxy.injected.corrupted == 2
    assert_stored(s3_client, bucket, state, data)
    assert_clean(s3_client, bucket, 1)


# -- no second read of bytes that cannot have changed --------------------------


async def test_parts_read_from_a_quiet_file_are_not_read_again(
    make_config: Callable[..., Config],
    watch: Path,
    tmp_path: Path,
    sources: mp4gen.Mp4Sources,
    s3_client: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = watch / "copied.mp4"
    data = sources.large.read_bytes()
    path.write_bytes(data)
    stat = path.stat()
    old = stat.st_mtime_ns - 3600 * 10**9  # copied in with its mtime kept (cp -p)
    os.utime(path, ns=(old, old))
    reads: list[int] = []
    real = files.read_into

    def counting(p: str, offset: int, buffer: memoryview) -> files.Read:
        reads.append(offset)
        return real(p, offset, buffer)

    monkeypatch.setattr(files, "read_into", counting)
    async with running(make_config()) as h:
        state = await h.terminal(path)
        events = [e for _, e in await h.events() if isinstance(e, PartUploaded)]
    assert_stored(s3_client, bucket, state, data)
    assert sorted(reads) == sorted(set(reads)), f"a part was read twice: {sorted(reads)}"
    assert state.completion is not None
    assert len(reads) == state.completion.parts
    quiet = [e for e in events if e.file_size is not None]
    assert quiet and all(e.file_size == len(data) and e.file_mtime_ns == old for e in quiet)


# -- logs written before S3_CHECKSUM ------------------------------------------


async def test_an_upload_begun_with_md5_parts_finishes_with_md5(
    make_config: Callable[..., Config], watch: Path, s3_client: Any, bucket: str
) -> None:
    """An upgrade mid-stream: the log has an MD5-only upload and part (events
    from before S3_CHECKSUM, no ``checksum``); the new service (auto: CRC64NVME
    on this store) finishes that upload with MD5, comparing like with like."""
    config = make_config()
    dst = watch / "upgraded.mp4"
    content = os.urandom(11 * MiB)
    dst.write_bytes(content)
    async with log_only(config) as (h, service):
        await service.start()
        await service.watcher.run_once()
        state = (await h.projection()).for_path(str(dst))
        assert state is not None
        store = service.deps.store
        upload_id = await store.create_multipart(state.key, "video/mp4")
        part1 = content[: 5 * MiB]
        md5_hex, md5_b64 = checksums.md5_of(part1)
        etag = await store.upload_part(state.key, upload_id, 1, part1, md5_b64)
        at = service.deps.now()
        await h.log.append(UploadStarted(stream_id=state.stream_id, at=at, upload_id=upload_id))
        old = PartUploaded(stream_id=state.stream_id, at=at, upload_id=upload_id, part_number=1,
                           offset=0, size=len(part1), etag=etag, md5=md5_hex)  # fmt: skip
        await h.log.append(old)
    async with running(config) as h:
        done = await h.terminal(dst)
        events = [e for _, e in await h.events() if isinstance(e, PartUploaded)]
    assert_stored(s3_client, bucket, done, content)
    assert done.upload_id == upload_id
    assert [e.checksum for e in events] == [""] * len(events) and len(events) == 3
    assert "ChecksumCRC64NVME" not in _head(s3_client, bucket, done.key)
    assert_clean(s3_client, bucket, 1)


def test_doctor_says_what_s3_checksum_comes_to() -> None:
    assert checksum_check("auto", "crc64nvme", []).level == "ok"
    fallback = checksum_check("auto", "md5", ["crc64nvme: no", "crc32c: no"])
    assert fallback.level == "warn" and "crc32c: no" in fallback.detail
    assert checksum_check("crc32c", "crc32c", ["refused"]).level == "fail"
    assert checksum_check("crc32c", "crc32c", []).level == "ok"
    assert checksum_check("none", "none", []).level == "warn"
    assert checksum_check("md5", "md5", []).level == "ok"
    signed = checksum_check("auto", "sha256", ["crc64nvme: no", "crc32c: no"])
    assert signed.level == "ok" and signed.detail.startswith("auto: sha256")
    assert checksum_check("sha256", "sha256", ["accepted a wrong one"]).level == "warn"
    assert checksum_check("sha256", "sha256", []).level == "ok"


async def test_doctor_reports_the_checksum_the_service_would_use(
    make_config: Callable[..., Config],
) -> None:
    checks = await probe_s3(make_config())
    [check] = [c for c in checks if c.name == "s3 checksum"]
    assert (check.level, check.detail) == (
        "ok",
        "auto: crc64nvme, verified by the store end to end",
    )


# -- a store that checks signatures but no flexible checksum -------------------


async def test_auto_comes_to_sha256_where_only_signatures_are_checked(
    juicefs: S3Endpoint, make_config: Callable[..., Config]
) -> None:
    config = make_config(
        s3_endpoint_url=juicefs.url, s3_access_key_id=juicefs.access_key,
        s3_secret_access_key=juicefs.secret_key, s3_bucket_name="resolve",
    )  # fmt: skip
    async with s3_client(config) as client:
        store = S3Store(client, "resolve", timeout=20)
        await store.ensure_bucket()
        algorithm, refused = await resolve_checksum(store, "auto", "p/")
        assert await store.list_keys("") == [] and await store.list_uploads("") == []
    assert algorithm == "sha256"
    assert [r.split(":")[0] for r in refused] == ["crc64nvme", "crc32c"]
    assert "wrong" in refused[0]  # it took a wrong CRC: not verified


@pytest.mark.parametrize("mode", ["auto", "sha256", "md5"])
async def test_what_a_killed_probe_left_is_cleared_before_probing(mode: str) -> None:
    # A process killed between a probe's write and its cleanup (the kill -9
    # test found one) leaves a scratch object or upload nothing else removes.
    store = MemoryStore()
    await store.put_object(f"p/{PROBE_MARK}dead", b"probe", "", "application/octet-stream")
    await store.create_multipart(f"p/{PROBE_MARK}dead2", "application/octet-stream")
    await store.put_object("p/1/a.mp4", b"video", "", "video/mp4")
    await resolve_checksum(store, mode, "p/")  # type: ignore[arg-type]
    assert await store.list_keys("p/") == ["p/1/a.mp4"]
    assert await store.list_uploads("p/") == []


class IgnoresSignatures(MemoryStore):
    async def probe_signed_payload(self, scratch_key: str) -> str | None:
        return "the store accepted a body whose signed SHA-256 is wrong"  # as SeaweedFS


async def test_a_forced_sha256_is_probed_and_a_store_that_ignores_it_is_named() -> None:
    assert await resolve_checksum(MemoryStore(), "sha256", "p/") == ("sha256", [])
    algorithm, refused = await resolve_checksum(IgnoresSignatures(), "sha256", "p/")
    assert algorithm == "sha256" and refused == [
        "sha256: the store accepted a body whose signed SHA-256 is wrong"
    ]
    assert await resolve_checksum(IgnoresSignatures(), "auto", "p/") == ("crc64nvme", [])


@pytest.mark.parametrize("corrupt", [0, 2])
async def test_auto_signs_payloads_on_a_store_that_checks_them(
    corrupt: int,
    juicefs: S3Endpoint,
    make_config: Callable[..., Config],
    watch: Path,
    sources: mp4gen.Mp4Sources,
) -> None:
    """JuiceFS refuses a body whose signed SHA-256 is wrong, and ignores
    x-amz-checksum-*: auto takes sha256, and a part damaged on the way is
    refused (XAmzContentSHA256Mismatch) and sent again."""
    bucket = f"signed-{corrupt}"
    large, small = watch / "large.mp4", watch / "small.mp4"
    data, little = sources.large.read_bytes(), sources.regular.read_bytes()
    async with FaultProxy.to(juicefs.url, corrupt_bodies=corrupt, inspect=True) as proxy:
        config = make_config(
            s3_endpoint_url=proxy.url, s3_access_key_id=juicefs.access_key,
            s3_secret_access_key=juicefs.secret_key, s3_bucket_name=bucket,
        )  # fmt: skip
        async with running(config) as h:
            large.write_bytes(data)
            small.write_bytes(little)
            big, one = await h.terminal(large), await h.terminal(small)
        assert proxy.injected.corrupted == corrupt
        # Every body of a MiB or more (the parts, the part sent again) went
        # signed: sha256 mode, not the md5 one JuiceFS would also check.
        assert proxy.injected.signed >= 2 + corrupt
    client = make_s3_client(juicefs)
    for state, expected in ((big, data), (one, little)):
        sidecar = assert_stored(client, bucket, state, expected)
        assert sidecar["checksum"] is None  # a signature proves a request, not the object
    assert big.completion is not None and big.completion.parts > 1
    assert_clean(client, bucket, 2)
