"""Cameras: ``--cameras`` (32) recordings written at once at ``--mbit`` (8) Mbit/s each.

Setup (under a temp dir, removed afterwards unless ``--keep``): a private
``redis-server``, an S3 server (``--s3``, the JuiceFS gateway by default: the
lightest on CPU, so the service's share of the two cores is what is measured)
and one valid MP4 of ``--mbit`` x ``--seconds``: a 1 s ffmpeg recording whose
mdat is padded with random bytes, as in the throughput bench.

The service runs as a subprocess with the service's defaults (FIRST_PART_BYTES
5 MiB, CHUNK_SIZE_BYTES 10 MiB, SETTLE_SECONDS 1, STREAM_TIMEOUT_SECONDS 30,
MAX_CONCURRENT_STREAMS 4, ...) unless ``--service-env`` says otherwise. One writer thread per camera
writes the MP4 into the watch dir the way a camera does (OBS/NVR style: the
mdat size is 0 while writing and patched in place at the end), in
``--writes-per-second`` appends per second on a fixed schedule, for
``--seconds``; camera *i* starts ``i/N x --close-spread`` s after the first,
so all of them close within ``--close-spread`` (1) s of each other.

Figures:

* the service's CPU (utime + stime of the process and the children it
  reaped, from /proc) as a percent of one core over the steady recording:
  from ``--warmup`` s after the last camera started until the first close.
  The JuiceFS gateway's and the bench's own (the writers') are reported too;
* for each file, close -> sidecar: the moment the writer closed it to the
  service's MetadataWritten event (written once the sidecar PUT succeeded),
  read from the Redis log afterwards, so nothing polls S3 while they finish.

Targets (issue 8): <= 20 % of a core; every sidecar within 2 s of its close.
Every sidecar is read back and checked (size, SHA-256, mp4_complete).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

from cefmp4.dev.localservers import RedisServer, make_s3_client
from cefmp4.domain.events import FileSeen, MetadataWritten, StreamFailed
from tests.bench.bench_throughput import write_recording
from tests.bench.common import (
    BenchError,
    MiB,
    bench_main,
    cpu_seconds,
    env_pair,
    known_env_names,
    percentile,
    read_events,
    running,
    s3_server,
    sha256_matches,
    ts,
    wait_for,
)
from tests.harness import ServiceProcess, service_config
from tests.mp4gen import mdat_size_fields

BUCKET = "bench"
TARGET_CPU_PERCENT = 20.0
TARGET_MAX_DELAY_S = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_cameras", description=__doc__.splitlines()[0]
    )
    p.add_argument("--cameras", type=int, default=32, help="recordings at once (32)")
    p.add_argument("--mbit", type=float, default=8.0, help="bit rate per camera, Mbit/s (8)")
    p.add_argument("--seconds", type=float, default=60.0, help="recording length, s (60)")
    p.add_argument("--writes-per-second", type=float, default=4.0, help="appends per s (4)")
    p.add_argument(
        "--close-spread", type=float, default=1.0, help="all cameras close within this many s (1)"
    )
    p.add_argument(
        "--warmup", type=float, default=5.0, help="s after the last start before CPU counts (5)"
    )
    p.add_argument("--s3", choices=("juicefs", "seaweedfs"), default="juicefs")
    p.add_argument(
        "--service-env", type=env_pair, action="append", default=[], metavar="KEY=VAL",
        help="extra environment for the service (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=float, default=120.0, help="wait this long after the closes (120 s)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    args = p.parse_args(argv)
    if args.cameras < 1 or args.seconds <= 0 or args.writes_per_second <= 0:
        p.error("--cameras, --seconds and --writes-per-second must be positive")
    if args.seconds <= args.close_spread + args.warmup + 1:
        p.error("--seconds must exceed --close-spread + --warmup + 1 (a steady window)")
    return args


class Camera(threading.Thread):
    """Writes ``data`` to ``dst`` on a fixed schedule, then patches the mdat size."""

    def __init__(
        self,
        dst: Path,
        data: bytes,
        patches: list[tuple[int, bytes]],
        *,
        start_at: float,
        seconds: float,
        ticks_per_second: float,
    ) -> None:
        super().__init__(name=f"camera {dst.name}", daemon=True)
        self.dst, self._data, self._patches = dst, data, patches
        self.start_at, self._seconds, self._tps = start_at, seconds, ticks_per_second
        self.closed_at: float | None = None  # wall clock (time.time), like event stamps
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            self._record()
        except OSError as exc:  # reported by the bench, which then fails
            self.error = exc

    def _record(self) -> None:
        size = len(self._data)
        ticks = max(1, round(self._seconds * self._tps))
        view = memoryview(self._data)
        _sleep_until(self.start_at)
        written = 0
        with self.dst.open("wb") as f:
            for k in range(1, ticks + 1):
                upto = size * k // ticks
                f.write(view[written:upto])
                f.flush()
                written = upto
                if k < ticks:
                    _sleep_until(self.start_at + k / self._tps)
            for pos, real in self._patches:
                f.seek(pos)
                f.write(real)
        self.closed_at = time.time()


def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _placeholder(source: Path) -> tuple[bytes, list[tuple[int, bytes]]]:
    """The file as a camera writes it (mdat sizes zeroed) and the patches to apply."""
    final = source.read_bytes()
    fields = mdat_size_fields(final)
    if not fields:
        raise BenchError(f"{source} has no mdat to patch")
    data = bytearray(final)
    for pos, real in fields:
        data[pos : pos + len(real)] = bytes(len(real))
    return bytes(data), fields


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = int(args.mbit * 1_000_000 / 8 * args.seconds)
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="cefmp4-bench-cameras-")).resolve()
        if not args.keep:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        load_before = os.getloadavg()[0]
        rds = stack.enter_context(RedisServer(tmp / "redis"))
        server = s3_server(args.s3, tmp)
        stack.enter_context(server)
        server_pid = server.pid
        s3 = make_s3_client(server.endpoint)
        s3.create_bucket(Bucket=BUCKET)
        (tmp / "src").mkdir()
        source = tmp / "src" / "camera.mp4"
        verdict = write_recording(source, size, "mp4", tmp / "src")
        sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
        data, patches = _placeholder(source)
        watch = tmp / "watch"
        watch.mkdir()
        # The service's own defaults, spelled out because service_config's are a test's.
        config = service_config(
            watch,
            rds.url,
            "bench",
            BUCKET,
            server.endpoint,
            chunk_size_bytes=10 * MiB,
            settle_seconds=1.0,
            stream_timeout_seconds=30.0,
            rescan_interval_seconds=60.0,
            claim_idle_seconds=60.0,
            s3_timeout_seconds=60.0,
            shutdown_grace_seconds=20.0,
            prom_port=0,
        )
        client = redis.Redis.from_url(rds.url)
        stack.callback(client.close)
        service = ServiceProcess(config, tmp / "service.log", workdir=tmp / "service-cwd")
        service.env.update(dict(args.service_env))
        with running(service):
            pid = service.pid
            t0 = time.monotonic() + 0.5
            cams = [
                Camera(
                    watch / f"cam-{i:02d}.mp4",
                    data,
                    patches,
                    start_at=t0 + i * args.close_spread / args.cameras,
                    seconds=args.seconds,
                    ticks_per_second=args.writes_per_second,
                )
                for i in range(args.cameras)
            ]
            for cam in cams:
                cam.start()
            window_start = t0 + args.close_spread + args.warmup
            window_end = t0 + args.seconds - 0.1  # before the first close and its work
            _sleep_until(window_start)
            samples = [(time.monotonic(), *_cpu(pid, server_pid))]
            while (now := time.monotonic()) < window_end:
                time.sleep(min(1.0, window_end - now))
                samples.append((time.monotonic(), *_cpu(pid, server_pid)))
            for cam in cams:
                cam.join(timeout=args.seconds + 30)
            errors = [f"{c.dst.name}: {c.error!r}" for c in cams if c.error is not None]
            if errors:
                raise BenchError("camera writer failed: " + "; ".join(errors))
            names = {c.dst.name for c in cams}

            def finished() -> dict[str, Any] | None:
                events = read_events(client, config.events_key)
                paths = {e.stream_id: e.rel_path for e in events if isinstance(e, FileSeen)}
                done: dict[str, Any] = {}
                for e in events:
                    if isinstance(e, MetadataWritten | StreamFailed):
                        name = paths.get(e.stream_id)
                        if name in names and name not in done:
                            done[name] = e
                return done if len(done) == len(names) else None

            try:
                done, _ = wait_for(
                    finished, timeout=args.timeout, poll=0.5, what="every MetadataWritten"
                )
            except BenchError as exc:
                raise BenchError(f"{exc}; service log tail:\n{service.tail()}") from None
        failed = [f"{n}: {e!r}" for n, e in done.items() if isinstance(e, StreamFailed)]
        if failed:
            raise BenchError("streams failed: " + "; ".join(failed))
        per_camera = []
        for cam in cams:
            meta = done[cam.dst.name]
            assert cam.closed_at is not None
            doc = json.loads(s3.get_object(Bucket=BUCKET, Key=meta.key)["Body"].read())
            checks = {
                "size_ok": doc.get("total_size_bytes") == size,
                "sha256_ok": sha256_matches(doc.get("sha256"), sha256),
                "mp4_complete": doc.get("mp4_complete") is True,
                "metadata_ok": meta.error is None,
            }
            per_camera.append(
                {
                    "file": cam.dst.name,
                    "close_to_sidecar_s": round(ts(meta.at) - cam.closed_at, 3),
                    "checks": checks,
                    "sidecar_sha256": bool(doc.get("sha256")),
                    "sidecar_checksum": (doc.get("checksum") or {}).get("algorithm"),
                    "ok": all(checks.values()),
                }
            )
        return _result(args, size, verdict, load_before, samples, per_camera, service, tmp)
    raise AssertionError("unreachable")


def _cpu(pid: int, server_pid: int | None) -> tuple[float, float, float]:
    """(service incl. reaped children, S3 server, this bench) CPU seconds."""
    server = cpu_seconds(server_pid, children=True) if server_pid is not None else 0.0
    mine = os.times()
    return cpu_seconds(pid, children=True), server, mine.user + mine.system


def _result(
    args: argparse.Namespace,
    size: int,
    verdict: str,
    load_before: float,
    samples: list[tuple[float, float, float, float]],
    per_camera: list[dict[str, Any]],
    service: ServiceProcess,
    tmp: Path,
) -> dict[str, Any]:
    (t_a, svc_a, srv_a, me_a), (t_b, svc_b, srv_b, me_b) = samples[0], samples[-1]
    span = max(t_b - t_a, 1e-9)

    def pct(a: float, b: float) -> float:
        return round(100.0 * (b - a) / span, 1)

    per_second = [
        round(100.0 * (b[1] - a[1]) / max(b[0] - a[0], 1e-9), 1)
        for a, b in itertools.pairwise(samples)
    ]
    delays = [c["close_to_sidecar_s"] for c in per_camera]
    cpu = pct(svc_a, svc_b)
    worst = max(delays)
    known = known_env_names()
    return {
        "ok": all(c["ok"] for c in per_camera) and service.returncode == 0,
        "load_average_1m_before": round(load_before, 2),
        "server": args.s3,
        "settings": {
            "cameras": args.cameras,
            "mbit_per_s": args.mbit,
            "seconds": args.seconds,
            "file_mib": round(size / MiB, 1),
            "mp4_verdict": verdict,
            "writes_per_second": args.writes_per_second,
            "close_spread_s": args.close_spread,
            "warmup_s": args.warmup,
            "service_env": dict(args.service_env),
            "service_env_unknown": sorted(k for k, _ in args.service_env if k not in known),
        },
        "steady_window_s": round(span, 1),
        "service_cpu_percent_of_core": cpu,
        "service_cpu_percent_per_second_max": max(per_second, default=cpu),
        "server_cpu_percent_of_core": pct(srv_a, srv_b),
        "bench_cpu_percent_of_core": pct(me_a, me_b),
        "cpu_target_percent": TARGET_CPU_PERCENT,
        "cpu_met": cpu <= TARGET_CPU_PERCENT,
        "close_to_sidecar_p50_s": round(percentile(delays, 50), 3),
        "close_to_sidecar_max_s": round(worst, 3),
        "delay_target_max_s": TARGET_MAX_DELAY_S,
        "delay_met": worst <= TARGET_MAX_DELAY_S,
        "cameras": per_camera,
        "service_exit_code": service.returncode,
        "temp_dir": str(tmp) if args.keep else None,
    }


def report(r: dict[str, Any]) -> str:
    s = r["settings"]
    env = f"; service env {s['service_env']}" if s["service_env"] else ""
    if s["service_env_unknown"]:
        env += f" (unknown to the service: {s['service_env_unknown']})"
    slowest = sorted(r["cameras"], key=lambda c: -c["close_to_sidecar_s"])[:3]
    bad = [c["file"] for c in r["cameras"] if not c["ok"]]
    return "\n".join(
        [
            f"Cameras: {s['cameras']} x {s['mbit_per_s']:g} Mbit/s for {s['seconds']:g} s "
            f"({s['file_mib']} MiB MP4 each, {s['writes_per_second']:g} appends/s, closes within "
            f"{s['close_spread_s']:g} s), S3 = {r['server']}{env}; "
            f"load average before {r['load_average_1m_before']}",
            f"  service CPU   {r['service_cpu_percent_of_core']:6.1f} % of a core over "
            f"{r['steady_window_s']} s of steady recording (worst second "
            f"{r['service_cpu_percent_per_second_max']} %); target <= {r['cpu_target_percent']:g}"
            f" %: {'met' if r['cpu_met'] else 'MISSED'}",
            f"  also: S3 server {r['server_cpu_percent_of_core']} %, "
            f"bench writers {r['bench_cpu_percent_of_core']} %",
            f"  close -> sidecar (MetadataWritten)  p50 {r['close_to_sidecar_p50_s']:.3f} s  "
            f"max {r['close_to_sidecar_max_s']:.3f} s; target every one <= "
            f"{r['delay_target_max_s']:g} s: {'met' if r['delay_met'] else 'MISSED'}",
            "  slowest: "
            + ", ".join(f"{c['file']} {c['close_to_sidecar_s']:.3f} s" for c in slowest),
            "  sidecars checked (size, sha256, mp4_complete): "
            + ("all ok" if not bad else f"BAD {bad}"),
        ]
    )


def headline(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "cameras": r["settings"]["cameras"],
        "service_cpu_percent_of_core": r["service_cpu_percent_of_core"],
        "cpu_met": r["cpu_met"],
        "close_to_sidecar_p50_s": r["close_to_sidecar_p50_s"],
        "close_to_sidecar_max_s": r["close_to_sidecar_max_s"],
        "delay_met": r["delay_met"],
    }


def main(argv: list[str] | None = None) -> int:
    return bench_main("cameras", parse_args, run, report, argv, headline)


if __name__ == "__main__":
    sys.exit(main())
