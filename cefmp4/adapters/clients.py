"""The external clients, built from the Config in one place.

Every entry point - the service, ``events``, ``status``, ``verify``,
``doctor``, ``gc``, ``retry`` - talks to the same Redis and S3 in the same
way, so their settings (timeouts, path-style addressing, no SigV4 payload
hash, botocore's retries off in favour of ours) live here and nowhere else:

* :func:`redis_client`: the redis-py asyncio client (socket timeouts so a
  dead server cannot hang a call; ``call_redis`` retries around it).
* :func:`s3_client`: the aiobotocore client, ``pool`` connections, closed on
  exit; wrap it in ``S3Store`` for the project's error tree and retries.
* :func:`probed_redis`: for the read-only commands, a client that answered
  one PING, else :class:`Unreachable` (the command exits 2 with one line).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import redis.asyncio as aioredis

from cefmp4.adapters.eventlog import call_redis
from cefmp4.adapters.logsetup import redact_url
from cefmp4.adapters.s3store import boto_config
from cefmp4.domain.config import Config
from cefmp4.domain.errors import CefError


class Unreachable(CefError):
    """Redis or S3 did not answer a command's first probe: it exits with 2."""


def redis_client(config: Config) -> aioredis.Redis:
    return aioredis.from_url(
        config.redis_url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=15
    )


@contextlib.asynccontextmanager
async def s3_client(
    config: Config, *, pool: int = 4, request_timeout: float | None = None
) -> AsyncIterator[Any]:
    """The raw S3 client (aiobotocore), ``pool`` connections, closed on exit;
    ``request_timeout`` (default S3_TIMEOUT_SECONDS) bounds each socket read."""
    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=config.s3_endpoint_url,
        aws_access_key_id=config.s3_access_key_id,
        aws_secret_access_key=config.s3_secret_access_key,
        region_name=config.s3_region_name,
        config=boto_config(pool=pool, timeout=request_timeout or config.s3_timeout_seconds),
    ) as client:
        yield client


@contextlib.asynccontextmanager
async def probed_redis(config: Config) -> AsyncIterator[aioredis.Redis]:
    """A Redis client that answered one PING (no retries), closed on exit."""
    where = redact_url(config.redis_url)
    try:
        redis = aioredis.from_url(config.redis_url, socket_timeout=30, socket_connect_timeout=5)
    except ValueError as exc:  # not a redis:// URL
        raise Unreachable(f"cannot use REDIS_URL {where}: {exc}") from exc
    try:
        try:
            await call_redis(redis.ping, attempts=1)
        except CefError as exc:
            raise Unreachable(f"cannot reach Redis at {where}: {exc}") from exc
        yield redis
    finally:
        await redis.aclose()
