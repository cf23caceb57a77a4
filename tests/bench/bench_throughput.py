"""Throughput: one finished file of ``--size-mib`` (1 GiB) to S3, service vs ``aws s3 cp``.

Setup (all under a temp dir, removed afterwards unless ``--keep``): a private
``redis-server`` and a ``juicefs gateway`` (the fastest S3 server available
here), a watch dir, and the file, written and fsynced in a staging dir next to
it. By default the file is a *valid* MP4 (a 1 s ffmpeg recording whose mdat is
padded with random bytes up to the size), so the watcher calls it idle after
``SETTLE_SECONDS``; ``--content random`` gives random bytes, which finish on
``STREAM_TIMEOUT_SECONDS`` instead.

Service run: ``python -m cefmp4 run`` as a subprocess; once it is up, the file
is renamed into the watch dir (a finished recording appearing at once). The
timings are the service's own event timestamps from the Redis log:

* ``busy``  = StreamCompleted.at - FileSeen.at - idle wait, where the idle
  wait is the time between the last part the uploader sent and StreamIdle,
  when positive (with a valid MP4 and a 1 s settle it is normally 0: the file
  goes idle while the uploader is still sending). This is the service's
  throughput: read + MD5 + send every part, then the finalizer's second read
  (MD5 re-check + whole-file SHA-256), the tail part, Complete and HEAD.
* ``end-to-end`` = StreamCompleted.at - FileSeen.at, idle wait included.

Peak RSS is the service's VmHWM, read before it is stopped. Then ``aws s3 cp``
sends the same file to the same server (its defaults unless told otherwise:
8 MiB parts, 10 requests in flight); its wall time includes the CLI's start-up,
which is measured separately with ``aws s3 ls`` and reported. Both objects are
checked with HEAD: size, and the ETag against the MD5s computed locally.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import redis
from botocore.exceptions import ClientError

from cefmp4.dev.localservers import JuiceFSGateway, RedisServer, S3Endpoint, make_s3_client
from cefmp4.domain.events import (
    FileSeen,
    MetadataWritten,
    PartUploaded,
    StreamCompleted,
    StreamFailed,
    StreamIdle,
)
from cefmp4.domain.mp4 import check_file, iter_top_level_boxes
from cefmp4.domain.partplan import final_parts, whole_parts
from tests.bench.common import (
    PYTHON,
    RESULTS_DIR,
    BenchError,
    MiB,
    PartHasher,
    PySpy,
    bench_main,
    cpu_seconds,
    fixed_parts,
    hash_file,
    main_thread_cpu_seconds,
    of_stream,
    proc_status_kib,
    read_events,
    summarize_profile,
    tool_version,
    ts,
    wait_for,
)
from tests.harness import ServiceProcess, service_config
from tests.mp4gen import make_mp4

NAME = "big.mp4"
BUCKET = "bench"
AWS_KEY = f"aws-cli/{NAME}"
_PAD_BLOCK = 16 * MiB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_throughput", description=__doc__.splitlines()[0]
    )
    p.add_argument("--size-mib", type=int, default=1024, help="file size (default 1024)")
    p.add_argument("--chunk-mib", type=int, default=10, help="CHUNK_SIZE_BYTES in MiB (10)")
    p.add_argument("--part-concurrency", type=int, default=4, help="PART_CONCURRENCY (4)")
    p.add_argument("--max-streams", type=int, default=4, help="MAX_CONCURRENT_STREAMS (4)")
    p.add_argument("--settle", type=float, default=1.0, help="SETTLE_SECONDS (1)")
    p.add_argument("--stream-timeout", type=float, default=5.0, help="STREAM_TIMEOUT_SECONDS (5)")
    p.add_argument("--content", choices=("mp4", "random"), default="mp4")
    p.add_argument("--aws-chunk-mib", type=int, default=8, help="aws multipart_chunksize (8)")
    p.add_argument("--aws-concurrency", type=int, default=10, help="aws max_concurrent_requests")
    p.add_argument("--no-aws", action="store_true", help="skip the aws s3 cp comparison")
    p.add_argument("--timeout", type=float, default=150.0, help="give up after this many s")
    p.add_argument(
        "--profile", action="store_true", help="attach py-spy --native (slows the service)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    args = p.parse_args(argv)
    if args.chunk_mib < 5:
        p.error("--chunk-mib must be at least 5 (S3's minimum part size)")
    return args


# -- the file -------------------------------------------------------------------


def _write_pad(f: BinaryIO, n: int, block: bytes) -> None:
    """``n`` random-looking bytes: one random block, made unique per copy by a counter."""
    counter = 0
    while n > 0:
        piece = counter.to_bytes(8, "big") + block[8:]
        take = min(n, len(piece))
        f.write(memoryview(piece)[:take])
        n -= take
        counter += 1


def write_recording(dst: Path, size: int, content: str, scratch: Path) -> str:
    """Write the finished file (fsynced) and return the service's MP4 verdict on it."""
    block = os.urandom(_PAD_BLOCK)
    with dst.open("wb") as f:
        if content == "random":
            _write_pad(f, size, block)
        else:
            seed = make_mp4(scratch / "seed.mp4", seconds=1).read_bytes()
            boxes = list(iter_top_level_boxes(seed))
            if [b.type for b in boxes] != ["ftyp", "free", "mdat", "moov"]:
                raise BenchError(f"unexpected ffmpeg layout {[b.type for b in boxes]}")
            ftyp, free, mdat, moov = boxes
            if free.size != 8 or mdat.header_size != 8:
                raise BenchError("unexpected free/mdat header sizes from ffmpeg")
            payload = seed[mdat.payload_offset : mdat.end]
            moov_bytes = seed[moov.offset : moov.end]
            # free(8) + mdat header(8), or one 64-bit mdat header (16): the same
            # 16 bytes, so moov's chunk offsets stay valid (ffmpeg's own trick).
            pad = size - (ftyp.end + 16 + len(payload) + len(moov_bytes))
            if pad < 0:
                raise BenchError(f"--size-mib too small for an MP4 ({size} bytes)")
            mdat_size = 16 + len(payload) + pad
            f.write(seed[: ftyp.end])
            if mdat_size - 8 < 2**32:
                f.write(seed[free.offset : free.end])
                f.write(struct.pack(">I4s", mdat_size - 8, b"mdat"))
            else:
                f.write(struct.pack(">I4sQ", 1, b"mdat", mdat_size))
            f.write(payload)
            _write_pad(f, pad, block)
            f.write(moov_bytes)
        f.flush()
        os.fsync(f.fileno())
    if dst.stat().st_size != size:
        raise BenchError(f"wrote {dst.stat().st_size} bytes, wanted {size}")
    return check_file(dst).status.value


# -- phases ---------------------------------------------------------------------


def _service_phase(
    args: argparse.Namespace,
    tmp: Path,
    rds: RedisServer,
    endpoint: S3Endpoint,
    gateway_pid: int,
    staged: Path,
    size: int,
) -> dict[str, Any]:
    chunk = args.chunk_mib * MiB
    watch = tmp / "watch"
    watch.mkdir()
    config = service_config(
        watch,
        rds.url,
        "bench",
        BUCKET,
        endpoint,
        chunk_size_bytes=chunk,
        part_concurrency=args.part_concurrency,
        max_concurrent_streams=args.max_streams,
        settle_seconds=args.settle,
        stream_timeout_seconds=args.stream_timeout,
        rescan_interval_seconds=10.0,
        claim_idle_seconds=60.0,
        s3_timeout_seconds=60.0,
        shutdown_grace_seconds=10.0,
        prom_port=0,
    )
    client = redis.Redis.from_url(rds.url)
    service = ServiceProcess(config, tmp / "service.log", workdir=tmp / "service-cwd")
    profiler: PySpy | None = None
    try:
        service.start(ready_timeout=30)
        pid = service.pid
        baseline_rss = proc_status_kib(pid)["VmRSS"]
        cpu0, main0, gw0 = cpu_seconds(pid), main_thread_cpu_seconds(pid), cpu_seconds(gateway_pid)
        if args.profile:
            profiler = PySpy(pid, RESULTS_DIR / "profile-throughput.txt")
        t_appear = time.time()
        staged.rename(watch / NAME)

        def finished() -> list[Any] | None:
            events = read_events(client, config.events_key)
            seen = next((e for e in events if isinstance(e, FileSeen) and e.rel_path == NAME), None)
            if seen is None:
                return None
            mine = of_stream(events, seen.stream_id)
            done = any(isinstance(e, StreamFailed | MetadataWritten) for e in mine)
            return mine if done else None

        try:
            mine, _ = wait_for(finished, timeout=args.timeout, poll=0.05, what="StreamCompleted")
        except BenchError as exc:
            raise BenchError(f"{exc}; service log tail:\n{service.tail()}") from None
        status = proc_status_kib(pid)
        cpu1, main1, gw1 = cpu_seconds(pid), main_thread_cpu_seconds(pid), cpu_seconds(gateway_pid)
    finally:
        if profiler is not None:
            profiler.stop()
        returncode = service.stop()
        client.close()
    failed = [e for e in mine if isinstance(e, StreamFailed)]
    if failed:
        raise BenchError(f"stream failed: {failed[0]!r}\n{service.tail()}")
    seen = next(e for e in mine if isinstance(e, FileSeen))
    completed = next(e for e in mine if isinstance(e, StreamCompleted))
    idle = next(e for e in mine if isinstance(e, StreamIdle))
    meta = next(e for e in mine if isinstance(e, MetadataWritten))
    spans = list(whole_parts(size, chunk))
    t_seen, t_idle, t_done = ts(seen.at), ts(idle.at), ts(completed.at)
    uploaded = [e for e in mine if isinstance(e, PartUploaded) and e.part_number <= len(spans)]
    t_upload_end = max((ts(e.at) for e in uploaded), default=t_seen)
    idle_wait = max(0.0, t_idle - t_upload_end)
    busy = t_done - t_seen - idle_wait
    end_to_end = t_done - t_seen
    sent_growing = sum(sp.size for sp in spans)
    bound_stream = args.part_concurrency * chunk
    result: dict[str, Any] = {
        "stream_id": seen.stream_id,
        "key": completed.key,
        "parts": completed.parts,
        "etag": completed.etag,
        "sha256": completed.sha256,
        "busy_seconds": round(busy, 3),
        "busy_mib_per_s": round(size / MiB / busy, 1),
        "end_to_end_seconds": round(end_to_end, 3),
        "end_to_end_mib_per_s": round(size / MiB / end_to_end, 1),
        "idle_wait_seconds": round(idle_wait, 3),
        "idle_reason": idle.reason,
        "detect_seconds": round(t_seen - t_appear, 3),
        "file_seen_to_idle_seconds": round(t_idle - t_seen, 3),
        "upload_phase_seconds": round(t_upload_end - t_seen, 3),
        "upload_phase_mib_per_s": (
            round(sent_growing / MiB / (t_upload_end - t_seen), 1)
            if t_upload_end > t_seen
            else None
        ),
        "finalize_phase_seconds": round(t_done - max(t_idle, t_upload_end), 3),
        "sidecar_seconds": round(ts(meta.at) - t_done, 3),
        "peak_rss_mib": round(status["VmHWM"] / 1024, 1),
        "baseline_rss_mib": round(baseline_rss / 1024, 1),
        "parts_in_flight_bound_mib": {
            "one_stream": bound_stream // MiB,
            "all_streams": args.max_streams * bound_stream // MiB,
        },
        "cpu_seconds": {
            "service_total": round(cpu1 - cpu0, 2),
            "service_event_loop_thread": round(main1 - main0, 2),
            "service_other_threads": round((cpu1 - cpu0) - (main1 - main0), 2),
            "juicefs_gateway": round(gw1 - gw0, 2),
        },
        "service_exit_code": returncode,
    }
    if profiler is not None and profiler.output.exists():
        result["profile"] = {"raw": str(profiler.output), **summarize_profile(profiler.output)}
    return result


def _aws_phase(
    args: argparse.Namespace, tmp: Path, endpoint: S3Endpoint, gateway_pid: int, path: Path
) -> dict[str, Any]:
    aws = Path(PYTHON).parent / "aws"
    if not os.access(aws, os.X_OK):
        found = shutil.which("aws")
        if found is None:
            raise BenchError("aws CLI not found (pip install awscli into .venv)")
        aws = Path(found)
    conf = tmp / "aws" / "config"
    conf.parent.mkdir()
    conf.write_text(
        "[default]\n"
        f"region = {endpoint.region}\n"
        "s3 =\n"
        f"    multipart_threshold = {8 * MiB}\n"
        f"    multipart_chunksize = {args.aws_chunk_mib * MiB}\n"
        f"    max_concurrent_requests = {args.aws_concurrency}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID=endpoint.access_key,
        AWS_SECRET_ACCESS_KEY=endpoint.secret_key,
        AWS_DEFAULT_REGION=endpoint.region,
        AWS_CONFIG_FILE=str(conf),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "aws" / "credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    base = [str(aws), "--endpoint-url", endpoint.url]

    def timed_run(argv: list[str]) -> tuple[float, float, float]:
        """(wall s, CPU s, max RSS MiB) of one CLI run; BenchError on failure."""
        err_path = tmp / "aws" / "stderr"
        start = time.monotonic()
        with err_path.open("wb") as err:
            proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
        # wait4 gives this child's own rusage (CPU, peak RSS); the timer kills
        # it by its pid if it overruns.
        timer = threading.Timer(args.timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            tail = err_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {tail}")
        return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024

    # One request plus the CLI's start-up: what "aws" costs before any byte moves.
    startup, _, _ = timed_run([*base, "s3", "ls", f"s3://{BUCKET}/"])
    gw0 = cpu_seconds(gateway_pid)
    cp = [*base, "s3", "cp", str(path), f"s3://{BUCKET}/{AWS_KEY}", "--only-show-errors"]
    wall, cpu, rss_mib = timed_run(cp)
    gw1 = cpu_seconds(gateway_pid)
    size = path.stat().st_size
    transfer = max(wall - startup, 1e-9)
    return {
        "command": " ".join(["aws", "--endpoint-url", endpoint.url, *cp[3:]]),
        "version": tool_version([str(aws), "--version"]),
        "chunk_mib": args.aws_chunk_mib,
        "max_concurrent_requests": args.aws_concurrency,
        "wall_seconds": round(wall, 3),
        "mib_per_s": round(size / MiB / wall, 1),
        "cli_startup_seconds": round(startup, 3),
        "mib_per_s_excluding_startup": round(size / MiB / transfer, 1),
        "peak_rss_mib": round(rss_mib, 1),
        "cpu_seconds": {
            "aws_cli": round(cpu, 2),
            "juicefs_gateway": round(gw1 - gw0, 2),
        },
    }


def _head(s3: Any, key: str) -> tuple[int, str]:
    try:
        info = s3.head_object(Bucket=BUCKET, Key=key)
    except ClientError as exc:
        raise BenchError(f"HEAD {key}: {exc}") from None
    return int(info["ContentLength"]), str(info["ETag"]).strip('"')


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size_mib * MiB
    chunk = args.chunk_mib * MiB
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="cefmp4-bench-throughput-")).resolve()
        if not args.keep:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        load_before = os.getloadavg()[0]
        rds = stack.enter_context(RedisServer(tmp / "redis"))
        gateway = stack.enter_context(JuiceFSGateway(tmp / "juicefs"))
        endpoint = gateway.endpoint
        gateway_pid = gateway.pid
        assert gateway_pid is not None
        s3 = make_s3_client(endpoint)
        s3.create_bucket(Bucket=BUCKET)
        staging = tmp / "staging"
        staging.mkdir()
        started = time.monotonic()
        verdict = write_recording(staging / NAME, size, args.content, staging)
        generate_seconds = time.monotonic() - started

        service = _service_phase(args, tmp, rds, endpoint, gateway_pid, staging / NAME, size)
        path = tmp / "watch" / NAME
        aws = None if args.no_aws else _aws_phase(args, tmp, endpoint, gateway_pid, path)

        service_plan = PartHasher([sp.size for sp in final_parts(size, chunk)])
        aws_sizes = fixed_parts(size, args.aws_chunk_mib * MiB) if size >= 8 * MiB else [size]
        aws_plan = PartHasher(aws_sizes)
        sha256 = hash_file(path, [service_plan, aws_plan])
        checks: dict[str, Any] = {}
        got_size, got_etag = _head(s3, service["key"])
        checks["service"] = {
            "size_ok": got_size == size,
            "etag": got_etag,
            "etag_ok": got_etag == service_plan.etag() == service["etag"],
            "sha256_ok": service["sha256"] == sha256,
        }
        if aws is not None:
            got_size, got_etag = _head(s3, AWS_KEY)
            checks["aws"] = {
                "size_ok": got_size == size,
                "etag": got_etag,
                "expected_etag": aws_plan.etag(),
                "etag_ok": got_etag == aws_plan.etag(),
            }
        ok = service["service_exit_code"] == 0 and all(
            v for c in checks.values() for k, v in c.items() if k.endswith("_ok")
        )
        return {
            "ok": ok,
            "load_average_1m_before": round(load_before, 2),
            "server": f"juicefs gateway ({tool_version([_juicefs(), 'version'])})",
            "settings": {
                "size_mib": args.size_mib,
                "content": args.content,
                "mp4_verdict": verdict,
                "CHUNK_SIZE_BYTES": chunk,
                "PART_CONCURRENCY": args.part_concurrency,
                "MAX_CONCURRENT_STREAMS": args.max_streams,
                "SETTLE_SECONDS": args.settle,
                "STREAM_TIMEOUT_SECONDS": args.stream_timeout,
                "profiled": args.profile,
            },
            "generate_seconds": round(generate_seconds, 2),
            "service": service,
            "aws_cli": aws,
            "verify": checks,
            "temp_dir": str(tmp) if args.keep else None,
        }
    raise AssertionError("unreachable")


def _juicefs() -> str:
    beside = Path(PYTHON).parent / "juicefs"
    return str(beside) if beside.exists() else "juicefs"


def _verdicts(checks: dict[str, Any]) -> str:
    parts = []
    for who, c in checks.items():
        flags = ", ".join(
            f"{k.removesuffix('_ok')} {'ok' if v else 'MISMATCH'}"
            for k, v in c.items()
            if k.endswith("_ok")
        )
        parts.append(f"{who}: {flags} (ETag {c['etag']})")
    return "; ".join(parts)


def report(r: dict[str, Any]) -> str:
    s, svc, aws = r["settings"], r["service"], r["aws_cli"]
    bound = svc["parts_in_flight_bound_mib"]
    cpu = svc["cpu_seconds"]
    perturbed = "  [profiled with py-spy: figures perturbed]" if s["profiled"] else ""
    lines = [
        f"Throughput: {s['size_mib']} MiB finished file ({s['content']}, MP4 verdict "
        f"{s['mp4_verdict']}) -> {r['server']}; load average before {r['load_average_1m_before']}",
        f"  settings: CHUNK_SIZE_BYTES={s['CHUNK_SIZE_BYTES']} "
        f"PART_CONCURRENCY={s['PART_CONCURRENCY']} "
        f"MAX_CONCURRENT_STREAMS={s['MAX_CONCURRENT_STREAMS']} "
        f"SETTLE_SECONDS={s['SETTLE_SECONDS']} "
        f"STREAM_TIMEOUT_SECONDS={s['STREAM_TIMEOUT_SECONDS']}{perturbed}",
        f"  service busy        {svc['busy_mib_per_s']:8.1f} MiB/s  "
        f"({svc['busy_seconds']:.2f} s = FileSeen->StreamCompleted "
        f"minus idle wait {svc['idle_wait_seconds']:.2f} s)",
        f"  service end-to-end  {svc['end_to_end_mib_per_s']:8.1f} MiB/s  "
        f"({svc['end_to_end_seconds']:.2f} s FileSeen->StreamCompleted, idle wait included; "
        f"StreamIdle after {svc['file_seen_to_idle_seconds']:.2f} s, {svc['idle_reason']})",
        f"    phases: uploader {svc['upload_phase_seconds']:.2f} s "
        f"({svc['upload_phase_mib_per_s']} MiB/s, whole parts), "
        f"finalizer {svc['finalize_phase_seconds']:.2f} s "
        "(re-read + MD5 + SHA-256, tail, complete, HEAD); "
        f"sidecar +{svc['sidecar_seconds']:.2f} s; rename->FileSeen {svc['detect_seconds']:.2f} s",
        f"    CPU s: service {cpu['service_total']} (event loop thread "
        f"{cpu['service_event_loop_thread']}, other threads {cpu['service_other_threads']}), "
        f"juicefs gateway {cpu['juicefs_gateway']}",
        f"  service peak RSS    {svc['peak_rss_mib']:8.1f} MiB    "
        f"(VmHWM; {svc['baseline_rss_mib']} MiB before the file appeared; "
        f"parts-in-flight bound {bound['one_stream']} MiB for one stream, "
        f"{bound['all_streams']} MiB for MAX_CONCURRENT_STREAMS)",
    ]
    if aws is not None:
        acpu = aws["cpu_seconds"]
        lines += [
            f"  aws s3 cp           {aws['mib_per_s']:8.1f} MiB/s  "
            f"({aws['wall_seconds']:.2f} s wall incl. CLI start-up; "
            f"{aws['chunk_mib']} MiB parts x {aws['max_concurrent_requests']} in flight)",
            f"  aws s3 cp, no start {aws['mib_per_s_excluding_startup']:8.1f} MiB/s  "
            f"(minus start-up + 1 request {aws['cli_startup_seconds']:.2f} s); "
            f"CPU s: aws {acpu['aws_cli']}, juicefs gateway {acpu['juicefs_gateway']}; "
            f"peak RSS {aws['peak_rss_mib']} MiB",
        ]
    lines.append(f"  verified with HEAD: {_verdicts(r['verify'])}")
    if "profile" in svc:
        prof = svc["profile"]
        lines.append(
            f"  py-spy --native: {prof['busy_samples']} busy of {prof['samples']} samples "
            f"(raw stacks: {prof['raw']}); share of busy samples:"
        )
        for name, pct in prof["percent_of_busy_by_category"].items():
            lines.append(f"    {pct:5.1f}%  {name}")
        lines.append(f"    by thread: {prof['percent_of_busy_by_thread']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return bench_main("throughput", parse_args, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
