"""The EventLog contract (``tests/contracts/eventlog.py``) on Redis and in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from cefmp4.adapters.eventlog import EventLog
from tests.contracts.eventlog import EventLogContract
from tests.contracts.memorylog import MemoryEventLog


class TestRedisEventLog(EventLogContract):
    @pytest.fixture
    async def log(self, redis_url: str, key_prefix: str) -> AsyncIterator[EventLog]:
        redis = aioredis.Redis.from_url(redis_url)
        try:
            yield EventLog(redis, f"{key_prefix}:events", "contract")
        finally:
            await redis.aclose()


class TestMemoryEventLog(EventLogContract):
    @pytest.fixture
    def log(self) -> MemoryEventLog:
        return MemoryEventLog(replica="contract")
