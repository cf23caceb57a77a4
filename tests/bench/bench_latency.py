"""Latency: recorder's final close -> the ``<key>.metadata.json`` sidecar visible in S3,
for complete and for fragmented MP4s.

Setup (under a temp dir, removed afterwards unless ``--keep``): a private
``redis-server`` and, by default, SeaweedFS ``weed mini`` (``--s3 juicefs`` for
the JuiceFS gateway). SeaweedFS is the default because it keeps real S3 rules
(5 MiB minimum part size, AWS-like errors), so the measured path is the one a
production store takes; it is slower than JuiceFS, which makes the figure
conservative.

Two real H.264/AAC MP4s of about ``--size-mib`` are encoded once with ffmpeg:

* **complete**: the regular layout (``ftyp free mdat moov``), written by
  ``record_mdat_patch`` (OBS/NVR style: mdat size 0 while writing, patched in
  place at the end);
* **fragmented**: ``-movflags frag_keyframe+empty_moov`` (``ftyp moov`` with
  ``mvex``, then ``moof``/``mdat`` pairs, and ffmpeg's ``mfra`` index as the
  last box), written by ``record_append`` (a fragmented recorder only appends).

The service runs as a subprocess (``python -m cefmp4 run``, so recorder and
service do not share an event loop or a GIL) with the service's own defaults
for SETTLE_SECONDS (1) and STREAM_TIMEOUT_SECONDS (30) unless told otherwise,
plus any ``--service-env``. Each run writes a recording into the watch dir at
``--rate-mib`` MiB/s and measures from the moment the recorder closes the
file until HEAD on the sidecar key succeeds, polling every ``--poll-ms`` ms.
The breakdown comes from the service's own event timestamps; the sidecar is
read back and checked (size, SHA-256; mp4_complete for the complete kind).
Targets (issue 8): p50 <= 0.5 s complete, <= 1.0 s fragmented.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import redis
from botocore.exceptions import ClientError

from cefmp4.dev.localservers import (
    RedisServer,
    S3Endpoint,
    make_s3_client,
)
from cefmp4.domain.events import (
    Event,
    FileSeen,
    MetadataWritten,
    PartUploaded,
    StreamCompleted,
    StreamFailed,
    StreamIdle,
)
from tests.bench.common import (
    BenchError,
    MiB,
    bench_main,
    env_pair,
    known_env_names,
    of_stream,
    percentile,
    read_events,
    running,
    s3_server,
    sha256_matches,
    ts,
    wait_for,
)
from tests.harness import ServiceProcess, service_config
from tests.mp4gen import make_mp4, record_append, record_mdat_patch

BUCKET = "bench"
_SOURCE_SECONDS = 4.0
KINDS = ("complete", "fragmented")
TARGET_P50_S = {"complete": 0.5, "fragmented": 1.0}


def _kinds(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or set(names) - set(KINDS):
        raise ValueError(f"choose from {','.join(KINDS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_latency", description=__doc__.splitlines()[0]
    )
    p.add_argument("--runs", type=int, default=5, help="recordings to measure (5)")
    p.add_argument("--size-mib", type=float, default=50.0, help="recording size, MiB (50)")
    p.add_argument("--rate-mib", type=float, default=40.0, help="recorder write rate MiB/s (40)")
    p.add_argument("--write-kib", type=int, default=1024, help="recorder write size, KiB (1024)")
    p.add_argument(
        "--kinds", type=_kinds, default=list(KINDS), metavar="LIST",
        help=f"recordings to measure, comma-separated (default {','.join(KINDS)})",
    )  # fmt: skip
    p.add_argument("--settle", type=float, default=1.0, help="SETTLE_SECONDS (1)")
    p.add_argument("--stream-timeout", type=float, default=30.0, help="STREAM_TIMEOUT_SECONDS (30)")
    p.add_argument(
        "--service-env", type=env_pair, action="append", default=[], metavar="KEY=VAL",
        help="extra environment for the service (repeatable)",
    )  # fmt: skip
    p.add_argument("--chunk-mib", type=int, default=10, help="CHUNK_SIZE_BYTES in MiB (10)")
    p.add_argument("--part-concurrency", type=int, default=4, help="PART_CONCURRENCY (4)")
    p.add_argument("--s3", choices=("seaweedfs", "juicefs"), default="seaweedfs")
    p.add_argument("--poll-ms", type=float, default=20.0, help="HEAD poll interval (20 ms)")
    p.add_argument("--run-timeout", type=float, default=60.0, help="give up on a run after (s)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.chunk_mib < 5:
        p.error("--chunk-mib must be at least 5 (S3's minimum part size)")
    return args


def make_source(dst: Path, size_mib: float, *, fragmented: bool = False) -> Path:
    """A real MP4 of roughly ``size_mib`` (x264's rate control lands low: aim once more)."""
    make_mp4(dst, seconds=_SOURCE_SECONDS, size_hint_mb=size_mib, fragmented=fragmented)
    got = dst.stat().st_size / MiB
    if got < 0.95 * size_mib:
        make_mp4(
            dst,
            seconds=_SOURCE_SECONDS,
            size_hint_mb=size_mib * size_mib / got,
            fragmented=fragmented,
        )
    return dst


def _head_ok(s3: Any, key: str) -> bool:
    try:
        s3.head_object(Bucket=BUCKET, Key=key)
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404:
            return False
        raise
    return True


class _Context(NamedTuple):
    kind: str
    source: Path
    source_sha256: str
    watch: Path
    client: redis.Redis
    events_key: str
    s3: Any


def _one_run(args: argparse.Namespace, index: int, ctx: _Context) -> dict[str, Any]:
    source, watch, client, events_key, s3 = (
        ctx.source,
        ctx.watch,
        ctx.client,
        ctx.events_key,
        ctx.s3,
    )
    name = f"{ctx.kind}-{index:02d}.mp4"
    dst = watch / name
    write = args.write_kib * 1024
    delay = write / (args.rate_mib * MiB)
    recorder = record_mdat_patch if ctx.kind == "complete" else record_append
    t_start = time.time()
    asyncio.run(recorder(source, dst, chunk=write, delay=delay))
    t_close = time.time()
    size = dst.stat().st_size

    def seen() -> FileSeen | None:
        return next(
            (
                e
                for e in read_events(client, events_key)
                if isinstance(e, FileSeen) and e.rel_path == name
            ),
            None,
        )

    first, _ = wait_for(seen, timeout=10, poll=0.02, what=f"FileSeen of {name}")
    sidecar_key = f"{first.key}.metadata.json"
    _, t_visible = wait_for(
        lambda: True if _head_ok(s3, sidecar_key) else None,
        timeout=args.run_timeout,
        poll=args.poll_ms / 1000,
        what=f"sidecar {sidecar_key}",
    )

    def finished() -> list[Event] | None:
        mine = of_stream(read_events(client, events_key), first.stream_id)
        done = any(isinstance(e, MetadataWritten | StreamFailed) for e in mine)
        return mine if done else None

    mine, _ = wait_for(finished, timeout=10, poll=0.02, what="MetadataWritten")
    failed = [e for e in mine if isinstance(e, StreamFailed)]
    if failed:
        raise BenchError(f"{name}: stream failed: {failed[0]!r}")
    idle = [e for e in mine if isinstance(e, StreamIdle)][-1]
    completed = next(e for e in mine if isinstance(e, StreamCompleted))
    meta = next(e for e in mine if isinstance(e, MetadataWritten))
    parts = [e for e in mine if isinstance(e, PartUploaded)]
    after_close = [e for e in parts if ts(e.at) >= t_close]
    before_close = {e.part_number for e in parts if ts(e.at) < t_close}
    doc = json.loads(s3.get_object(Bucket=BUCKET, Key=sidecar_key)["Body"].read())
    checks = {
        "size_ok": doc.get("total_size_bytes") == size,
        "sha256_ok": sha256_matches(doc.get("sha256"), ctx.source_sha256),
    }
    if ctx.kind == "complete":
        checks["mp4_complete"] = doc.get("mp4_complete") is True
    return {
        "file": name,
        "size_bytes": size,
        "write_mib_per_s": round(size / MiB / (t_close - t_start), 1),
        "close_to_sidecar_visible_s": round(t_visible - t_close, 3),
        "close_to_idle_event_s": round(ts(idle.at) - t_close, 3),
        "idle_to_completed_s": round(ts(completed.at) - ts(idle.at), 3),
        "completed_to_sidecar_visible_s": round(t_visible - ts(completed.at), 3),
        "metadata_event_after_visible_s": round(ts(meta.at) - t_visible, 3),
        "idle_reason": idle.reason,
        "parts": completed.parts,
        "parts_sent_after_close": len(after_close),
        # Sent before the close and again after it: bytes the recorder patched.
        "parts_resent_after_close": sorted(
            e.part_number for e in after_close if e.part_number in before_close
        ),
        "duration_seconds": doc.get("duration_seconds"),
        "mp4": completed.mp4,
        "idle_cause": getattr(idle, "cause", None),
        "sidecar_checksum": (doc.get("checksum") or {}).get("algorithm"),
        "sidecar_sha256": bool(doc.get("sha256")),
        "checks": checks,
        "ok": all(checks.values()),
    }


def _summary(kind: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [r["close_to_sidecar_visible_s"] for r in runs]

    def median(key: str) -> float:
        return round(percentile([float(r[key]) for r in runs], 50), 3)

    p50 = round(percentile(latencies, 50), 3)
    return {
        "p50_s": p50,
        "max_s": round(max(latencies), 3),
        "min_s": round(min(latencies), 3),
        "target_p50_s": TARGET_P50_S[kind],
        "target_met": p50 <= TARGET_P50_S[kind],
        "size_mib": round(runs[0]["size_bytes"] / MiB, 1),
        "median_breakdown_s": {
            "close_to_idle_event": median("close_to_idle_event_s"),
            "idle_to_completed": median("idle_to_completed_s"),
            "completed_to_sidecar_visible": median("completed_to_sidecar_visible_s"),
        },
        # The reason, and with the close fast path its cause ("settled/close").
        "idle_reasons": sorted(
            {"/".join(str(x) for x in (r["idle_reason"], r["idle_cause"]) if x) for r in runs}
        ),
        "runs": runs,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="cefmp4-bench-latency-")).resolve()
        if not args.keep:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        load_before = os.getloadavg()[0]
        rds = stack.enter_context(RedisServer(tmp / "redis"))
        server = s3_server(args.s3, tmp)
        stack.enter_context(server)
        endpoint: S3Endpoint = server.endpoint
        s3 = make_s3_client(endpoint)
        s3.create_bucket(Bucket=BUCKET)
        (tmp / "src").mkdir()
        sources = {
            kind: make_source(
                tmp / "src" / f"{kind}.mp4", args.size_mib, fragmented=kind == "fragmented"
            )
            for kind in args.kinds
        }
        watch = tmp / "watch"
        watch.mkdir()
        config = service_config(
            watch,
            rds.url,
            "bench",
            BUCKET,
            endpoint,
            chunk_size_bytes=args.chunk_mib * MiB,
            part_concurrency=args.part_concurrency,
            settle_seconds=args.settle,
            stream_timeout_seconds=args.stream_timeout,
            rescan_interval_seconds=10.0,
            claim_idle_seconds=60.0,
            s3_timeout_seconds=30.0,
            shutdown_grace_seconds=10.0,
            prom_port=0,
        )
        client = redis.Redis.from_url(rds.url)
        stack.callback(client.close)
        service = ServiceProcess(config, tmp / "service.log", workdir=tmp / "service-cwd")
        service.env.update(dict(args.service_env))
        kinds: dict[str, dict[str, Any]] = {}
        with running(service):
            for kind, source in sources.items():
                sha = hashlib.sha256(source.read_bytes()).hexdigest()
                ctx = _Context(kind, source, sha, watch, client, config.events_key, s3)
                runs: list[dict[str, Any]] = []
                for index in range(args.runs):
                    try:
                        runs.append(_one_run(args, index, ctx))
                    except BenchError as exc:
                        raise BenchError(f"{exc}\nservice log tail:\n{service.tail()}") from None
                    time.sleep(0.5)  # let the finished stream's last events settle
                kinds[kind] = _summary(kind, runs)
        known = known_env_names()
        return {
            "ok": all(r["ok"] for k in kinds.values() for r in k["runs"])
            and service.returncode == 0,
            "server": args.s3,
            "settings": {
                "runs": args.runs,
                "kinds": args.kinds,
                "rate_mib_per_s": args.rate_mib,
                "write_kib": args.write_kib,
                "SETTLE_SECONDS": args.settle,
                "STREAM_TIMEOUT_SECONDS": args.stream_timeout,
                "CHUNK_SIZE_BYTES": args.chunk_mib * MiB,
                "FIRST_PART_BYTES": config.first_part_bytes,
                "PART_CONCURRENCY": args.part_concurrency,
                "service_env": dict(args.service_env),
                "service_env_unknown": sorted(k for k, _ in args.service_env if k not in known),
                "poll_ms": args.poll_ms,
            },
            "load_average_1m_before": round(load_before, 2),
            "kinds": kinds,
            "service_exit_code": service.returncode,
            "temp_dir": str(tmp) if args.keep else None,
        }
    raise AssertionError("unreachable")


_RECORDER = {"complete": "record_mdat_patch", "fragmented": "record_append"}


def report(r: dict[str, Any]) -> str:
    s = r["settings"]
    env = f" {s['service_env']}" if s["service_env"] else ""
    if s["service_env_unknown"]:
        env += f" (unknown to the service: {s['service_env_unknown']})"
    lines = [
        f"Latency: final close -> sidecar visible ({s['runs']} runs per kind, written at "
        f"{s['rate_mib_per_s']} MiB/s, S3 = {r['server']}); "
        f"load average before {r['load_average_1m_before']}",
        f"  settings: SETTLE_SECONDS={s['SETTLE_SECONDS']} "
        f"STREAM_TIMEOUT_SECONDS={s['STREAM_TIMEOUT_SECONDS']} "
        f"CHUNK_SIZE_BYTES={s['CHUNK_SIZE_BYTES']} FIRST_PART_BYTES={s.get('FIRST_PART_BYTES')} "
        f"PART_CONCURRENCY={s['PART_CONCURRENCY']}"
        f"{env}, HEAD poll every {s['poll_ms']:g} ms",
        f"  {'kind':<11} {'MiB':>5} {'p50 s':>7} {'max s':>7} {'min s':>7}  "
        "target  median: close->idle / ->completed / ->sidecar   idle reason",
    ]
    for kind, k in r["kinds"].items():
        b = k["median_breakdown_s"]
        met = "met" if k["target_met"] else "MISSED"
        lines.append(
            f"  {kind:<11} {k['size_mib']:>5} {k['p50_s']:>7.3f} {k['max_s']:>7.3f} "
            f"{k['min_s']:>7.3f}  <={k['target_p50_s']:<4g}{met:<7}"
            f"{b['close_to_idle_event']:.3f} / {b['idle_to_completed']:.3f} / "
            f"{b['completed_to_sidecar_visible']:.3f}   {','.join(k['idle_reasons'])}"
        )
    for kind, k in r["kinds"].items():
        for run_ in k["runs"]:
            lines.append(
                f"    {run_['file']} ({_RECORDER[kind]}, mp4 {run_['mp4']}): "
                f"{run_['close_to_sidecar_visible_s']:.3f} s (idle "
                f"{run_['close_to_idle_event_s']:.3f} + finalize {run_['idle_to_completed_s']:.3f}"
                f" + sidecar {run_['completed_to_sidecar_visible_s']:.3f}; written at "
                f"{run_['write_mib_per_s']} MiB/s; {run_['parts_sent_after_close']} parts sent "
                f"after close, resent {run_['parts_resent_after_close']}; checks {run_['checks']})"
            )
    return "\n".join(lines)


def headline(r: dict[str, Any]) -> dict[str, Any]:
    return {
        kind: {"p50_s": k["p50_s"], "max_s": k["max_s"], "met": k["target_met"]}
        for kind, k in r["kinds"].items()
    }


def main(argv: list[str] | None = None) -> int:
    return bench_main("latency", parse_args, run, report, argv, headline)


if __name__ == "__main__":
    sys.exit(main())
