"""Start-up checks: the few problems that no amount of waiting fixes.

``cefmp4 run`` checks these before the service starts and, when one is found,
prints one line naming it and exits 2 (no traceback):

* **Redis unreachable** for ``REDIS_START_TIMEOUT_SECONDS`` (default 60) at
  start: a wrong ``REDIS_URL``, a wrong password, no Redis at all. Once the
  service runs, a Redis restart is waited out instead, however long.
* **No S3 credentials** anywhere (not in the configuration nor in the AWS
  chain: botocore's ``NoCredentialsError``).
* **The bucket is missing and cannot be created** (S3 answered the
  CreateBucket with a refusal).

Everything else is waited out rather than ended: S3 unreachable at start (the
files on disk are the buffer), a blocked deployment (AccessDenied, a clock S3
refuses: the service waits and says so in its metrics), Redis restarting while
the service runs.

A bad configuration exits 2 before this (``cefmp4.domain.config``).
"""

from __future__ import annotations

import asyncio

import botocore.exceptions as bexc
import redis.asyncio as aioredis

from cefmp4.adapters.clients import s3_client
from cefmp4.adapters.eventlog import call_redis
from cefmp4.adapters.logsetup import redact_url
from cefmp4.adapters.s3store import translate
from cefmp4.domain.config import Config
from cefmp4.domain.errors import CefError

FIRST_WAIT = 0.2
MAX_WAIT = 5.0


class StartupError(CefError):
    """The service cannot start; the message is the one line printed (exit 2)."""


async def wait_for_redis(redis: aioredis.Redis, config: Config) -> None:
    """Return once Redis answers PING; StartupError after the start timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.redis_start_timeout_seconds
    wait = FIRST_WAIT
    while True:
        try:
            await call_redis(redis.ping, attempts=1)
            return
        except CefError as exc:
            last = exc
        if loop.time() + wait > deadline:
            raise StartupError(
                f"cannot reach Redis at {redact_url(config.redis_url)} for "
                f"{config.redis_start_timeout_seconds:g} s (REDIS_START_TIMEOUT_SECONDS): {last}"
            )
        await asyncio.sleep(wait)  # a backoff between attempts, bounded by the deadline
        wait = min(wait * 2, MAX_WAIT)


async def check_s3(config: Config) -> None:
    """StartupError for missing credentials or a bucket that cannot be created;
    anything else (unreachable, refused) is left for the service to wait out."""
    bucket = config.s3_bucket_name
    async with s3_client(config, pool=1) as client:
        try:
            async with asyncio.timeout(config.s3_timeout_seconds):
                await client.head_bucket(Bucket=bucket)
            return
        except (bexc.NoCredentialsError, bexc.PartialCredentialsError) as exc:
            raise StartupError(
                f"no S3 credentials: {exc}; set S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY "
                "(or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, an instance role)"
            ) from exc
        except bexc.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchBucket"):
                return  # refused (a blocked deployment) or a 5xx: the service waits
        except (bexc.BotoCoreError, OSError, TimeoutError):
            return  # unreachable: the service waits for S3, the files are the buffer
        try:
            async with asyncio.timeout(config.s3_timeout_seconds):
                await client.create_bucket(Bucket=bucket)
        except bexc.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return  # another replica was first
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if status >= 500 or status == 429:
                return  # transient: the service's own ensure_bucket retries
            raise StartupError(
                f"bucket {bucket!r} does not exist and cannot be created: {translate(exc)}; "
                "create it, or grant s3:CreateBucket, or fix S3_BUCKET_NAME"
            ) from exc
        except (bexc.BotoCoreError, OSError, TimeoutError):
            return


async def preflight(config: Config, redis: aioredis.Redis) -> None:
    """Everything above, in order; raises StartupError."""
    await wait_for_redis(redis, config)
    await check_s3(config)
