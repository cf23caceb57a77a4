"""Replay: how fast a process rebuilds the stream projection, with and without a snapshot.

Setup: a private ``redis-server`` under a temp dir (removed afterwards unless
``--keep``; its AOF is switched off after start, the bench only reads). A
synthetic log of ``--events`` events (1M) over ``--streams`` recordings
(10k), ``--concurrent`` (50) of them in flight at a time and interleaved at
random, each the way the service writes one: FileSeen, UploadStarted, then
BytesAvailable/PartUploaded pairs (about 47 parts, +-50 %), StreamIdle,
StreamCompleted, MetadataWritten; 2 % fail instead, 1 % are deleted after
completion; recordings still running at the end of the log stay live. The
events are appended with the service's own wire encoding (``encode``) in
pipelines of 10k XADDs.

Figures (median of ``--repeat`` runs, the samples are in the JSON):

* ``decode``: ``cefmp4.domain.events.decode`` of every entry's fields, in memory;
* ``fold``: ``projections.streams.replay`` of the decoded entries, in memory;
* ``xread``: reading the whole log in pages of ``--batch`` with redis-py
  (transport and RESP parsing, no decoding; one run). Without ``hiredis``
  installed redis-py parses replies in pure Python, and this is most of
  ``catch_up``: compare the report's ``hiredis`` flag before comparing runs;
* ``catch_up``: a fresh ``LiveProjection`` (no snapshots) to caught up: what
  a start-up from the log costs; the issue's target is >= 200k events/s;
* ``restart``: for each ``--tails`` T, a snapshot of the projection as of
  entry N-T is stored as ``LiveProjection`` stores one, then a fresh
  ``LiveProjection`` with snapshots is timed to caught up (GET + decode of the
  snapshot, XINFO, read + fold of the T-entry tail); the target is <= 1 s
  with T = ``SNAPSHOT_EVERY_EVENTS`` (10k: about the most a restart finds
  behind the newest snapshot while replicas keep writing them). Writing that
  snapshot is reported too: the encode blocks the ``catch_up`` that cuts it
  (and the event loop), the Lua SET runs in the background.

Every rebuilt projection is compared with the in-memory replay (``ok``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import redis
import redis.asyncio as aioredis

from cefmp4.adapters.eventlog import EventLog
from cefmp4.dev.localservers import RedisServer
from cefmp4.domain.events import (
    BytesAvailable,
    Event,
    FileDeleted,
    FileSeen,
    MetadataWritten,
    PartUploaded,
    StreamCompleted,
    StreamFailed,
    StreamIdle,
    UploadStarted,
    decode,
    encode,
)
from projections.live import LiveProjection
from projections.snapshots import SnapshotStore, encode_snapshot
from projections.streams import Projection, replay
from tests.bench.common import BenchError, bench_main

T0 = datetime(2024, 1, 1, tzinfo=UTC)
EVENTS_KEY = "bench:events"
PIPELINE = 10_000
DECODE_SAMPLE = 200_000  # events decoded in memory per run
TARGET_EVENTS_PER_S = 200_000
TARGET_RESTART_S = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_replay", description=__doc__.splitlines()[0]
    )
    p.add_argument("--events", type=int, default=1_000_000, help="events in the log (1M)")
    p.add_argument("--streams", type=int, default=10_000, help="recordings (10k)")
    p.add_argument("--concurrent", type=int, default=50, help="recordings in flight (50)")
    p.add_argument("--tails", default="10000,100000", help="tails after the snapshot (10k,100k)")
    p.add_argument("--batch", type=int, default=10_000, help="LiveProjection XREAD page (10k)")
    p.add_argument("--repeat", type=int, default=2, help="runs per figure, median (2)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the synthetic log (1)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (Redis data)")
    args = p.parse_args(argv)
    try:
        args.tail_list = [int(t) for t in args.tails.split(",") if t.strip()]
    except ValueError:
        p.error("--tails must be comma-separated integers")
    if args.events < 1 or args.streams < 1 or args.concurrent < 1 or args.repeat < 1:
        p.error("--events, --streams, --concurrent and --repeat must be at least 1")
    if any(not 0 <= t < args.events for t in args.tail_list):
        p.error("every tail must be >= 0 and < --events")
    return args


# -- the synthetic log ----------------------------------------------------------


def recording(rng: random.Random, n: int, per_stream: int) -> Iterator[Event]:
    """The events the service writes for recording ``n``, in order (``at`` is set later)."""
    sid = f"{n:08d}-{rng.getrandbits(64):016x}"
    path = f"/srv/watch/cam{n % 97:02d}/rec-{n:06d}.mp4"
    at = T0
    parts = max(1, round((per_stream - 5) / 2 * rng.uniform(0.5, 1.5)))
    chunk = 10 * 1024 * 1024
    yield FileSeen(stream_id=sid, at=at, path=path, rel_path=path.removeprefix("/srv/watch/"),
                   bucket="video-streams", key=f"streams/{path[11:]}", size=0,
                   mtime_ns=1, inode=n + 1000)  # fmt: skip
    upload = f"upload-{rng.getrandbits(128):032x}"
    yield UploadStarted(stream_id=sid, at=at, upload_id=upload)
    for k in range(1, parts + 1):
        yield BytesAvailable(stream_id=sid, at=at, size=k * chunk + 4096, mtime_ns=k)
        yield PartUploaded(stream_id=sid, at=at, upload_id=upload, part_number=k,
                           offset=(k - 1) * chunk, size=chunk, etag=f"{rng.getrandbits(128):032x}",
                           md5=f"{rng.getrandbits(128):032x}")  # fmt: skip
    size = parts * chunk + 4096
    yield StreamIdle(stream_id=sid, at=at, size=size, mtime_ns=parts, reason="settled",
                     mp4="complete")  # fmt: skip
    fate = rng.random()
    if fate < 0.02:
        yield StreamFailed(stream_id=sid, at=at, reason="s3_rejected", detail="403 Forbidden")
        return
    yield StreamCompleted(stream_id=sid, at=at, bucket="video-streams", key=f"streams/{path[11:]}",
                          size=size, etag=f"{rng.getrandbits(128):032x}-{parts + 1}",
                          sha256=f"{rng.getrandbits(256):064x}", mtime_ns=parts,
                          parts=parts + 1, mp4="complete")  # fmt: skip
    yield MetadataWritten(stream_id=sid, at=at, key=f"streams/{path[11:]}.metadata.json",
                          duration_seconds=rng.uniform(10, 3600))  # fmt: skip
    if fate > 0.99:
        yield FileDeleted(stream_id=sid, at=at, path=path)


def synthetic_log(events: int, streams: int, concurrent: int, seed: int) -> list[Event]:
    """``events`` events, recordings interleaved at random, ``at`` 1 ms apart."""
    rng = random.Random(seed)
    per_stream = max(7, events // streams)
    started = 0
    active: list[Iterator[Event]] = []
    out: list[Event] = []
    while len(out) < events:
        while len(active) < concurrent:
            active.append(recording(rng, started, per_stream))
            started += 1
        i = rng.randrange(len(active))
        event = next(active[i], None)
        if event is None:
            active[i] = active[-1]
            active.pop()
            continue
        out.append(msgspec.structs.replace(event, at=T0 + timedelta(milliseconds=len(out))))
    return out


def append_all(client: redis.Redis, events: list[Event]) -> list[str]:
    ids: list[str] = []
    for start in range(0, len(events), PIPELINE):
        pipe = client.pipeline(transaction=False)
        for event in events[start : start + PIPELINE]:
            pipe.xadd(EVENTS_KEY, encode(event, "bench"))  # type: ignore[arg-type]
        ids += [i.decode() for i in pipe.execute()]
    return ids


# -- measuring -------------------------------------------------------------------


def _runs(repeat: int, measure: Callable[[], float]) -> list[float]:
    samples = []
    for _ in range(repeat):
        gc.collect()
        samples.append(measure())
    return samples


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _figure(samples: list[float], events: int | None = None) -> dict[str, Any]:
    median = statistics.median(samples)
    out: dict[str, Any] = {"seconds": round(median, 4), "samples": [round(s, 4) for s in samples]}
    if events is not None:
        out["events"] = events
        out["events_per_s"] = round(events / median) if median else None
    return out


async def _catch_up(url: str, batch: int, store_key: str | None) -> tuple[float, Projection]:
    client = aioredis.from_url(url)
    try:
        events = EventLog(client, EVENTS_KEY, "bench")
        store = None if store_key is None else SnapshotStore(client, store_key, EVENTS_KEY)
        live = LiveProjection(events, batch, snapshots=store, snapshot_every=0)
        start = time.perf_counter()
        projection = await live.catch_up()
        return time.perf_counter() - start, projection
    finally:
        await client.aclose()


async def _save(url: str, store_key: str, projection: Projection) -> dict[str, Any]:
    """Write a snapshot as LiveProjection does (encode, then the Lua SET) and read it back."""
    client = aioredis.from_url(url)
    try:
        store = SnapshotStore(client, store_key, EVENTS_KEY)
        encode_s, value = _timed(lambda: encode_snapshot(projection))
        start = time.perf_counter()
        stored = await store.save_encoded(projection.last_id, value)
        set_s = time.perf_counter() - start
        start = time.perf_counter()
        loaded = await store.load()
        load_s = time.perf_counter() - start
        if not stored or loaded != projection:
            raise BenchError("the snapshot read back differs from the one written")
        return {
            "snapshot_bytes": len(value),
            "snapshot_encode_seconds": round(encode_s, 4),
            "snapshot_set_seconds": round(set_s, 4),
            "snapshot_load_seconds": round(load_s, 4),
        }
    finally:
        await client.aclose()


def _decode_samples(events: list[Event], repeat: int) -> list[float]:
    """``decode`` of entry fields as redis-py returns them (bytes keys)."""
    fields = [{k.encode(): v for k, v in encode(e, "bench").items()} for e in events]

    def once() -> float:
        start = time.perf_counter()
        for f in fields:
            decode(f)
        return time.perf_counter() - start

    return _runs(repeat, once)


async def _xread_all(url: str, batch: int) -> float:
    """The whole log in pages, as ``EventLog.read_after`` reads it, without decoding."""
    client = aioredis.from_url(url)
    try:
        start = time.perf_counter()
        last: Any = "0-0"
        while True:
            raw: Any = await client.xread({EVENTS_KEY: last}, count=batch)
            if not raw or len(raw[0][1]) < batch:
                return time.perf_counter() - start
            last = raw[0][1][-1][0]
    finally:
        await client.aclose()


def run(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="cefmp4-bench-replay-")).resolve()
        if not args.keep:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        load_before = os.getloadavg()[0]
        rds = stack.enter_context(RedisServer(tmp / "redis"))
        client = redis.Redis.from_url(rds.url)
        stack.callback(client.close)
        client.config_set("appendonly", "no")

        generate_s, log = _timed(
            lambda: synthetic_log(args.events, args.streams, args.concurrent, args.seed)
        )
        append_s, ids = _timed(lambda: append_all(client, log))
        n = len(log)
        entries = list(zip(ids, log, strict=True))
        decode_samples = _decode_samples(log[:DECODE_SAMPLE], args.repeat)
        fold_samples: list[float] = []
        full = Projection()
        for _ in range(args.repeat):
            gc.collect()
            seconds, full = _timed(lambda: replay(entries))
            fold_samples.append(seconds)
        # A diagnostic (what catch_up spends in redis-py), so measured once.
        xread_samples = _runs(1, lambda: asyncio.run(_xread_all(rds.url, args.batch)))

        ok = True
        catch_up_samples: list[float] = []
        for _ in range(args.repeat):
            gc.collect()
            seconds, rebuilt = asyncio.run(_catch_up(rds.url, args.batch, None))
            catch_up_samples.append(seconds)
            ok = ok and rebuilt == full
            del rebuilt

        restarts: list[dict[str, Any]] = []
        for tail in args.tail_list:
            key = f"bench:snapshot:{tail}"
            at = replay(entries[: n - tail])
            written = asyncio.run(_save(rds.url, key, at))
            samples: list[float] = []
            for _ in range(args.repeat):
                gc.collect()
                seconds, rebuilt = asyncio.run(_catch_up(rds.url, args.batch, key))
                samples.append(seconds)
                ok = ok and rebuilt == full
                del rebuilt
            restarts.append({
                "tail_events": tail,
                "snapshot_events": at.events,
                "snapshot_streams": len(at.streams),
                "snapshot_parts": sum(len(s.parts) for s in at.streams.values()),
                **written,
                "restart": _figure(samples, tail),
            })  # fmt: skip
            del at

        catch_up = _figure(catch_up_samples, n)
        worst_tail = [r for r in restarts if r["tail_events"] == 10_000]
        return {
            "ok": ok,
            "load_average_1m_before": round(load_before, 2),
            "settings": {
                "events": n,
                "streams": args.streams,
                "concurrent": args.concurrent,
                "batch": args.batch,
                "repeat": args.repeat,
                "seed": args.seed,
                "redis": client.info("server")["redis_version"],
                "hiredis": _has_hiredis(),
            },
            "log": {
                "generate_seconds": round(generate_s, 2),
                "append_seconds": round(append_s, 2),
                "redis_used_memory_mib": round(client.info("memory")["used_memory"] / 2**20),
                "streams": len(full.streams),
                "live_streams": len(full.live()),
                "parts": sum(len(s.parts) for s in full.streams.values()),
                "mix": _mix(log),
            },
            "decode": _figure(decode_samples, min(n, DECODE_SAMPLE)),
            "fold": _figure(fold_samples, n),
            "xread": _figure(xread_samples, n),
            "catch_up": catch_up,
            "restarts": restarts,
            "targets": {
                "replay_events_per_s": TARGET_EVENTS_PER_S,
                "replay_met": (catch_up["events_per_s"] or 0) >= TARGET_EVENTS_PER_S,
                "restart_seconds": TARGET_RESTART_S,
                "restart_met": (
                    None
                    if not worst_tail
                    else worst_tail[0]["restart"]["seconds"] <= TARGET_RESTART_S
                ),
            },
            "temp_dir": str(tmp) if args.keep else None,
        }
    raise AssertionError("unreachable")


def _mix(log: list[Event]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in log:
        name = type(event).__name__
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _has_hiredis() -> bool:
    return importlib.util.find_spec("hiredis") is not None


def report(r: dict[str, Any]) -> str:
    s, lg, t = r["settings"], r["log"], r["targets"]

    def rate(f: dict[str, Any]) -> str:
        return f"{f['events_per_s']:>10,} events/s  ({f['seconds']:.3f} s for {f['events']:,})"

    lines = [
        f"Replay: {s['events']:,} events over {lg['streams']:,} recordings "
        f"({lg['live_streams']} live, {lg['parts']:,} parts), Redis {s['redis']}, "
        f"hiredis {'yes' if s['hiredis'] else 'no'}; load average before "
        f"{r['load_average_1m_before']}; median of {s['repeat']}",
        f"  log: generated in {lg['generate_seconds']} s, appended in {lg['append_seconds']} s, "
        f"{lg['redis_used_memory_mib']} MiB in Redis; mix {lg['mix']}",
        f"  (a) decode (msgspec, in memory)    {rate(r['decode'])}",
        f"  (a) fold (replay, in memory)       {rate(r['fold'])}",
        f"      XREAD pages of {s['batch']} (redis-py) {rate(r['xread'])}",
        f"  (b) catch_up from Redis, no snapshot {rate(r['catch_up'])}  "
        f"target >= {t['replay_events_per_s']:,}: {'met' if t['replay_met'] else 'MISSED'}",
    ]
    for x in r["restarts"]:
        lines.append(
            f"  (c) restart with snapshot + {x['tail_events']:,}-event tail: "
            f"{x['restart']['seconds']:.3f} s  (snapshot {x['snapshot_bytes'] / 2**20:.1f} MiB, "
            f"{x['snapshot_streams']:,} streams, {x['snapshot_parts']:,} parts; encode "
            f"{x['snapshot_encode_seconds']:.3f} s + SET {x['snapshot_set_seconds']:.3f} s, "
            f"GET+decode {x['snapshot_load_seconds']:.3f} s)"
        )
    if t["restart_met"] is not None:
        lines.append(
            f"      target <= {t['restart_seconds']} s with a 10k tail: "
            f"{'met' if t['restart_met'] else 'MISSED'}"
        )
    lines.append(f"  rebuilt projections equal the in-memory replay: {'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench_main("replay", parse_args, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
