"""The throwaway servers behave like the real infrastructure the tests stand for.

Two guards matter beyond "it starts":

* Redis keeps acknowledged writes across SIGKILL + restart (AOF), which the
  crash-recovery tests rely on.
* The session S3 store rejects a non-last multipart part under 5 MiB at
  completion.  If someone swaps in a lenient store (JuiceFS gateway, a mock)
  to make a failing test pass, this test fails instead.

JuiceFS is exercised with its own module-scoped gateway because only the
benchmarks use it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from botocore.exceptions import ClientError

from cefmp4.dev.localservers import JuiceFSGateway, RedisServer, free_port, make_s3_client

MIB = 1024 * 1024


def _client_error_code(exc: pytest.ExceptionInfo[Any]) -> str:
    code: str = exc.value.response["Error"]["Code"]
    return code


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_redis_aof_survives_kill_and_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    try:
        server.start()
        url = server.url
        # One client across the crash, as the service keeps its connection:
        # the server side of it lingers in TIME_WAIT, which must not stop the
        # restart on the same port.
        with redis.Redis.from_url(url, decode_responses=True) as client:
            ids = [client.xadd("events", {"seq": str(i)}) for i in range(200)]
            client.set("marker", "before-kill")

            server.kill()
            assert not server.running
            server.kill()  # idempotent

            server.start()
            assert server.url == url
            entries = client.xrange("events")  # redis-py reconnects by itself
            assert [entry_id for entry_id, _ in entries] == ids
            assert entries[-1][1] == {"seq": "199"}
            assert client.get("marker") == "before-kill"
            assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        server.stop()
    assert not server.running
    server.stop()  # idempotent


def test_start_refuses_a_port_in_use(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "first") as first:
        second = RedisServer(tmp_path / "second", port=first.port)
        with pytest.raises(RuntimeError, match="already in use"):
            second.start()
        assert not second.running


def test_startup_failure_reports_log_tail(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    with server, redis.Redis.from_url(server.url) as client:
        client.set("k", "v")
    incr_files = list((tmp_path / "redis" / "appendonlydir").glob("*.incr.aof"))
    assert len(incr_files) == 1
    with incr_files[0].open("ab") as aof:
        aof.write(b"this is not RESP\r\n")

    with pytest.raises(RuntimeError, match="exited with code") as exc:
        server.start()
    assert "Bad file format" in str(exc.value)  # from redis.log, not from us
    assert not server.running
    server.stop()


def test_s3_rejects_small_non_last_part(s3_client: Any, bucket: str) -> None:
    key = "too-small"
    upload_id = s3_client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    etags = [
        s3_client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=b"x" * 1024
        )["ETag"]
        for n in (1, 2)
    ]
    parts = [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, start=1)]
    with pytest.raises(ClientError) as exc:
        s3_client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    assert _client_error_code(exc) == "EntityTooSmall"
    s3_client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)


def test_s3_multipart_lifecycle(s3_client: Any, bucket: str) -> None:
    key = "recording.mp4"
    first, last = b"a" * (5 * MIB), b"tail"

    aborted = s3_client.create_multipart_upload(Bucket=bucket, Key="aborted")["UploadId"]
    upload_id = s3_client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    etags = [
        s3_client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=body)[
            "ETag"
        ]
        for n, body in ((1, first), (2, last))
    ]

    listed = s3_client.list_parts(Bucket=bucket, Key=key, UploadId=upload_id)["Parts"]
    assert [(p["PartNumber"], p["Size"], p["ETag"]) for p in listed] == [
        (1, len(first), etags[0]),
        (2, len(last), etags[1]),
    ]
    uploads = s3_client.list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert {(u["Key"], u["UploadId"]) for u in uploads} == {
        ("aborted", aborted),
        (key, upload_id),
    }

    s3_client.abort_multipart_upload(Bucket=bucket, Key="aborted", UploadId=aborted)
    with pytest.raises(ClientError) as exc:
        s3_client.list_parts(Bucket=bucket, Key="aborted", UploadId=aborted)
    assert _client_error_code(exc) == "NoSuchUpload"

    s3_client.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={
            "Parts": [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, start=1)]
        },
    )
    assert s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() == first + last
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


@pytest.fixture(scope="module")
def juicefs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JuiceFSGateway]:
    with JuiceFSGateway(tmp_path_factory.mktemp("juicefs")) as gateway:
        yield gateway


def test_juicefs_gateway_multipart_round_trip(juicefs: JuiceFSGateway) -> None:
    client = make_s3_client(juicefs.endpoint)
    bucket, key = "bench", "cam1/recording.mp4"
    client.create_bucket(Bucket=bucket)
    first, last = bytes(range(256)) * (5 * MIB // 256), b"moov"

    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    etags = [
        client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=body)[
            "ETag"
        ]
        for n, body in ((1, first), (2, last))
    ]
    completed = client.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={
            "Parts": [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, start=1)]
        },
    )

    obj = client.get_object(Bucket=bucket, Key=key)
    assert obj["Body"].read() == first + last
    # --keep-etag: the S3-style multipart ETag ("<md5 of part md5s>-2") is stored.
    assert obj["ETag"] == completed["ETag"]
    assert completed["ETag"].strip('"').endswith("-2")
