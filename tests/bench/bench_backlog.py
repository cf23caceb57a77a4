"""Backlog: ``--recordings`` small finished MP4s dropped into WATCH_DIR at once, drained.

The per-recording cost, as opposed to the per-byte cost that the throughput
bench measures. Setup (under a temp dir, removed afterwards unless
``--keep``): a private ``redis-server`` and SeaweedFS ``weed mini`` (or the
JuiceFS gateway with ``--s3 juicefs``). One real H.264/AAC MP4 of about 30 KB
(``tests.mp4gen.make_mp4``, one second at 320x240) is encoded once and copied
``--recordings`` times into a staging dir on the same file system; once the
service (``python -m cefmp4 run``, a subprocess) is up, every copy is renamed
into the watch dir in one go.

The figure is the service's own: recordings per second between the first
``FileSeen`` and the last ``MetadataWritten`` (each recording ends as an object
plus its sidecar). CPU seconds are those of the service process (all threads)
and of its reaped children (ffprobe), read from /proc over the same span. With
``--profile`` the service runs under cProfile (its event-loop thread: worker
threads are not profiled) and the report lists the hottest functions; the
profiler slows the service, so the rate of a profiled run is not the figure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from cefmp4.dev.localservers import (
    RedisServer,
    S3Endpoint,
    make_s3_client,
)
from cefmp4.domain.events import FileSeen, MetadataWritten, StreamFailed
from tests.bench.common import (
    PYTHON,
    BenchError,
    bench_main,
    children_cpu_seconds,
    cpu_seconds,
    main_thread_cpu_seconds,
    read_events,
    s3_server,
    ts,
)
from tests.harness import ServiceProcess, service_config
from tests.mp4gen import make_mp4

BUCKET = "bench"
TARGET_PER_S = 60.0
_DONE_TYPES = (b"MetadataWritten", b"StreamFailed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_backlog", description=__doc__.splitlines()[0]
    )
    p.add_argument("--recordings", type=int, default=3000, help="recordings dropped (3000)")
    p.add_argument("--settle", type=float, default=0.5, help="SETTLE_SECONDS (0.5)")
    p.add_argument(
        "--max-concurrent-streams", type=int, default=4, help="MAX_CONCURRENT_STREAMS (4)"
    )
    p.add_argument(
        "--metadata-probe",
        choices=("auto", "boxes", "ffprobe"),
        default=None,
        help="METADATA_PROBE (the service's default)",
    )
    p.add_argument("--s3", choices=("seaweedfs", "juicefs"), default="seaweedfs")
    p.add_argument("--profile", action="store_true", help="run the service under cProfile")
    p.add_argument("--top", type=int, default=25, help="functions listed with --profile (25)")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after (s)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, profile)")
    args = p.parse_args(argv)
    if args.recordings < 1:
        p.error("--recordings must be at least 1")
    return args


class _Counter:
    """Counts finished recordings by reading the log incrementally (type field
    only), so polling costs the bench little CPU while the service works."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self._client = client
        self._key = key
        self._last = "0-0"
        self.done = 0
        self.failed = 0

    def poll(self) -> int:
        while True:
            raw: Any = self._client.xread({self._key: self._last}, count=10_000)
            if not raw:
                return self.done
            entries = raw[0][1]
            for _entry_id, fields in entries:
                kind = fields.get(b"type")
                if kind in _DONE_TYPES:
                    self.done += 1
                    self.failed += kind == b"StreamFailed"
            self._last = entries[-1][0].decode()
            if len(entries) < 10_000:
                return self.done


def _profile_summary(path: Path, top: int) -> dict[str, Any]:
    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in raw.values())

    def name(func: tuple[str, int, str]) -> str:
        file, line, fn = func
        short = "/".join(Path(file).parts[-2:]) if file != "~" else ""
        return f"{short}:{line}({fn})" if short else fn

    by_tottime = sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]
    by_cumtime = sorted(raw.items(), key=lambda kv: -kv[1][3])[:top]
    by_area: dict[str, float] = {}
    for (file, _line, _fn), (_cc, _nc, tt, _ct, _callers) in raw.items():
        parts = Path(file).parts
        area = next(
            (f"{parts[i]}/{parts[i + 1]}" for i, p in enumerate(parts[:-1])
             if p in ("cefmp4", "consumers", "projections", "site-packages", "python3.12")),
            file,
        )  # fmt: skip
        by_area[area] = by_area.get(area, 0.0) + tt
    return {
        "profiled_seconds": round(total, 2),
        "top_by_own_time": [
            {"function": name(f), "calls": v[1], "own_s": round(v[2], 3), "cum_s": round(v[3], 3)}
            for f, v in by_tottime
        ],
        "top_by_cumulative_time": [
            {"function": name(f), "calls": v[1], "own_s": round(v[2], 3), "cum_s": round(v[3], 3)}
            for f, v in by_cumtime
        ],
        "own_time_by_area_s": {
            k: round(v, 2) for k, v in sorted(by_area.items(), key=lambda kv: -kv[1])[:top]
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="cefmp4-bench-backlog-")).resolve()
        if not args.keep:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        load_before = os.getloadavg()[0]
        rds = stack.enter_context(RedisServer(tmp / "redis"))
        server = s3_server(args.s3, tmp)
        stack.enter_context(server)
        endpoint: S3Endpoint = server.endpoint
        make_s3_client(endpoint).create_bucket(Bucket=BUCKET)
        (tmp / "src").mkdir()
        source = make_mp4(tmp / "src" / "source.mp4", seconds=1.0)
        stage, watch = tmp / "stage", tmp / "watch"
        stage.mkdir()
        watch.mkdir()
        names = [f"rec-{i:05d}.mp4" for i in range(args.recordings)]
        for name in names:
            shutil.copyfile(source, stage / name)
        overrides: dict[str, Any] = {}
        if args.metadata_probe is not None:
            overrides["metadata_probe"] = args.metadata_probe
        config = service_config(
            watch,
            rds.url,
            "bench",
            BUCKET,
            endpoint,
            settle_seconds=args.settle,
            stream_timeout_seconds=30.0,
            rescan_interval_seconds=60.0,
            claim_idle_seconds=60.0,
            s3_timeout_seconds=30.0,
            shutdown_grace_seconds=30.0,
            max_concurrent_streams=args.max_concurrent_streams,
            prom_port=0,
            **overrides,
        )
        client = redis.Redis.from_url(rds.url)
        stack.callback(client.close)
        service = ServiceProcess(config, tmp / "service.log", workdir=tmp / "service-cwd")
        profile_path = tmp / "service.prof"
        if args.profile:
            # cProfile writes its file when the service returns (SIGTERM is a clean exit).
            service._command = [  # the bench's one way to wrap the interpreter
                PYTHON, "-m", "cProfile", "-o", str(profile_path), "-m", "cefmp4", "run",
            ]  # fmt: skip
        counter = _Counter(client, config.events_key)
        with service:
            pid = service.pid
            cpu0, main0 = cpu_seconds(pid), main_thread_cpu_seconds(pid)
            kids0 = children_cpu_seconds(pid)
            t_drop = time.time()
            for name in names:
                os.rename(stage / name, watch / name)
            deadline = time.monotonic() + args.timeout
            while counter.poll() < args.recordings:
                if service.proc is not None and service.proc.poll() is not None:
                    raise BenchError(f"service exited:\n{service.tail()}")
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{counter.done} of {args.recordings} done after {args.timeout:g}s\n"
                        f"service log tail:\n{service.tail()}"
                    )
                time.sleep(0.25)
            t_done = time.time()
            cpu1, main1 = cpu_seconds(pid), main_thread_cpu_seconds(pid)
            kids1 = children_cpu_seconds(pid)
        events = read_events(client, config.events_key)
        seen = [ts(e.at) for e in events if isinstance(e, FileSeen)]
        written = [ts(e.at) for e in events if isinstance(e, MetadataWritten)]
        failed = [e for e in events if isinstance(e, StreamFailed)]
        if not seen or not written:
            raise BenchError("no FileSeen or MetadataWritten in the log")
        span = max(written) - min(seen)
        per_type: dict[str, int] = {}
        for e in events:
            per_type[type(e).__name__] = per_type.get(type(e).__name__, 0) + 1
        rate = len(written) / span if span > 0 else float("inf")
        n = args.recordings
        result: dict[str, Any] = {
            "ok": len(written) == n and not failed and service.returncode == 0,
            "server": args.s3,
            "settings": {
                "recordings": n,
                "recording_bytes": source.stat().st_size,
                "SETTLE_SECONDS": args.settle,
                "MAX_CONCURRENT_STREAMS": args.max_concurrent_streams,
                "METADATA_PROBE": args.metadata_probe or "(default)",
                "profiled": args.profile,
            },
            "load_average_1m_before": round(load_before, 2),
            "recordings_per_s": round(rate, 1),
            "target_per_s": TARGET_PER_S,
            "first_seen_to_last_sidecar_s": round(span, 2),
            "drop_to_first_seen_s": round(min(seen) - t_drop, 3),
            "drop_to_all_done_s": round(t_done - t_drop, 2),
            "cpu_seconds": {
                "service": round(cpu1 - cpu0, 2),
                "service_event_loop_thread": round(main1 - main0, 2),
                "children (ffprobe)": round(kids1 - kids0, 2),
                "per_recording_ms": round(1000 * (cpu1 - cpu0 + kids1 - kids0) / n, 2),
            },
            "events_per_recording": {k: round(v / n, 2) for k, v in sorted(per_type.items())},
            "failed": len(failed),
            "first_failure": repr(failed[0]) if failed else None,
            "service_exit_code": service.returncode,
            "temp_dir": str(tmp) if args.keep else None,
        }
        if args.profile:
            if not profile_path.exists():
                raise BenchError(f"no profile written:\n{service.tail()}")
            result["profile"] = _profile_summary(profile_path, args.top)
        return result
    raise AssertionError("unreachable")


def report(r: dict[str, Any]) -> str:
    s, c = r["settings"], r["cpu_seconds"]
    lines = [
        f"Backlog: {s['recordings']} recordings of {s['recording_bytes']} bytes dropped at once "
        f"(S3 = {r['server']}, SETTLE_SECONDS={s['SETTLE_SECONDS']}, MAX_CONCURRENT_STREAMS="
        f"{s['MAX_CONCURRENT_STREAMS']}, METADATA_PROBE={s['METADATA_PROBE']}"
        f"{', PROFILED' if s['profiled'] else ''}); load average before "
        f"{r['load_average_1m_before']}",
        f"  {r['recordings_per_s']:.1f} recordings/s (target >= {r['target_per_s']:g}): first "
        f"FileSeen -> last MetadataWritten {r['first_seen_to_last_sidecar_s']:.2f} s; "
        f"drop -> first FileSeen {r['drop_to_first_seen_s']:.3f} s",
        f"  CPU: service {c['service']:.2f} s (event loop {c['service_event_loop_thread']:.2f} s), "
        f"children {c['children (ffprobe)']:.2f} s; {c['per_recording_ms']:.2f} ms per recording",
        f"  events per recording: {r['events_per_recording']}",
    ]
    if r["failed"]:
        lines.append(f"  FAILED streams: {r['failed']}, first {r['first_failure']}")
    prof = r.get("profile")
    if prof:
        lines.append(f"  profile (event-loop thread, {prof['profiled_seconds']} s own time):")
        lines.append("    own time by area: " + ", ".join(
            f"{k} {v:.2f}s" for k, v in list(prof["own_time_by_area_s"].items())[:10]
        ))  # fmt: skip
        lines.append("    top by own time:")
        lines += [
            f"      {f['own_s']:8.3f}s own {f['cum_s']:8.3f}s cum {f['calls']:>8} {f['function']}"
            for f in prof["top_by_own_time"]
        ]
        lines.append("    top by cumulative time:")
        lines += [
            f"      {f['cum_s']:8.3f}s cum {f['own_s']:8.3f}s own {f['calls']:>8} {f['function']}"
            for f in prof["top_by_cumulative_time"]
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench_main("backlog", parse_args, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
