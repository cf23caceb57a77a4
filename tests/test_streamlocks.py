"""Per-stream locks (``cefmp4.adapters.streamlocks.StreamLocks``).

The uploader, the finalizer and the watcher's reactions hold a stream's lock
while they decide and act; if two of them interleaved on one stream, a
decision and the event recording its outcome could be split (e.g. two
CreateMultipartUpload calls for one stream). Different streams must not wait
for each other, and the table must not grow with every recording ever seen.
"""

from __future__ import annotations

import asyncio

import pytest

from cefmp4.adapters.streamlocks import StreamLocks


async def test_same_stream_is_serialized() -> None:
    locks = StreamLocks()
    inside = 0
    most = 0
    order: list[str] = []

    async def worker(name: str) -> None:
        nonlocal inside, most
        async with locks.hold("s1"):
            inside += 1
            most = max(most, inside)
            order.append(f"{name}+")
            for _ in range(5):  # yield repeatedly: give others every chance to enter
                await asyncio.sleep(0)
            order.append(f"{name}-")
            inside -= 1

    await asyncio.gather(*(worker(str(i)) for i in range(5)))
    assert most == 1
    # Each holder's enter is immediately followed by its own exit.
    assert all(order[i][:-1] == order[i + 1][:-1] for i in range(0, len(order), 2))
    assert len(locks) == 0


async def test_different_streams_run_concurrently() -> None:
    locks = StreamLocks()
    a_inside = asyncio.Event()
    b_inside = asyncio.Event()

    async def holder(stream_id: str, mine: asyncio.Event, other: asyncio.Event) -> None:
        async with locks.hold(stream_id):
            mine.set()
            # Only possible if the other stream's holder got in meanwhile: a
            # global lock would deadlock here and hit the timeout.
            await other.wait()

    async with asyncio.timeout(2):
        await asyncio.gather(holder("a", a_inside, b_inside), holder("b", b_inside, a_inside))
    assert len(locks) == 0


async def test_table_tracks_holders_and_waiters_then_empties() -> None:
    locks = StreamLocks()
    release = asyncio.Event()
    entered: list[str] = []

    async def hold(stream_id: str, name: str) -> None:
        async with locks.hold(stream_id):
            entered.append(name)
            await release.wait()

    tasks = [
        asyncio.create_task(hold("a", "a1")),
        asyncio.create_task(hold("a", "a2")),
        asyncio.create_task(hold("b", "b1")),
    ]
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(locks) == 2  # one entry per stream, not per user
    assert entered == ["a1", "b1"]  # a2 waits for a1
    release.set()
    await asyncio.gather(*tasks)
    assert entered == ["a1", "b1", "a2"]
    assert len(locks) == 0


async def test_table_empties_after_an_exception() -> None:
    locks = StreamLocks()
    with pytest.raises(RuntimeError):
        async with locks.hold("s1"):
            raise RuntimeError("boom")
    assert len(locks) == 0
    # And the lock is usable again (it was released, not leaked held).
    async with asyncio.timeout(1), locks.hold("s1"):
        pass


async def test_cancelled_waiter_does_not_leak_an_entry() -> None:
    # Shutdown cancels tasks that are queued on a lock; their count must go.
    locks = StreamLocks()
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("s1"):
            await release.wait()

    async def waiter() -> None:
        async with locks.hold("s1"):
            raise AssertionError("must not get the lock")

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    second = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert len(locks) == 1
    release.set()
    await first
    assert len(locks) == 0
