"""The ObjectStore contract (``tests/contracts/storage.py``), run against every
backend we ship with (after litestream's replica-client tests): S3Store on the
session's S3 server (SeaweedFS locally, MinIO where Docker runs) and on the
JuiceFS S3 gateway (benchmarks), and the in-memory MemoryStore that the fast
handler tests use. Plus what only a networked store can do: be unreachable.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aioboto3
import pytest

from cefmp4.adapters.memorystore import MemoryStore
from cefmp4.adapters.s3store import S3Store, boto_config
from cefmp4.dev.localservers import S3Endpoint, free_port
from cefmp4.domain.errors import TransientError
from tests.contracts.storage import StorageContract


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


async def _new_bucket(endpoint: S3Endpoint, list_page_size: int = 1000) -> AsyncIterator[S3Store]:
    bucket = f"contract-{uuid.uuid4().hex[:20]}"
    async for s in _store(endpoint, bucket, list_page_size=list_page_size):
        await s.ensure_bucket()
        yield s


class TestS3Store(StorageContract):
    """On the session's S3 server, which enforces S3's part rules."""

    # SeaweedFS answers UploadPartCopy with an ETag of its own chunks.
    copy_etag_is_md5 = False
    lists_replaced_parts = True

    @pytest.fixture
    async def store(self, s3_endpoint: S3Endpoint) -> AsyncIterator[S3Store]:
        async for s in _new_bucket(s3_endpoint):
            yield s

    @pytest.fixture
    async def paged_store(self, s3_endpoint: S3Endpoint) -> AsyncIterator[S3Store]:
        async for s in _new_bucket(s3_endpoint, list_page_size=3):
            yield s


class TestS3StoreOnJuiceFS(StorageContract):
    """On the JuiceFS gateway (the benchmarks' store), which is more lenient."""

    strict_part_size = False
    strict_part_numbers = False
    checks_upload_key = False
    verifies_signed_payload = True  # XAmzContentSHA256Mismatch

    @pytest.fixture
    async def store(self, juicefs: S3Endpoint) -> AsyncIterator[S3Store]:
        async for s in _new_bucket(juicefs):
            yield s

    @pytest.fixture
    async def paged_store(self, juicefs: S3Endpoint) -> AsyncIterator[S3Store]:
        async for s in _new_bucket(juicefs, list_page_size=3):
            yield s


class TestMemoryStore(StorageContract):
    verifies_signed_payload = True  # it checks payload_sha256 like the JuiceFS gateway

    @pytest.fixture
    def store(self) -> MemoryStore:
        return MemoryStore()

    @pytest.fixture
    def paged_store(self) -> MemoryStore:
        return MemoryStore()  # lists in one go: nothing to page


async def test_unreachable_endpoint_is_transient(tmp_path: Path) -> None:
    dead = S3Endpoint(f"http://127.0.0.1:{free_port()}", "k", "s", "us-east-1")
    async for store in _store(dead, "nobucket", attempts=1):
        with pytest.raises(TransientError):
            await store.head_object("x")
