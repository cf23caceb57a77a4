"""The sampled levels (cefmp4.runtime.sampler) and the seed's names (cefmp4.adapters.metrics):
pure functions of the projection and of the counters."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from cefmp4.adapters.metrics import Metrics
from cefmp4.domain.config import Config
from cefmp4.runtime.sampler import Backlog, backlog_of, not_durable_bytes, oldest_unfinished_seconds
from projections.streams import Part, StreamState
from tests.harness import running

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def stream(n: int, size: int, part_sizes: list[int], age: float) -> StreamState:
    parts = {
        i + 1: Part(i + 1, sum(part_sizes[:i]), s, "e", "m", T0) for i, s in enumerate(part_sizes)
    }
    return StreamState(
        stream_id=f"s{n}",
        path=f"/w/{n}.mp4",
        rel_path=f"{n}.mp4",
        bucket="b",
        key=f"k{n}",
        inode=n,
        started_at=T0 - timedelta(seconds=age),
        size=size,
        parts=parts,
    )


streams = st.lists(
    st.tuples(
        st.integers(0, 10**10),
        st.lists(st.integers(1, 10**8), max_size=5),
        st.floats(0, 10**6, allow_nan=False),
    ),
    max_size=8,
).map(lambda xs: [stream(i, *x) for i, x in enumerate(xs)])


@given(streams)
def test_not_durable_bytes_is_what_files_have_beyond_their_parts(live: list[StreamState]) -> None:
    total = not_durable_bytes(live)
    assert total == sum(max(0, s.size - sum(p.size for p in s.parts.values())) for s in live)
    assert total >= 0
    # A stream whose parts cover its file adds nothing.
    covered = [stream(99, 10, [4, 6], 0)]
    assert not_durable_bytes(live + covered) == total


@given(streams)
def test_oldest_unfinished_is_the_age_of_the_first_seen(live: list[StreamState]) -> None:
    age = oldest_unfinished_seconds(live, T0)
    if not live:
        assert age == 0.0
    else:
        assert age == max((T0 - s.started_at).total_seconds() for s in live)


def test_backlog_reads_redis_py_xinfo_groups() -> None:
    infos = [
        {"name": b"uploaders", "consumers": 2, "pending": 3, "lag": 7},
        {"name": "metadata", "pending": 0, "lag": None},
    ]
    assert backlog_of(infos) == [Backlog("uploaders", 7, 3), Backlog("metadata", None, 0)]


def test_seed_names_are_views_of_the_cefmp4_series() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.uploaded("growing", 100, T0)
    m.uploaded("final", 20, T0 + timedelta(seconds=5))
    m.failed.labels("empty").inc()
    m.failed.labels("unreadable").inc(2)
    m.handler_errors.labels("uploaders", "transient").inc(2)
    m.handler_errors.labels("uploaders", "permanent").inc()
    m.handler_errors.labels("metadata", "internal").inc()
    m.live_streams.set(4)
    changed = T0 + timedelta(seconds=10)
    m.completed_stream(
        "complete",
        seen=T0,
        idle=changed + timedelta(seconds=1),
        changed_ns=int(changed.timestamp() * 1e9),
        at=changed + timedelta(seconds=3),
    )

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("video_chunks_uploaded_total") == 2
    assert value("video_bytes_uploaded_total") == 120
    assert value("cefmp4_last_upload_timestamp_seconds") == (T0 + timedelta(seconds=5)).timestamp()
    assert value("streams_failed_total") == 3
    assert value("streams_completed_total") == 1
    assert value("video_failed_operations_total", operation_type="uploaders") == 3
    assert value("video_failed_operations_total", operation_type="metadata") == 1
    assert value("active_streams_gauge") == 4
    assert value("video_stream_duration_seconds_sum") == 13
    assert value("video_processing_time_seconds_sum") == 2
    assert value("cefmp4_close_to_durable_seconds_sum") == 3
    assert value("process_resident_memory_bytes") is not None


async def test_a_running_service_reports_what_is_not_yet_durable(
    make_config: Callable[..., Config], watch: Path
) -> None:
    # A long idle timeout keeps the file live; it is below one part, so none
    # of its bytes go up while it grows: all of them are "not yet durable".
    config = make_config(stream_timeout_seconds=120.0)
    data = os.urandom(1024 * 1024 + 17)
    async with running(config) as h:
        (watch / "cam.mp4").write_bytes(data)
        await h.until(lambda p: bool(p.live()), what="the stream to be seen")

        async with asyncio.timeout(60):  # the sampler's next round (every 5 s)
            while True:
                if h.registry.get_sample_value("cefmp4_not_durable_bytes") == len(data):
                    break
                await asyncio.sleep(0.05)
        assert h.registry.get_sample_value("cefmp4_live_streams") == 1
        assert (h.registry.get_sample_value("cefmp4_oldest_unfinished_seconds") or 0) > 0
        assert h.registry.get_sample_value("cefmp4_blocked", {"cause": "credentials"}) == 0
        assert h.registry.get_sample_value("cefmp4_watcher_lease_held") == 1
