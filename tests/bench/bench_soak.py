"""Soak: a year-scale history costs nothing; what is on disk costs what it must.

A recorder box with 64 cameras hands CefMP4 ~92,000 recordings a day. This
bench builds that history synthetically and measures a real ``cefmp4 run``
against it (throwaway Redis with AOF + SeaweedFS):

1. **Empty deployment**: the service on an empty WATCH_DIR and an empty Redis;
   Redis memory and snapshot size are the baseline.
2. **History**: ``--recordings`` finished recordings' events (FileSeen,
   StreamIdle, StreamCompleted, MetadataWritten, and FileDeleted for those no
   longer on disk) are written through the documented wire format
   (``cefmp4.domain.events.encode``, XADD with ids days in the past, as a long-running
   deployment would have), and ``--files`` of them are small files still on
   disk, with the size, mtime and inode their events name. The consumer
   groups are created at the end of the history: that work was done long ago.
3. **First start** on that log (no snapshot): the replay, the first snapshot,
   the archive of everything older than EVENT_RETENTION to the bucket and
   the trim. Timed.
4. **Steady state** with the files on disk: idle CPU over ``--idle-seconds``
   (which spans a full rescan at RESCAN_INTERVAL_SECONDS), RSS, Redis
   memory, snapshot size, log length.
5. **Restart**: SIGTERM, a new MP4 dropped meanwhile, start again; time to
   "watching" and to the new recording's StreamCompleted (which includes
   SETTLE_SECONDS of quiet before a complete MP4 is finished).
6. **Files deleted**: every file removed; once their records are forgotten,
   snapshotted and the log trimmed again, the same figures as in 4.
7. **Archive replay**: the whole archive read back from the bucket and folded
   into a projection; events per second.

Targets (issue "A year on a 64-camera NVR"): idle CPU <= 2 % of a core and
RSS <= 150 MiB with 100k files on disk; restart <= 2 s; after the files go,
Redis and the snapshot within a few MB of the empty deployment; archive
replay >= 200k events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis

from cefmp4.adapters.archive import EventArchive
from cefmp4.dev.localservers import RedisServer, SeaweedS3, make_s3_client
from cefmp4.domain.config import Config
from cefmp4.domain.events import (
    Event,
    FileDeleted,
    FileSeen,
    MetadataWritten,
    StreamCompleted,
    StreamIdle,
    encode,
)
from cefmp4.runtime.service import connect
from projections.snapshots import decode_snapshot, snapshot_key
from projections.streams import Projection
from tests import mp4gen
from tests.bench.common import (
    MiB,
    bench_main,
    command_line,
    cpu_seconds,
    now_iso,
    proc_status_kib,
    wait_for,
)
from tests.harness import ServiceProcess, service_config

BUCKET = "bench-soak"
PREFIX = "soak"
GROUPS = ("uploaders", "finalizers", "metadata")
DAY_MS = 86_400_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_soak", description=__doc__.splitlines()[0]
    )
    p.add_argument("--recordings", type=int, default=1_000_000, help="history (1,000,000)")
    p.add_argument("--files", type=int, default=100_000, help="of them still on disk (100,000)")
    p.add_argument("--idle-seconds", type=float, default=65.0, help="idle CPU window (65)")
    p.add_argument("--rescan", type=float, default=60.0, help="RESCAN_INTERVAL_SECONDS (60)")
    p.add_argument("--retention", default="30s", help="EVENT_RETENTION for the bench (30s)")
    p.add_argument(
        "--snapshot-interval", type=float, default=10.0, help="SNAPSHOT_INTERVAL_SECONDS (10)"
    )
    return p.parse_args(argv)


# -- the synthetic history -----------------------------------------------------


def _make_files(watch: Path, count: int) -> list[Path]:
    paths = []
    body = os.urandom(1024)
    for i in range(count):
        path = watch / f"cam{i % 64:02d}" / f"seg{i:07d}.mp4"
        if i < 64:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        paths.append(path)
    return paths


def _recording(i: int, at: datetime, path: Path, on_disk: bool) -> list[Event]:
    sid = f"{at:%Y%m%dT%H%M%S}{at.microsecond // 1000:03d}Z-{i:012x}"
    rel = path.relative_to(path.parents[1]).as_posix()
    key = f"streams/{sid}/{rel}"
    if on_disk:
        st = path.stat()
        size, mtime_ns, inode = st.st_size, st.st_mtime_ns, st.st_ino
    else:
        size, mtime_ns, inode = 1024, 1_700_000_000_000_000_000 + i, 10_000_000 + i
    common: dict[str, Any] = {"stream_id": sid, "at": at}
    events: list[Event] = [
        FileSeen(**common, path=str(path), rel_path=rel, bucket=BUCKET, key=key, size=size,
                 mtime_ns=mtime_ns, inode=inode),
        StreamIdle(**common, size=size, mtime_ns=mtime_ns, reason="timeout", mp4="invalid",
                   mp4_reason="not an mp4"),
        StreamCompleted(**common, bucket=BUCKET, key=key, size=size, etag="0" * 32,
                        sha256="0" * 64, mtime_ns=mtime_ns, parts=0, mp4="invalid"),
        MetadataWritten(**common, key=f"{key}.metadata.json", duration_seconds=None,
                        error="ffprobe reported no duration"),
    ]  # fmt: skip
    if not on_disk:
        events.append(FileDeleted(**common, path=str(path)))
    return events


def _write_history(client: redis.Redis, key: str, paths: list[Path], recordings: int) -> int:
    """XADD every recording's events with ids ~10 days old, oldest first: the
    files still on disk are the newest recordings. Returns the entry count."""
    base_ms = int(time.time() * 1000) - 10 * DAY_MS
    start = datetime.now(UTC) - timedelta(days=10)
    deleted = recordings - len(paths)
    written = 0
    pipe = client.pipeline(transaction=False)
    for i in range(recordings):
        on_disk = i >= deleted
        path = paths[i - deleted] if on_disk else paths[0].parents[1] / "gone" / f"{i}.mp4"
        at = start + timedelta(milliseconds=i)
        for seq, event in enumerate(_recording(i, at, path, on_disk)):
            fields: Any = encode(event, "history")
            pipe.xadd(key, fields, id=f"{base_ms + i}-{seq}")
            written += 1
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()
    for group in GROUPS:  # the history was handled long ago
        client.xgroup_create(key, group, id="$", mkstream=True)
    return written


# -- measuring -------------------------------------------------------------------


def _redis_figures(client: redis.Redis, key: str) -> dict[str, Any]:
    info: Any = client.info("memory")
    snapshot: Any = client.strlen(snapshot_key(PREFIX))
    return {
        "redis_used_mib": round(info["used_memory"] / MiB, 2),
        "snapshot_bytes": int(snapshot),
        "log_entries": int(client.xlen(key)) if client.exists(key) else 0,
    }


def _idle(pid: int, seconds: float) -> dict[str, Any]:
    cpu0, wall0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    cpu, wall = cpu_seconds(pid) - cpu0, time.monotonic() - wall0
    return {
        "idle_cpu_percent": round(100 * cpu / wall, 2),
        "idle_window_s": round(wall, 1),
        "rss_mib": round(proc_status_kib(pid)["VmRSS"] / 1024, 1),
    }


def _snapshot_files(client: redis.Redis) -> int | None:
    """How many file records the stored snapshot holds (None: no snapshot yet)."""
    raw: Any = client.get(snapshot_key(PREFIX))
    return None if raw is None else len(decode_snapshot(raw).files)


def _settled(client: redis.Redis, key: str, files: int, max_log: int) -> bool | None:
    """True once the snapshot holds ``files`` records and the log was trimmed."""
    return True if _snapshot_files(client) == files and client.xlen(key) <= max_log else None


def _completed_after(client: redis.Redis, key: str, after: str) -> float | None:
    """Entry time of the first StreamCompleted after ``after`` (the only new recording)."""
    entries: Any = client.xrange(key, min=f"({after}")
    for entry_id, fields in entries:
        if fields[b"type"] == b"StreamCompleted":
            return int(entry_id.decode().split("-")[0]) / 1000
    return None


async def _archive_replay(config: Config) -> dict[str, Any]:
    async with connect(config) as (_redis, store):
        archive = EventArchive(store, config.event_archive_prefix)
        projection = Projection()
        started = time.monotonic()
        count = 0
        async for entry_id, event in archive.events():
            if isinstance(event, Event):
                projection.apply(entry_id, event)
            count += 1
        seconds = time.monotonic() - started
    return {
        "archive_events": count,
        "archive_replay_s": round(seconds, 2),
        "archive_events_per_s": round(count / seconds) if seconds else None,
        "archive_projection_files": len(projection.files),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "ok": False,
        "command": command_line(),
        "load_average_1m_before": os.getloadavg()[0],
    }
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="cefmp4-bench-soak-")).resolve()
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        rds = stack.enter_context(RedisServer(tmp / "redis"))
        s3 = stack.enter_context(SeaweedS3(tmp / "s3"))
        make_s3_client(s3.endpoint).create_bucket(Bucket=BUCKET)
        client = redis.Redis.from_url(rds.url)
        watch = tmp / "watch"
        watch.mkdir()
        config = service_config(
            watch, rds.url, PREFIX, BUCKET, s3.endpoint,
            # The production defaults, except a retention short enough to watch.
            settle_seconds=1.0, stream_timeout_seconds=30.0, claim_idle_seconds=60.0,
            rescan_interval_seconds=args.rescan, event_retention=args.retention,
            snapshot_interval_seconds=args.snapshot_interval,
        )  # fmt: skip
        key = config.events_key
        settings = {
            "recordings": args.recordings,
            "files_on_disk": args.files,
            "RESCAN_INTERVAL_SECONDS": args.rescan,
            "EVENT_RETENTION": args.retention,
            "SNAPSHOT_INTERVAL_SECONDS": args.snapshot_interval,
        }
        result["settings"] = settings

        # 1. empty deployment
        with ServiceProcess(config, tmp / "empty.log") as svc:
            result["empty"] = {**_redis_figures(client, key), **_idle(svc.pid, 5.0)}
        client.delete(key, snapshot_key(PREFIX))

        # 2. history
        started = time.monotonic()
        paths = _make_files(watch, args.files)
        entries = _write_history(client, key, paths, args.recordings)
        result["history"] = {
            "entries": entries,
            "write_s": round(time.monotonic() - started, 1),
            **_redis_figures(client, key),
        }
        print(f"soak: history written: {result['history']}", file=sys.stderr)

        # 3. first start: replay, snapshot, archive, trim
        svc = ServiceProcess(config, tmp / "first.log")
        stack.callback(svc.stop)
        t0 = time.monotonic()
        svc.start(ready_timeout=600)
        ready = time.monotonic() - t0
        _, _ = wait_for(lambda: _settled(client, key, args.files, 50_000), timeout=900,
                        poll=1.0, what="first snapshot, archive and trim")  # fmt: skip
        result["first_start"] = {
            "to_watching_s": round(ready, 2),
            "to_trimmed_s": round(time.monotonic() - t0, 1),
        }
        print(f"soak: first start: {result['first_start']}", file=sys.stderr)

        # 4. steady state with the files on disk
        result["steady"] = {**_idle(svc.pid, args.idle_seconds), **_redis_figures(client, key)}
        print(f"soak: steady: {result['steady']}", file=sys.stderr)

        # 5. restart with a new recording
        svc.terminate(60)
        last: Any = client.xrevrange(key, count=1)
        last_id = last[0][0].decode() if last else "0-0"
        fresh = watch / "new" / "new.mp4"
        fresh.parent.mkdir()
        mp4gen.make_mp4(fresh, seconds=1)
        svc = ServiceProcess(config, tmp / "second.log")
        stack.callback(svc.stop)
        t0 = time.monotonic()
        t0_wall = time.time()
        svc.start(ready_timeout=120)
        ready = time.monotonic() - t0
        done_at, _ = wait_for(lambda: _completed_after(client, key, last_id), timeout=120,
                              poll=0.05, what="the new recording completed")  # fmt: skip
        result["restart"] = {
            "to_watching_s": round(ready, 2),
            "to_first_completed_s": round(done_at - t0_wall, 2),
        }
        print(f"soak: restart: {result['restart']}", file=sys.stderr)
        # The steady state a long-running service lives in: restarted from a
        # snapshot (the first start above also replayed the whole history).
        result["restarted"] = {**_idle(svc.pid, args.idle_seconds), **_redis_figures(client, key)}
        print(f"soak: restarted: {result['restarted']}", file=sys.stderr)

        # 6. every file deleted
        t0 = time.monotonic()
        for cam in watch.iterdir():
            shutil.rmtree(cam)
        _, _ = wait_for(lambda: _settled(client, key, 0, 1_000_000), timeout=900, poll=1.0,
                        what="records forgotten and snapshotted")  # fmt: skip
        time.sleep(5.0)  # one more retention + snapshot round, for the trim of the deletions
        _, _ = wait_for(
            lambda: True if client.xlen(key) < 20_000 else None,
            timeout=900, poll=1.0, what="deletions trimmed",
        )  # fmt: skip
        result["deleted"] = {
            "to_forgotten_and_trimmed_s": round(time.monotonic() - t0, 1),
            **_idle(svc.pid, min(args.idle_seconds, 20.0)),
            **_redis_figures(client, key),
        }
        print(f"soak: deleted: {result['deleted']}", file=sys.stderr)
        svc.stop()

        # 7. archive replay
        result["archive"] = asyncio.run(_archive_replay(config))
    result["targets"] = targets(result)
    result["finished_at"] = now_iso()
    result["ok"] = True
    return result


def targets(r: dict[str, Any]) -> dict[str, bool]:
    empty, steady, deleted = r["empty"], r["restarted"], r["deleted"]
    return {
        "idle_cpu_le_2pct": steady["idle_cpu_percent"] <= 2.0,
        "rss_le_150mib": steady["rss_mib"] <= 150,
        "restart_le_2s": r["restart"]["to_watching_s"] <= 2.0,
        "redis_back_within_5mib": deleted["redis_used_mib"] - empty["redis_used_mib"] <= 5,
        "snapshot_back_within_5mib": deleted["snapshot_bytes"] - empty["snapshot_bytes"] <= 5 * MiB,
        "archive_replay_ge_200k_per_s": (r["archive"]["archive_events_per_s"] or 0) >= 200_000,
    }


def report(r: dict[str, Any]) -> str:
    s, h, e, st, d = r["settings"], r["history"], r["empty"], r["steady"], r["deleted"]
    rst = r["restarted"]
    rs, fs, a = r["restart"], r["first_start"], r["archive"]
    lines = [
        f"Soak: {s['recordings']:,} recordings of history ({h['entries']:,} entries), "
        f"{s['files_on_disk']:,} files on disk",
        f"  history in Redis before the first start: {h['redis_used_mib']} MiB",
        f"  first start (replay + snapshot + archive + trim): watching after "
        f"{fs['to_watching_s']} s, trimmed after {fs['to_trimmed_s']} s",
        "  state        idle CPU   RSS MiB   Redis MiB   snapshot B   log entries"
        "   (files, 1st: the process that replayed the history; files: restarted)",
    ]
    for name, x in (("empty", e), ("files, 1st", st), ("files", rst), ("deleted", d)):
        lines.append(
            f"  {name:<12} {x['idle_cpu_percent']:>6.2f} %  {x['rss_mib']:>8.1f}  "
            f"{x['redis_used_mib']:>10.2f}  {x['snapshot_bytes']:>11,}  {x['log_entries']:>11,}"
        )
    lines += [
        f"  restart: watching after {rs['to_watching_s']} s, new recording completed after "
        f"{rs['to_first_completed_s']} s (includes SETTLE_SECONDS=1)",
        f"  archive replay: {a['archive_events']:,} events in {a['archive_replay_s']} s = "
        f"{a['archive_events_per_s']:,}/s",
        "  targets: "
        + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in r["targets"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench_main("soak", parse_args, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
