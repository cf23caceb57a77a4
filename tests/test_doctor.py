"""``cefmp4 doctor``: one line per check, with the fix; exit 1 when one fails.

Pure: each check's verdict from what a probe read (versions, AOF, eviction
policy, clock skew thresholds, inotify limits, the S3 round trip). Real
servers: against the session's Redis (AOF on) and S3 every check passes and
the scratch keys are gone afterwards; a wrong S3 secret fails the credentials
check with a fix line; a Redis of our own set to ``allkeys-lru`` fails the
eviction check.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from cefmp4 import cli
from cefmp4.dev.localservers import RedisServer
from cefmp4.domain.config import Config
from cefmp4.ops import doctor
from cefmp4.ops.doctor import (
    Check,
    Step,
    aof_check,
    eviction_check,
    exit_code,
    inotify_checks,
    line,
    permissions_check,
    redis_version_check,
    s3_access_check,
    skew_check,
)
from tests.harness import subprocess_env
from tests.test_gc import use_config_env

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def levels(checks: list[Check]) -> dict[str, str]:
    return {c.name: c.level for c in checks}


def test_redis_checks() -> None:
    assert redis_version_check("7.0.15").level == "ok"
    assert redis_version_check("6.2.14").level == "fail"
    assert aof_check("yes").level == "ok"
    assert aof_check("no").level == "fail"
    assert aof_check(None).level == "warn" and "cannot check" in aof_check(None).detail
    assert eviction_check("noeviction").level == "ok"
    assert eviction_check("allkeys-lru").level == "fail"


@pytest.mark.parametrize(
    ("skew", "level"),
    [(0, "ok"), (60, "ok"), (61, "warn"), (15 * 60, "warn"), (15 * 60 + 1, "fail")],
)
def test_clock_skew_thresholds(skew: int, level: str) -> None:
    assert skew_check(NOW + timedelta(seconds=skew), NOW).level == level
    assert skew_check(NOW - timedelta(seconds=skew), NOW).level == level


def test_inotify_limits() -> None:
    assert levels(inotify_checks(10, 8192, 128, poll=False)) == {
        "inotify watches": "ok",
        "inotify instances": "ok",
    }
    assert levels(inotify_checks(5000, 8192, 128, poll=False))["inotify watches"] == "warn"
    assert levels(inotify_checks(8192, 8192, 128, poll=False))["inotify watches"] == "fail"
    assert levels(inotify_checks(10, 8192, 8, poll=False))["inotify instances"] == "warn"
    assert levels(inotify_checks(10**6, 10, 1, poll=True)) == {"inotify": "ok"}


def test_s3_access_and_permissions() -> None:
    assert levels(s3_access_check(None, "", "b", "e")) == {
        "s3 reachable": "ok", "s3 credentials": "ok", "s3 bucket": "ok"}  # fmt: skip
    assert levels(s3_access_check("connection", "refused", "b", "e")) == {"s3 reachable": "fail"}
    assert levels(s3_access_check("SignatureDoesNotMatch", "no", "b", "e"))["s3 credentials"] == (
        "fail"
    )
    assert levels(s3_access_check("NoSuchBucket", "", "b", "e"))["s3 bucket"] == "warn"
    steps = [Step("CreateMultipartUpload"), Step("UploadPart", error="AccessDenied x"),
             Step("ListParts", skipped=True)]  # fmt: skip
    [perm] = permissions_check(steps, [])
    assert perm.level == "fail" and "UploadPart: AccessDenied" in perm.detail
    assert "not tried: ListParts" in perm.detail and perm.fix
    assert levels(permissions_check([Step("PutObject")], ["k"])) == {
        "s3 permissions": "ok", "s3 cleanup": "warn"}  # fmt: skip
    assert exit_code([Check("a", "ok", ""), Check("b", "warn", "")]) == 0
    assert exit_code([Check("a", "ok", ""), Check("b", "fail", "")]) == 1
    assert line(Check("x", "fail", "bad", "do this")) == "FAIL  x: bad  -> do this"


def doctor_lines(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    out = capsys.readouterr().out
    found = {}
    for text in out.splitlines():
        level, _, rest = text.partition(" ")
        if level in ("OK", "WARN", "FAIL"):
            found[rest.strip().partition(":")[0]] = text
    return found


async def test_doctor_passes_against_the_test_servers_and_cleans_up(
    make_config: Any,
    tmp_path: Path,
    s3_client: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config: Config = make_config()
    use_config_env(monkeypatch, subprocess_env(config), tmp_path)
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, ["doctor"]) == 0
    found = doctor_lines(capsys)
    names = ["config", "redis reachable", "redis version", "redis persistence",
             "redis eviction", "s3 reachable", "s3 credentials", "s3 bucket",
             "s3 permissions", "clock skew", "ffprobe", "watch dir", "inotify watches"]  # fmt: skip
    for name in names:
        assert found[name].startswith("OK"), found
    assert "DeleteObject" not in found["s3 permissions"]  # only cleanup uses it
    listing = s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert listing == []
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


async def test_a_wrong_s3_secret_fails_the_credentials_check(
    make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    config: Config = make_config(s3_secret_access_key="not-the-secret")
    use_config_env(monkeypatch, subprocess_env(config), tmp_path)
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, ["doctor"]) == 1
    found = doctor_lines(capsys)
    assert found["s3 credentials"].startswith("FAIL")
    assert "-> check S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY" in found["s3 credentials"]
    assert "not-the-secret" not in "\n".join(found.values())


async def test_an_evicting_redis_fails_the_eviction_check(make_config: Any, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        redis = aioredis.from_url(server.url)
        try:
            await redis.config_set("maxmemory-policy", "allkeys-lru")
        finally:
            await redis.aclose()
        config = msgspec.structs.replace(make_config(), redis_url=server.url)
        checks = await doctor.probe_redis(config)
    assert levels(checks) == {
        "redis reachable": "ok",
        "redis version": "ok",
        "redis persistence": "ok",
        "redis eviction": "fail",
    }
    [eviction] = [c for c in checks if c.name == "redis eviction"]
    assert "allkeys-lru" in eviction.detail and "noeviction" in eviction.fix


def test_an_invalid_configuration_is_a_failed_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_config_env(monkeypatch, {"CHUNK_SIZE_BYTES": "12"}, tmp_path)
    assert cli.main(["doctor"]) == 1
    assert capsys.readouterr().out.startswith("FAIL  config: ")
