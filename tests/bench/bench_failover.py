"""Failover: kill -9 of the replica working on a stream -> the stream's next
part going up on another replica.

Two replicas (``python -m cefmp4 run`` with REPLICA_ID r0/r1) share a
throwaway Redis and SeaweedFS. A recording grows at ``--rate-mib`` MiB/s; once
it has two parts in S3, the replica holding the stream's lease is killed with
SIGKILL, and the bench waits for the next ``PartUploaded`` of that stream
written by the other replica. The figure is that gap, measured from the kill
to the event's Redis entry time. It is bounded by ``LEASE_TTL_SECONDS``: the
survivor must wait for the dead holder's lease to expire (and, if the victim
held the watcher lease too, for the watcher to move).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import redis

from cefmp4.dev.localservers import RedisServer, SeaweedS3, make_s3_client
from cefmp4.domain.events import PartUploaded
from tests.bench.common import (
    BenchError,
    MiB,
    bench_main,
    command_line,
    now_iso,
    percentile,
    wait_for,
)
from tests.harness import ServiceProcess, service_config

BUCKET = "bench-failover"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_failover", description=__doc__.splitlines()[0]
    )
    p.add_argument("--runs", type=int, default=2, help="kills to measure (2)")
    p.add_argument("--lease-ttl", type=float, default=10.0, help="LEASE_TTL_SECONDS (10)")
    p.add_argument("--rate-mib", type=float, default=8.0, help="recorder rate MiB/s (8)")
    return p.parse_args(argv)


def _record(path: Path, rate: float, stop: threading.Event) -> None:
    block = os.urandom(MiB)
    with path.open("wb") as f:
        while not stop.is_set():
            f.write(block)
            f.flush()
            time.sleep(1 / rate)


def _parts(client: redis.Redis, key: str) -> list[tuple[float, str, int, str]]:
    """(entry time, replica, part number, stream id) of every PartUploaded."""
    out = []
    entries: Any = client.xrange(key)
    for entry_id, fields in entries:
        if fields[b"type"] != b"PartUploaded":
            continue
        event = msgspec.json.decode(fields[b"data"], type=PartUploaded)
        ms = int(entry_id.decode().split("-")[0])
        out.append((ms / 1000, fields[b"replica"].decode(), event.part_number, event.stream_id))
    return out


def _second_part(client: redis.Redis, key: str) -> tuple[float, str, int, str] | None:
    return next((p for p in _parts(client, key) if p[2] == 2), None)


def _survivor_part(
    client: redis.Redis, key: str, stream_id: str, owner: str, killed_at: float
) -> float | None:
    """Entry time of the first part of ``stream_id`` another replica sent after the kill."""
    for at, replica, _, sid in _parts(client, key):
        if sid == stream_id and replica != owner and at > killed_at:
            return at
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    gaps: list[float] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="cefmp4-bench-failover-")).resolve()
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        rds = stack.enter_context(RedisServer(tmp / "redis"))
        s3 = stack.enter_context(SeaweedS3(tmp / "s3"))
        make_s3_client(s3.endpoint).create_bucket(Bucket=BUCKET)
        client = redis.Redis.from_url(rds.url)
        for run_no in range(args.runs):
            watch = tmp / f"watch{run_no}"
            watch.mkdir()
            prefix = f"failover{run_no}"
            config = service_config(
                watch, rds.url, prefix, BUCKET, s3.endpoint,
                lease_ttl_seconds=args.lease_ttl, claim_idle_seconds=60.0,
                stream_timeout_seconds=30.0,
            )  # fmt: skip
            replicas = [
                ServiceProcess(config, tmp / f"r{i}-{run_no}.log", f"r{i}", tmp / f"cwd{i}")
                for i in range(2)
            ]
            for r in replicas:
                stack.enter_context(r)
            stop = threading.Event()
            writer = threading.Thread(target=_record, args=(watch / "cam.mp4", args.rate_mib, stop))
            writer.start()
            try:
                events_key = f"{prefix}:events"
                (_, _, _, stream_id), _ = wait_for(
                    partial(_second_part, client, events_key), timeout=60, poll=0.05,
                    what="two parts",
                )  # fmt: skip
                holder: Any = client.get(f"{prefix}:lease:stream:{stream_id}")
                owner = holder.decode().rsplit(":", 1)[0] if holder else "r0"
                victim = next(r for r in replicas if r.replica_id == owner)
                killed_at = time.time()
                victim.kill()

                at, _ = wait_for(partial(_survivor_part, client, events_key, stream_id, owner,
                                         killed_at), timeout=args.lease_ttl * 3 + 30, poll=0.02,
                                 what="a part from the survivor")  # fmt: skip
                gaps.append(at - killed_at)
            finally:
                stop.set()
                writer.join()
                for r in replicas:
                    r.stop(grace=10)
    if not gaps:
        raise BenchError("no failover measured")
    return {
        "ok": True,
        "command": command_line(),
        "finished_at": now_iso(),
        "load_average_1m_before": os.getloadavg()[0],
        "settings": {
            "LEASE_TTL_SECONDS": args.lease_ttl,
            "runs": args.runs,
            "rate_mib_per_s": args.rate_mib,
        },
        "gaps_s": [round(g, 3) for g in gaps],
        "p50_s": round(percentile(gaps, 50), 3),
        "max_s": round(max(gaps), 3),
    }


def report(r: dict[str, Any]) -> str:
    s = r["settings"]
    return (
        f"Failover: kill -9 of the stream's holder -> next part from the survivor "
        f"({s['runs']} runs, LEASE_TTL_SECONDS={s['LEASE_TTL_SECONDS']:g}, 2 replicas)\n"
        f"  p50 {r['p50_s']:.3f} s   max {r['max_s']:.3f} s   all {r['gaps_s']}"
    )


def main(argv: list[str] | None = None) -> int:
    return bench_main("failover", parse_args, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
