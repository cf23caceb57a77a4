"""A blocked deployment: which S3 answers mean it, and how calls wait it out.

Pure parts first (``translate``, the wait schedule, the per-request timeout),
then ``Blocked`` with fake calls (no clock: the wait schedule is injected),
then the S3 adapter against the session's real SeaweedFS (a wrong secret, a
missing bucket).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import botocore.exceptions as bexc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from cefmp4.adapters.blocked import Blocked, blocked_wait
from cefmp4.adapters.metrics import Metrics
from cefmp4.adapters.s3store import (
    MIN_THROUGHPUT_BYTES_PER_SECOND,
    SPECIAL_CODES,
    S3Store,
    boto_config,
    request_timeout,
    translate,
)
from cefmp4.dev.localservers import S3Endpoint
from cefmp4.domain.errors import (
    BLOCK_CAUSES,
    DeploymentBlocked,
    NoSuchUpload,
    PermanentError,
    TransientError,
)

MiB = 1024 * 1024

BLOCKED = {
    "AccessDenied": "permissions",
    "AllAccessDisabled": "permissions",
    "AccountProblem": "permissions",
    "ExpiredToken": "credentials",
    "InvalidAccessKeyId": "credentials",
    "InvalidToken": "credentials",
    "SignatureDoesNotMatch": "credentials",
    "TokenRefreshRequired": "credentials",
    "RequestTimeTooSkewed": "clock_skew",
    "NoSuchBucket": "no_bucket",
}
STATUS = {"NoSuchBucket": 404, "RequestTimeTooSkewed": 403, "InvalidToken": 400}


def client_error(code: str, status: int, message: str = "no") -> bexc.ClientError:
    error = {"Code": code, "Message": message} if code else {}
    response: Any = {"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}
    return bexc.ClientError(response, "UploadPart")


# -- translate ------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(BLOCKED))
def test_blocked_codes_are_deployment_blocked(code: str) -> None:
    err = translate(client_error(code, STATUS.get(code, 403), "because"))
    assert isinstance(err, DeploymentBlocked) and not isinstance(err, PermanentError)
    assert err.cause == BLOCKED[code]
    assert code in str(err) and "because" in str(err)


def test_a_bare_403_is_a_permission_problem() -> None:
    # A HEAD answer has no body: botocore reports the status as the code.
    for code in ("403", ""):
        err = translate(client_error(code, 403))
        assert isinstance(err, DeploymentBlocked) and err.cause == "permissions"


def test_missing_credentials_are_blocked() -> None:
    err = translate(bexc.NoCredentialsError())
    assert isinstance(err, DeploymentBlocked) and err.cause == "credentials"


# Hypothesis also draws the string constants of the code under test, so every
# code translate() treats on its own is left out by the module's own list.
_OTHER_CODES = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", min_size=3).filter(
    lambda c: c not in BLOCKED and c not in SPECIAL_CODES
    and not c.startswith(("Internal", "Service", "Request", "Operation"))
)  # fmt: skip


@given(_OTHER_CODES, st.sampled_from([400, 404, 405, 409, 411, 412, 413, 416, 422]))
def test_other_4xx_are_permanent_and_keep_the_code(code: str, status: int) -> None:
    err = translate(client_error(code, status))
    assert type(err) is PermanentError
    assert err.reason == "s3_rejected" and code in str(err)


@given(st.sampled_from([*BLOCKED, "", "SlowDown", "Whatever"]), st.integers(500, 599))
def test_5xx_is_transient_whatever_the_code(code: str, status: int) -> None:
    assert type(translate(client_error(code, status))) is TransientError


def test_invalid_part_and_no_such_upload_keep_their_own_kinds() -> None:
    invalid = translate(client_error("InvalidPart", 400))
    assert isinstance(invalid, PermanentError) and invalid.reason == "s3_invalid_part"
    assert isinstance(translate(client_error("NoSuchUpload", 404)), NoSuchUpload)
    assert type(translate(client_error("SlowDown", 503))) is TransientError
    assert type(translate(client_error("", 429))) is TransientError


# -- timings --------------------------------------------------------------


@given(st.integers(0, 100))
def test_blocked_wait_doubles_up_to_its_cap(attempt: int) -> None:
    assert blocked_wait(0) == 0.5
    assert blocked_wait(attempt) <= blocked_wait(attempt + 1) <= 30.0
    assert blocked_wait(attempt, cap=60.0) <= 60.0


@given(st.floats(1, 600), st.integers(0, 5 * 1024**3), st.integers(0, 5 * 1024**3))
def test_request_timeout_grows_with_the_body(base: float, a: int, b: int) -> None:
    small, large = sorted((a, b))
    assert base <= request_timeout(base, small) <= request_timeout(base, large)
    # A body moving at the floor throughput always arrives in time.
    needed = large / MIN_THROUGHPUT_BYTES_PER_SECOND
    assert request_timeout(base, large) - base >= needed * (1 - 1e-9)


def test_request_timeout_examples() -> None:
    assert request_timeout(60, 0) == 60
    assert request_timeout(60, 5 * MiB) == 80  # 5 MiB at 256 KiB/s
    assert request_timeout(60, 5 * 1024 * MiB) == 60 + 20480


# -- Blocked with fake calls ----------------------------------------------


def gauge_values(registry: CollectorRegistry) -> dict[str, float]:
    return {
        s.labels["cause"]: s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "cefmp4_blocked"
    }


class FakeS3:
    """Answers ``DeploymentBlocked`` until ``fixed``; counts tries."""

    def __init__(self, cause: Any = "credentials") -> None:
        self.fixed = asyncio.Event()
        self.cause = cause
        self.tries = 0
        self._tried = asyncio.Condition()

    async def until_tried(self, times: int) -> None:
        async with self._tried:
            await self._tried.wait_for(lambda: self.tries >= times)

    async def call(self) -> str:
        async with self._tried:
            self.tries += 1
            self._tried.notify_all()
        if not self.fixed.is_set():
            raise DeploymentBlocked("s3 InvalidAccessKeyId: who are you", cause=self.cause)
        return "ok"


async def test_a_blocked_call_waits_logs_once_and_resumes() -> None:
    registry = CollectorRegistry()
    blocked = Blocked(Metrics(registry).blocked, wait=lambda attempt: 0.0)
    s3 = FakeS3()
    seen: list[dict[str, float]] = []

    async def call() -> str:
        seen.append(gauge_values(registry))
        if s3.tries == 5:
            s3.fixed.set()
        return await s3.call()

    assert gauge_values(registry) == dict.fromkeys(BLOCK_CAUSES, 0.0)
    with capture_logs() as logs:
        assert await blocked.through(call) == "ok"
    assert s3.tries == 6
    assert [s["credentials"] for s in seen] == [0, 1, 1, 1, 1, 1]
    assert gauge_values(registry) == dict.fromkeys(BLOCK_CAUSES, 0.0)
    assert [(e["log_level"], e.get("cause"), e.get("causes")) for e in logs] == [
        ("warning", "credentials", None),
        ("info", None, ["credentials"]),
    ]
    assert "who are you" in logs[0]["error"]
    assert blocked.causes == frozenset()


async def test_one_recovered_call_wakes_every_waiter() -> None:
    registry = CollectorRegistry()
    # First pause none, then "forever": only being woken can end the waits.
    blocked = Blocked(Metrics(registry).blocked, wait=lambda attempt: 0.0 if attempt == 0 else 3600)
    s3 = FakeS3(cause="permissions")
    with capture_logs() as logs:
        waiters = [asyncio.create_task(blocked.through(s3.call)) for _ in range(3)]
        await s3.until_tried(6)  # each has tried twice and now waits
        s3.fixed.set()
        # A call that was never blocked going through proves nothing (a policy
        # may allow listing but deny uploads): still blocked.
        assert await blocked.through(s3.call) == "ok"
        assert blocked.causes == {"permissions"}
        assert gauge_values(registry)["permissions"] == 1

        flaky_once = FakeS3(cause="permissions")

        async def recovers() -> str:
            if flaky_once.tries:
                flaky_once.fixed.set()
            return await flaky_once.call()

        assert await blocked.through(recovers) == "ok"  # blocked, then through: fixed
        async with asyncio.timeout(30):  # a hang guard, not a timing assertion
            assert await asyncio.gather(*waiters) == ["ok"] * 3
    assert gauge_values(registry)["permissions"] == 0
    assert [e["log_level"] for e in logs] == ["warning", "info"]


async def test_a_second_cause_is_reported_and_both_end_together() -> None:
    registry = CollectorRegistry()
    blocked = Blocked(Metrics(registry).blocked, wait=lambda attempt: 0.0 if attempt == 0 else 3600)
    creds, clock = FakeS3("credentials"), FakeS3("clock_skew")
    with capture_logs() as logs:
        tasks = [asyncio.create_task(blocked.through(f.call)) for f in (creds, clock)]
        await creds.until_tried(2)
        await clock.until_tried(2)
        assert gauge_values(registry) == {**dict.fromkeys(BLOCK_CAUSES, 0.0),
                                          "credentials": 1, "clock_skew": 1}  # fmt: skip
        tasks[0].cancel()  # shutdown: the wait is cancellable
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        clock.fixed.set()
        creds.fixed.set()
        # With the cancelled waiter gone, only the other one waits; a fresh
        # call that was blocked and then went through ends the state.
        second = FakeS3("clock_skew")

        async def recovers() -> str:
            if second.tries:
                second.fixed.set()
            return await second.call()

        assert await blocked.through(recovers) == "ok"
        async with asyncio.timeout(30):
            assert await tasks[1] == "ok"
    assert gauge_values(registry) == dict.fromkeys(BLOCK_CAUSES, 0.0)
    assert [(e["log_level"], e.get("cause")) for e in logs] == [
        ("warning", "credentials"),
        ("warning", "clock_skew"),
        ("info", None),
    ]


async def test_a_stale_state_ends_with_the_next_success() -> None:
    """The only blocked call was cancelled (shutdown, lease lost): the next
    call that goes through, with nobody waiting, ends the state."""
    registry = CollectorRegistry()
    blocked = Blocked(Metrics(registry).blocked, wait=lambda attempt: 3600)
    s3 = FakeS3()
    task = asyncio.create_task(blocked.through(s3.call))
    await s3.until_tried(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert blocked.causes == {"credentials"}
    s3.fixed.set()
    assert await blocked.through(s3.call) == "ok"
    assert blocked.causes == frozenset()
    assert gauge_values(registry)["credentials"] == 0


async def test_other_errors_pass_through() -> None:
    blocked = Blocked(Metrics(CollectorRegistry()).blocked, wait=lambda attempt: 0.0)

    async def rejected() -> None:
        raise PermanentError("s3 InvalidArgument: no", reason="s3_rejected")

    with pytest.raises(PermanentError):
        await blocked.through(rejected)


# -- the S3 adapter against the real store ----------------------------------


async def _s3_store(
    endpoint: S3Endpoint, bucket: str, *, secret: str | None = None, blocked: Blocked | None = None
) -> AsyncIterator[S3Store]:
    async with aioboto3.Session().client(
        "s3",
        endpoint_url=endpoint.url,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=secret or endpoint.secret_key,
        region_name=endpoint.region,
        config=boto_config(pool=4, timeout=10),
    ) as client:
        yield S3Store(client, bucket, timeout=10, attempts=2, blocked=blocked)


async def test_a_wrong_secret_is_a_credentials_block(s3_endpoint: S3Endpoint, bucket: str) -> None:
    async for store in _s3_store(s3_endpoint, bucket, secret="not-the-secret"):
        with pytest.raises(DeploymentBlocked) as caught:
            await store.put_object("k", b"x", "LFxW6F7g3d1lvOK38yMc1Q==", "text/plain")
        assert caught.value.cause == "credentials"
        with pytest.raises(DeploymentBlocked) as headed:  # a HEAD: a bare 403
            await store.head_object("k")
        assert headed.value.cause in ("credentials", "permissions")


async def test_a_missing_bucket_is_created_again(s3_endpoint: S3Endpoint, s3_client: Any) -> None:
    """NoSuchBucket waits like any block, but first tries to create the bucket."""
    registry = CollectorRegistry()
    blocked = Blocked(Metrics(registry).blocked, wait=lambda attempt: 0.0)
    name = f"gone-{uuid.uuid4().hex[:16]}"
    body = b"hello"
    md5_b64 = "XUFAKrxLKna5cZ2REBfFkg=="
    async for store in _s3_store(s3_endpoint, name, blocked=blocked):
        with capture_logs() as logs:
            await store.put_object("k", body, md5_b64, "text/plain")
    try:
        assert s3_client.get_object(Bucket=name, Key="k")["Body"].read() == body
    finally:
        s3_client.delete_object(Bucket=name, Key="k")
        s3_client.delete_bucket(Bucket=name)
    assert [(e["log_level"], e.get("cause")) for e in logs] == [
        ("warning", "no_bucket"),
        ("info", None),
    ]
    assert gauge_values(registry)["no_bucket"] == 0
