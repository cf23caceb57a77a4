"""``cefmp4 status`` and the replica heartbeat.

Pure: the model built from raw facts (durable = sum of recorded parts, lag,
lease owners, blocked replicas) and both renderings. Real Redis: a heartbeat
is written with its expiry and removed on a clean stop. End to end: the
service running in-process with a heartbeat beside it, one recording done and
one in progress; ``cefmp4 status --json`` shows the live stream with its
durable bytes, the completion, the groups, the watcher lease and the replica.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from cefmp4 import cli
from cefmp4.domain.config import Config
from cefmp4.domain.events import PartUploaded, StreamCompleted, StreamFailed
from cefmp4.ops.statuscli import (
    Facts,
    GroupFact,
    LeaseFact,
    Status,
    build,
    lease_row,
    render_json,
    render_text,
)
from cefmp4.runtime.heartbeat import (
    BlockedState,
    Heartbeat,
    ReplicaState,
    read_heartbeats,
    replica_key,
)
from projections.streams import Part, StreamState
from tests import mp4gen
from tests.harness import MiB, running, subprocess_env
from tests.test_gc import use_config_env

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def stream(stream_id: str, path: str, parts: list[int], *, mtime: datetime) -> StreamState:
    offsets = [sum(parts[:i]) for i in range(len(parts))]
    return StreamState(
        stream_id=stream_id,
        path=path,
        rel_path=Path(path).name,
        bucket="b",
        key=f"streams/{stream_id}/{Path(path).name}",
        inode=1,
        started_at=NOW - timedelta(minutes=5),
        size=sum(parts),
        mtime_ns=int(mtime.timestamp() * 1e9),
        upload_id="u" if parts else None,
        parts={
            n + 1: Part(n + 1, off, size, "e", "m", NOW - timedelta(minutes=4))
            for n, (off, size) in enumerate(zip(offsets, parts, strict=True))
        },
    )


def facts(**overrides: Any) -> Facts:
    base: dict[str, Any] = {
        "now": NOW,
        "live": [],
        "on_disk": {},
        "paths": {},
        "outcomes": [],
        "groups": [],
        "leases": [],
        "heartbeats": [],
        "key_prefix": "cefmp4",
    }
    return Facts(**(base | overrides))


@given(st.lists(st.integers(min_value=1, max_value=10 * MiB), max_size=20))
def test_durable_is_the_sum_of_the_recorded_parts(parts: list[int]) -> None:
    s = stream("s1", "/w/a.mp4", parts, mtime=NOW - timedelta(seconds=30))
    status = build(facts(live=[s], on_disk={"/w/a.mp4": sum(parts) + 7}))
    [row] = status.live
    assert row.durable == sum(parts) and row.parts == len(parts)
    assert row.on_disk == sum(parts) + 7
    assert row.age_seconds == 300
    # The last change is the later of the file's mtime (30 s ago) and the last part (4 min ago).
    assert row.lag_seconds == 30


@given(st.text(min_size=1, max_size=30), st.binary(min_size=8, max_size=8))
def test_a_lease_value_names_its_owner_whatever_the_owner_contains(
    owner: str, random: bytes
) -> None:
    fact = LeaseFact("cefmp4:lease:stream:s1", f"{owner}:{random.hex()}", 2500)
    row = lease_row(fact, "cefmp4")
    assert (row.name, row.owner, row.ttl_seconds) == ("stream:s1", owner, 2.5)


def test_status_names_blocked_replicas_leases_and_outcomes() -> None:
    blocked = BlockedState(cause="permissions", since=NOW - timedelta(minutes=3),
                           message="s3 AccessDenied: no")  # fmt: skip
    heartbeats = [
        ReplicaState(replica="host-1", version="0.1.0", started_at=NOW - timedelta(hours=1),
                     watching=True, at=NOW - timedelta(seconds=2)),
        ReplicaState(replica="host:2", version="0.1.0", started_at=NOW - timedelta(hours=1),
                     blocked=blocked, at=NOW - timedelta(seconds=1)),
    ]  # fmt: skip
    completed = StreamCompleted(stream_id="s1", at=NOW - timedelta(minutes=1), bucket="b",
                                key="streams/s1/a.mp4", size=3 * MiB, etag="x", sha256="y",
                                mtime_ns=0, parts=0, mp4="complete")  # fmt: skip
    failed = StreamFailed(stream_id="s2", at=NOW - timedelta(minutes=2), reason="unreadable")
    status = build(
        facts(
            heartbeats=heartbeats,
            leases=[
                LeaseFact("cefmp4:lease:watcher", "host-1:0011223344556677", 9000),
                LeaseFact("cefmp4:lease:stream:s3", "host:2:8899aabbccddeeff", 4000),
            ],
            outcomes=[("2-0", completed), ("1-0", failed)],
            paths={"s1": "/w/a.mp4"},
            groups=[GroupFact("uploaders", pending=2, lag=5, consumers=1)],
        )
    )
    assert status.watcher == "host-1"
    assert [(r.replica, r.leases) for r in status.replicas] == [
        ("host-1", ["watcher"]),
        ("host:2", ["stream:s3"]),
    ]
    assert [(b.replica, b.cause) for b in status.blocked] == [("host:2", "permissions")]
    assert [(o.outcome, o.path, o.reason) for o in status.recent] == [
        ("completed", "/w/a.mp4", None),
        ("failed", None, "unreadable"),
    ]
    text = render_text(status)
    assert "BLOCKED host:2: permissions since 3m00s ago: s3 AccessDenied: no" in text
    assert "/w/a.mp4" in text and "unreadable" in text and "uploaders" in text
    assert msgspec.json.decode(render_json(status), type=Status) == status


def test_nothing_blocked_says_so() -> None:
    text = render_text(build(facts()))
    assert "not blocked" in text and "BLOCKED" not in text


async def test_heartbeat_expires_with_three_ttls_and_leaves_on_a_clean_stop(
    make_config: Any,
) -> None:
    config: Config = make_config(lease_ttl_seconds=3.0, replica_id="hb-1")
    state = ReplicaState(replica="hb-1", version="v", started_at=NOW, watching=True)
    redis = aioredis.from_url(config.redis_url)
    try:
        beat = Heartbeat(redis, config, lambda: state, now=lambda: NOW)
        await beat.beat()
        key = replica_key(config.redis_key_prefix, "hb-1")
        assert 0 < await redis.pttl(key) <= 9000
        assert await read_heartbeats(redis, config.redis_key_prefix) == [
            msgspec.structs.replace(state, at=NOW)
        ]
        stop = asyncio.Event()
        stop.set()
        await beat.run(stop)  # writes once more, then leaves
        assert await redis.exists(key) == 0
        assert await read_heartbeats(redis, config.redis_key_prefix) == []
    finally:
        await redis.aclose()


async def test_status_of_a_running_service_with_a_recording_in_progress(
    make_config: Any,
    watch: Path,
    tmp_path: Path,
    sources: mp4gen.Mp4Sources,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A long idle timeout: the partial recording stays live while we look.
    config: Config = make_config(stream_timeout_seconds=120.0, replica_id="status-replica")
    done, growing = watch / "done.mp4", watch / "growing.mp4"
    started = datetime.now(UTC)
    async with running(config) as h:  # its own replica heartbeat included
        shutil.copyfile(sources.regular, done)
        await h.terminal(done)
        growing.write_bytes(sources.large.read_bytes()[: 6 * MiB])

        def one_part(p: Any) -> bool:
            s = p.for_path(str(growing))
            return s is not None and len(s.parts) == 1

        await h.until(one_part, what="the first part of the growing recording")
        use_config_env(monkeypatch, subprocess_env(config), tmp_path)
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, ["status", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        parts = [e for _, e in await h.events() if isinstance(e, PartUploaded)]
    [live] = doc["live"]
    assert live["path"] == str(growing)
    assert (live["on_disk"], live["durable"], live["parts"]) == (6 * MiB, 5 * MiB, 1)
    assert [(o["outcome"], o["path"]) for o in doc["recent"]] == [("completed", str(done))]
    assert {g["name"] for g in doc["backlog"]} == {"uploaders", "finalizers", "metadata"}
    assert doc["watcher"] == "status-replica"
    [replica] = doc["replicas"]
    assert replica["replica"] == "status-replica" and replica["watching"] is True
    assert datetime.fromisoformat(replica["started_at"]) >= started
    assert "watcher" in replica["leases"]
    assert doc["blocked"] == []
    assert sum(e.size for e in parts if e.stream_id == live["stream_id"]) == live["durable"]
