"""Secrets never leave the process: the S3 secret key and the Redis password.

Pure parts first (``redact_url``, ``secrets_of``, the ``Redact`` processor,
property-tested), then the logging configuration in process (tracebacks,
botocore errors, the standard library's loggers), then the real thing: the
service as a child process at ``LOG_LEVEL=DEBUG`` against a Redis that
requires a password, recording a file and failing on others, after which
everything it wrote (its whole output, every event, every object and sidecar,
``--help``) is searched for the secrets. Two more children take the error
paths a wrong secret opens: a wrong S3 secret (a permanent error at start, a
traceback with a botocore error) and a wrong Redis password (retried).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis.asyncio as aioredis
import structlog
from botocore.exceptions import ClientError
from hypothesis import given
from hypothesis import strategies as st

from cefmp4.adapters.logsetup import (
    REDACTED,
    Redact,
    configure,
    redact_url,
    secrets_of,
    url_passwords,
)
from cefmp4.dev.localservers import RedisServer, S3Endpoint
from cefmp4.domain.config import Config
from tests import mp4gen
from tests.harness import Harness, ServiceProcess, objects, service_config

# --- redact_url ---


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:p%40ss@h/1?db=1", "rediss://user:***@h/1?db=1"),
        ("redis://u:a@b@h:1", "redis://u:***@h:1"),  # unencoded '@' in it: the last one ends it
        ("redis://h/0?password=x&db=2", "redis://h/0?password=***&db=2"),  # redis-py reads it too
        ("unix:///run/redis.sock?password=x", "unix:///run/redis.sock?password=***"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://user@h/0", "redis://user@h/0"),  # a user name alone is no secret
        ("redis://u:@h/0", "redis://u:@h/0"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@given(
    user=st.text(),
    password=st.text(min_size=1),
    host=st.from_regex(r"[a-z0-9.-]{1,20}", fullmatch=True),
    port=st.integers(1, 65535),
)
def test_redact_url_masks_any_password_and_keeps_the_rest(
    user: str, password: str, host: str, port: int
) -> None:
    u = quote(user, safe="")
    url = f"redis://{u}:{quote(password, safe='')}@{host}:{port}/0"
    assert redact_url(url) == f"redis://{u}:{REDACTED}@{host}:{port}/0"
    assert url_passwords(url) == [quote(password, safe="")]
    assert redact_url(f"redis://{host}:{port}/0") == f"redis://{host}:{port}/0"


def test_secrets_of_covers_every_spelling() -> None:
    config = Config(s3_secret_access_key='s3"cr\\et', redis_url="redis://:p%40ss@h/0")
    found = secrets_of(config)
    # As configured, decoded (redis-py sends the decoded one), JSON/repr-escaped.
    assert {'s3"cr\\et', 's3\\"cr\\\\et', "p%40ss", "p@ss"} <= set(found)
    assert secrets_of(Config()) == ()


# --- the processor ---


@given(secret=st.text(st.characters(blacklist_characters="*"), min_size=1), around=st.text())
def test_redact_leaves_no_occurrence(secret: str, around: str) -> None:
    redact = Redact([secret])
    event = {"event": around + secret + around, "nested": {"k": [secret, 1, None]}}
    out = redact(None, "info", event)
    assert secret not in out["event"]
    assert out["nested"] == {"k": [REDACTED, 1, None]}


def test_redact_masks_objects_whose_text_holds_a_secret() -> None:
    redact = Redact(["hunter2"])
    out = redact(None, "info", {"error": ValueError("bad hunter2"), "n": 3, "e": ValueError("ok")})
    assert out["error"] == f"ValueError('bad {REDACTED}')"
    assert out["n"] == 3 and isinstance(out["e"], ValueError)  # untouched when clean


# --- configure(): what the logging actually prints ---

S3_SECRET = "s3-" + "Q" * 8 + '"quote\\back'
REDIS_PASSWORD = "rp@ss/" + "Z" * 8


@pytest.fixture
def restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.mark.parametrize("app_env", ["development", "production"])
def test_configured_logging_masks_secrets_in_tracebacks_and_library_logs(
    app_env: Any, restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://:{quote(REDIS_PASSWORD, safe='')}@h:6379/0"
    configure(
        Config(s3_secret_access_key=S3_SECRET, redis_url=url, log_level="DEBUG", app_env=app_env)
    )
    log = structlog.get_logger("t")
    try:
        try:
            raise ClientError(
                {"Error": {"Code": "SignatureDoesNotMatch", "Message": f"key {S3_SECRET}"}},
                "PutObject",
            )
        except ClientError as exc:
            raise RuntimeError(f"wrapped, password {REDIS_PASSWORD}") from exc
    except RuntimeError:
        log.exception("upload failed", url=url, detail={"secret": S3_SECRET})
    logging.getLogger("botocore.hooks").warning("header %s", S3_SECRET)
    logging.getLogger("botocore.endpoint").debug("request headers %s", S3_SECRET)
    err = capsys.readouterr().err
    for needle in ("SignatureDoesNotMatch", "wrapped, password", "upload failed", "header ***"):
        assert needle in err, err  # the lines are there ...
    for secret in secrets_of(Config(s3_secret_access_key=S3_SECRET, redis_url=url)):
        assert secret not in err  # ... without the secrets
    assert "request headers" not in err  # libraries' DEBUG stays off at LOG_LEVEL=DEBUG


# --- --help ---

HELP_SECRET = "help-" + secrets.token_hex(8)


@pytest.mark.parametrize(
    "argv", [["--help"], ["run", "--help"], ["local", "--help"], ["gc", "--help"]]
)
def test_help_prints_no_secret(argv: list[str], tmp_path: Path) -> None:
    out = run_cli(argv, tmp_path, secret=HELP_SECRET)
    assert "usage: cefmp4" in out
    assert HELP_SECRET not in out


def run_cli(argv: list[str], cwd: Path, secret: str) -> str:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "S3_SECRET_ACCESS_KEY": secret,
        "REDIS_URL": f"redis://:{secret}@127.0.0.1:1/0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "cefmp4", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout + result.stderr


# --- the service as a child process: grep everything it wrote ---


def wait_for_log(service: ServiceProcess, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in service.log_tail(10_000_000):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the log:\n{service.tail()}")
        time.sleep(0.05)


def secret_spellings(*values: str) -> set[str]:
    return {s for v in values for s in (v, quote(v, safe=""))}


async def test_nothing_the_service_writes_holds_a_secret(
    tmp_path: Path,
    watch: Path,
    sources: mp4gen.Mp4Sources,
    key_prefix: str,
    s3_endpoint: S3Endpoint,
    s3_client: Any,
    bucket: str,
) -> None:
    password = "pw-" + secrets.token_hex(12) + "/@:?#"  # characters a URL must encode
    assert len(s3_endpoint.secret_key) >= 8  # a secret long enough to search for
    with RedisServer(tmp_path / "redis", password=password) as redis_server:
        assert password not in redis_server.url  # percent-encoded in the URL
        config = service_config(watch, redis_server.url, key_prefix, bucket, s3_endpoint)
        service = ServiceProcess(config, tmp_path / "service.log")
        service.env["LOG_LEVEL"] = "DEBUG"
        client = aioredis.from_url(redis_server.url)
        try:
            with service:
                good, garbage, empty = watch / "good.mp4", watch / "garbage.mp4", watch / "e.mp4"
                shutil.copyfile(sources.regular, good)
                garbage.write_bytes(b"not an mp4 at all " * 1000)  # ffprobe fails on it
                empty.touch()  # StreamFailed(reason="empty") at the idle timeout
                harness = Harness(config, client)
                states = {p: await harness.terminal(p) for p in (good, garbage, empty)}
            entries: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(config.events_key)  # type: ignore[assignment]
        finally:
            await client.aclose()
        assert states[good].status == "completed" and states[garbage].status == "completed"
        assert states[empty].status == "failed"
        assert service.returncode == 0

        # Error paths opened by a wrong secret, each in its own process:
        # a wrong S3 secret blocks the deployment (waited out, S3's error in
        # the log line), a wrong Redis password is retried.
        wrong_s3 = "wrong-s3-" + secrets.token_hex(12)
        bad_s3 = ServiceProcess(
            service_config(watch, redis_server.url, "other", bucket,
                           dataclasses.replace(s3_endpoint, secret_key=wrong_s3)),
            tmp_path / "bad-s3.log",
        )  # fmt: skip
        bad_s3.env["LOG_LEVEL"] = "DEBUG"
        bad_s3.start()
        try:
            await asyncio.to_thread(wait_for_log, bad_s3, "deployment blocked")
        finally:
            bad_s3.kill()
        # S3's own error is in the log: its code, or for a HEAD (whose 403
        # has no body, so no code) the status. Which call meets the wrong
        # secret first depends on how start-up's calls interleave.
        blocked_log = bad_s3.log_tail(100_000)
        assert "SignatureDoesNotMatch" in blocked_log or "s3 403: Forbidden" in blocked_log, (
            bad_s3.tail()
        )
        wrong_password = "wrong-" + secrets.token_hex(12)
        bad_redis = ServiceProcess(
            service_config(watch, redis_server.url.replace(quote(password, safe=""),
                           wrong_password), "other", bucket, s3_endpoint),
            tmp_path / "bad-redis.log",
        )  # fmt: skip
        bad_redis.env["LOG_LEVEL"] = "DEBUG"
        bad_redis.start()
        try:
            await asyncio.to_thread(wait_for_log, bad_redis, "invalid username-password")
        finally:
            bad_redis.kill()

    help_text = "".join(run_cli(a, tmp_path, password) for a in (["--help"], ["run", "--help"]))
    stored = objects(s3_client, bucket)
    assert {k.rsplit("/", 1)[-1] for k in stored} == {
        "good.mp4", "good.mp4.metadata.json", "garbage.mp4", "garbage.mp4.metadata.json",
    }  # fmt: skip
    written: dict[str, bytes] = {
        "service log": service.log_path.read_bytes(),
        "bad-s3 log": bad_s3.log_path.read_bytes(),
        "bad-redis log": bad_redis.log_path.read_bytes(),
        "--help": help_text.encode(),
        **{f"event {i.decode()}": repr(fields).encode() for i, fields in entries},
        **{f"object {k}": body for k, body in stored.items()},
    }
    # The checks can fail: the URL is logged (masked), and so are the errors.
    log_text = written["service log"].decode()
    assert f"redis=redis://:{REDACTED}@" in log_text
    assert "ffprobe could not describe the recording" in log_text
    assert "redis=redis://:***@" in written["bad-redis log"].decode()
    leaks = [
        (where, secret)
        for where, data in written.items()
        for secret in secret_spellings(password, s3_endpoint.secret_key, wrong_s3, wrong_password)
        if secret.encode() in data
    ]
    assert leaks == []
