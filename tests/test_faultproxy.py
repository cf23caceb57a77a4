"""Self-tests of ``tests.faultproxy`` against the session's real S3 store.

A synchronous boto3 client with its own retries off sees every fault the
proxy injects. Off is ``max_attempts=0``: botocore's client-config
``max_attempts`` counts *retries* (it becomes ``total_max_attempts = n + 1``),
so ``max_attempts=1`` would send every failed request twice. The client runs
in a worker thread: the proxy lives in the test's event loop, which a
blocking call on the loop would freeze.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import botocore.exceptions as bexc
import pytest

from cefmp4.dev.localservers import S3Endpoint, make_s3_client
from tests.faultproxy import FaultProxy

MiB = 1024 * 1024
CONNECTION_ERRORS = (bexc.ConnectionError, bexc.HTTPClientError)


def client_via(proxy: FaultProxy, endpoint: S3Endpoint, *, read_timeout: float = 10) -> Any:
    via = dataclasses.replace(endpoint, url=proxy.url)
    return make_s3_client(via, max_attempts=0, connect_timeout=2, read_timeout=read_timeout)


def outcome(call: Callable[[], object]) -> str:
    """'ok', the S3 error code, or 'connection error'.

    Which connection error a reset gives depends on timing (a reset before
    the request is sent is EndpointConnectionError, after ConnectionClosedError).
    """
    try:
        call()
    except bexc.ClientError as exc:
        return str(exc.response["Error"]["Code"])
    except CONNECTION_ERRORS:
        return "connection error"
    return "ok"


async def test_transparent_round_trip(s3_endpoint: S3Endpoint, s3_client: Any, bucket: str) -> None:
    body = os.urandom(6 * MiB + 5)
    async with FaultProxy.to(s3_endpoint.url) as proxy:
        client = client_via(proxy, s3_endpoint)
        await asyncio.to_thread(client.put_object, Bucket=bucket, Key="k", Body=body)
        reply = await asyncio.to_thread(client.get_object, Bucket=bucket, Key="k")
        got = await asyncio.to_thread(reply["Body"].read)
        client.close()
    assert got == body
    assert s3_client.get_object(Bucket=bucket, Key="k")["Body"].read() == body
    assert proxy.connections >= 1
    assert proxy.injected.faults == 0


async def test_slowdown_answers_503_without_reaching_s3(
    s3_endpoint: S3Endpoint, s3_client: Any, bucket: str
) -> None:
    async with FaultProxy.to(s3_endpoint.url, slowdown_rate=1.0) as proxy:
        client = client_via(proxy, s3_endpoint)
        with pytest.raises(bexc.ClientError) as listed:
            await asyncio.to_thread(client.list_objects_v2, Bucket=bucket)
        # A body still on its way when the answer comes (a 6 MiB PUT).
        with pytest.raises(bexc.ClientError) as put:
            await asyncio.to_thread(
                client.put_object, Bucket=bucket, Key="big", Body=os.urandom(6 * MiB)
            )
        with pytest.raises(bexc.ClientError) as headed:  # no body: the code is the status
            await asyncio.to_thread(client.head_bucket, Bucket=bucket)
        client.close()
    assert headed.value.response["Error"]["Code"] == "503"
    for raised in (listed, put):
        assert raised.value.response["Error"]["Code"] == "SlowDown"
        assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert proxy.injected.slowdown == 3
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


async def test_reset_mid_upload_is_a_connection_error(
    s3_endpoint: S3Endpoint, s3_client: Any, bucket: str
) -> None:
    # Cuts of at most 1 MiB, so every one lands inside the 2 MiB request.
    async with FaultProxy.to(s3_endpoint.url, reset_rate=1.0, reset_max_bytes=MiB, seed=3) as proxy:
        client = client_via(proxy, s3_endpoint)
        for _ in range(4):
            with pytest.raises(CONNECTION_ERRORS):
                await asyncio.to_thread(
                    client.put_object, Bucket=bucket, Key="cut", Body=os.urandom(2 * MiB)
                )
        client.close()
    assert proxy.injected.reset == 4
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


async def test_lost_response_after_s3_did_the_work(
    s3_endpoint: S3Endpoint, s3_client: Any, bucket: str
) -> None:
    async with FaultProxy.to(s3_endpoint.url, lost_response_rate=1.0) as proxy:
        client = client_via(proxy, s3_endpoint)
        with pytest.raises(CONNECTION_ERRORS):
            await asyncio.to_thread(client.put_object, Bucket=bucket, Key="done", Body=b"x" * 999)
        client.close()
    assert proxy.injected.lost_response == 1
    assert s3_client.get_object(Bucket=bucket, Key="done")["Body"].read() == b"x" * 999


async def test_stall_outlasts_the_client_timeout(s3_endpoint: S3Endpoint, bucket: str) -> None:
    async with FaultProxy.to(s3_endpoint.url, stall_rate=1.0, stall_seconds=3.0) as proxy:
        client = client_via(proxy, s3_endpoint, read_timeout=0.5)
        with pytest.raises(bexc.ReadTimeoutError):
            await asyncio.to_thread(client.list_objects_v2, Bucket=bucket)
        client.close()
    assert proxy.injected.stall == 1


async def test_counters_max_faults_enabled_and_down(s3_endpoint: S3Endpoint, bucket: str) -> None:
    async with FaultProxy.to(
        s3_endpoint.url, reset_rate=0.5, slowdown_rate=0.5, reset_max_bytes=100, max_faults=3
    ) as proxy:
        client = client_via(proxy, s3_endpoint)

        def list_objects() -> str:
            return outcome(lambda: client.list_objects_v2(Bucket=bucket))

        # Every fault ends its connection, so each request meets a new fate.
        first = [await asyncio.to_thread(list_objects) for _ in range(5)]
        # The rates add up to 1: a fault per connection until max_faults.
        assert "ok" not in first[:3] and first[3:] == ["ok", "ok"], first
        assert proxy.injected.reset + proxy.injected.slowdown == 3
        assert first.count("SlowDown") == proxy.injected.slowdown

        # The pooled connection is reset, then every new one: two failures,
        # whichever the client notices first.
        proxy.down = True
        assert [await asyncio.to_thread(list_objects) for _ in range(2)] == ["connection error"] * 2
        assert proxy.injected.refused >= 1
        proxy.down = False
        assert await asyncio.to_thread(list_objects) == "ok"

        proxy.max_faults = None
        proxy.enabled = False
        assert [await asyncio.to_thread(list_objects) for _ in range(3)] == ["ok"] * 3
        client.close()
    assert proxy.injected.faults == 3


async def test_idle_connections_are_closed(s3_endpoint: S3Endpoint, bucket: str) -> None:
    # Two seconds of idleness is far more than two back-to-back requests
    # take, however loaded the machine; the close itself is waited for.
    async with FaultProxy.to(s3_endpoint.url, idle_close_seconds=2.0) as proxy:
        client = client_via(proxy, s3_endpoint)

        def list_objects() -> str:
            return outcome(lambda: client.list_objects_v2(Bucket=bucket))

        assert await asyncio.to_thread(list_objects) == "ok"
        assert await asyncio.to_thread(list_objects) == "ok"  # kept alive
        assert proxy.connections == 1
        async with asyncio.timeout(30):
            while True:
                if proxy.injected.idle_closed:
                    break
                await asyncio.sleep(0.05)
        assert await asyncio.to_thread(list_objects) == "ok"
        client.close()
    assert proxy.connections == 2
    assert proxy.injected.idle_closed >= 1
    assert proxy.injected.faults == 0


async def test_same_seed_same_fates(s3_endpoint: S3Endpoint, bucket: str) -> None:
    async def fates(seed: int) -> list[str]:
        async with FaultProxy.to(
            s3_endpoint.url, seed=seed, reset_rate=0.3, slowdown_rate=0.3, reset_max_bytes=100
        ) as proxy:
            client = client_via(proxy, s3_endpoint)
            seen = []
            for _ in range(8):
                # A new connection per request: the fate belongs to a connection.
                seen.append(await asyncio.to_thread(outcome, lambda: client.list_buckets()))
                client.close()
            return seen

    first = await fates(7)
    assert first == await fates(7)
    assert {"ok", "SlowDown"} <= set(first), first


async def test_deny_answers_access_denied_until_cleared(
    s3_endpoint: S3Endpoint, s3_client: Any, bucket: str
) -> None:
    async with FaultProxy.to(s3_endpoint.url) as proxy:
        client = client_via(proxy, s3_endpoint)
        assert (
            await asyncio.to_thread(outcome, lambda: client.list_objects_v2(Bucket=bucket)) == "ok"
        )
        proxy.deny = True  # also resets the kept-alive connection
        # The client may notice the reset on its pooled connection first.
        first = await asyncio.to_thread(outcome, lambda: client.list_objects_v2(Bucket=bucket))
        assert first in ("connection error", "AccessDenied")
        with pytest.raises(bexc.ClientError) as listed:
            await asyncio.to_thread(client.list_objects_v2, Bucket=bucket)
        with pytest.raises(bexc.ClientError) as put:  # a body still on its way
            await asyncio.to_thread(
                client.put_object, Bucket=bucket, Key="denied", Body=os.urandom(6 * MiB)
            )
        with pytest.raises(bexc.ClientError) as headed:  # no body: the code is the status
            await asyncio.to_thread(client.head_bucket, Bucket=bucket)
        denied = proxy.injected.denied
        proxy.deny = False
        assert (
            await asyncio.to_thread(outcome, lambda: client.list_objects_v2(Bucket=bucket)) == "ok"
        )
        client.close()
    for raised in (listed, put):
        assert raised.value.response["Error"]["Code"] == "AccessDenied"
        assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert headed.value.response["Error"]["Code"] == "403"
    assert denied == proxy.injected.denied == 3 + (first == "AccessDenied")
    assert proxy.injected.faults == 0
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
