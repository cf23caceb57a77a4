"""Per-stream mutual exclusion inside one process: an asyncio lock per stream.

The uploader, the finalizer and the supervisor's failer may all touch one
multipart upload; holding the stream's lock while deciding and acting keeps a
decision and its outcome event together. This is the in-process half of
``leases.StreamLeases`` (tasks of this process queue here instead of polling
Redis for the lease). Locks are created on demand and dropped when nobody
holds or waits for them, so the table does not grow with the number of
recordings ever seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class StreamLocks:
    """An ``asyncio.Lock`` per stream id, made on first use and dropped with its
    last user; ``len`` is the number of streams held or waited for."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, stream_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(stream_id, (asyncio.Lock(), 0))
        self._locks[stream_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[stream_id]
            if users == 1:
                del self._locks[stream_id]
            else:
                self._locks[stream_id] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
