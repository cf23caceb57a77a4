"""CefMP4: stream growing MP4 recordings into S3, driven by an event log in Redis.

``cefmp4 run`` is the service and ``cefmp4 local`` the service on the local
default (throwaway Redis and SeaweedFS under ``.cefmp4/``); the other
commands are the operator's (``events``, ``retry``, ``status``, ``verify``,
``doctor``, ``gc``).

Configuration is parsed here, once; a bad value exits with code 2 and one line
naming the variable. SIGTERM/SIGINT stop taking new work and give in-flight
work ``SHUTDOWN_GRACE_SECONDS``; a second signal exits at once. Either way
nothing is lost: unacknowledged work is pending in Redis for the next start.
A fatal error is logged, through the log's secret redaction, and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgspec
import structlog
from prometheus_client import CollectorRegistry

from cefmp4.adapters import environment
from cefmp4.adapters.logsetup import configure, redact_url
from cefmp4.dev.localservers import RedisServer, SeaweedS3
from cefmp4.domain.config import Config
from cefmp4.domain.durations import duration
from cefmp4.domain.errors import ConfigError
from cefmp4.ops import doctor, eventscli, retrycli, statuscli, verifycli
from cefmp4.ops.gc import DEFAULT_OLDER_THAN, run_gc
from cefmp4.runtime.health import Health
from cefmp4.runtime.httpserver import Endpoints, PortInUse, open_server
from cefmp4.runtime.memory import return_large_buffers
from cefmp4.runtime.service import Service, connect
from cefmp4.runtime.startup import StartupError, preflight

log = structlog.get_logger(__name__)


async def serve(config: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            log.warning("second signal: exiting now; pending work resumes on next start")
            os._exit(130)
        log.info("stopping: finishing in-flight work", grace=config.shutdown_grace_seconds)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    registry = CollectorRegistry()
    health = Health()
    try:
        # METRICS_ADDR: loopback unless the deployment opens it (the image does).
        server = open_server(Endpoints(registry, health), config.metrics_addr, config.prom_port)
    except PortInUse as exc:
        log.error(str(exc))  # one line naming PROM_PORT; exit 2 like a bad value
        raise SystemExit(2) from None
    if server is not None:
        server.start()
        log.info("metrics endpoint", addr=config.metrics_addr, port=server.port,
                 paths="/metrics /healthz /readyz")  # fmt: skip
    try:
        log.info(
            "connecting",
            redis=redact_url(config.redis_url),
            s3=config.s3_endpoint_url or "AWS",
            bucket=config.s3_bucket_name,
        )
        async with connect(config) as (redis, store):
            await preflight(config, redis)  # StartupError: one line, exit 2 (_main)
            service = Service(config, redis, store, registry, health=health)
            task = asyncio.create_task(service.run(stop))
            await asyncio.wait(
                [task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
            )
            if not task.done():
                try:
                    async with asyncio.timeout(config.shutdown_grace_seconds):
                        await asyncio.shield(task)
                except TimeoutError:
                    log.warning("grace period over; abandoning in-flight work to the next start")
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            task.result() if not task.cancelled() else None
    finally:
        if server is not None:
            server.close()


@contextlib.contextmanager
def local_servers(config: Config, data_dir: Path) -> Iterator[Config]:
    """Start Redis (AOF on) and SeaweedFS under ``data_dir``; yield the config
    pointing at them."""
    redis = RedisServer(data_dir / "redis")
    s3 = SeaweedS3(data_dir / "seaweedfs")
    with redis, s3:
        endpoint = s3.endpoint
        local = msgspec.structs.replace(
            config,
            redis_url=redis.url,
            s3_endpoint_url=endpoint.url,
            s3_access_key_id=endpoint.access_key,
            s3_secret_access_key=endpoint.secret_key,
            s3_region_name=endpoint.region,
        )
        # The S3 key printed here is the throwaway server's built-in one
        # (localservers.DEFAULT_SECRET_KEY), not a configured secret: the
        # local default replaces S3_SECRET_ACCESS_KEY with it.
        print(
            f"""
CefMP4 local default
  watching   {local.watch_root}   (drop or record *.mp4 files here)
  redis      {redact_url(redis.url)}   (log: XRANGE {local.events_key} - +)
  s3         {endpoint.url}  bucket {local.s3_bucket_name}
  look at the objects with:
    AWS_ACCESS_KEY_ID={endpoint.access_key} AWS_SECRET_ACCESS_KEY={endpoint.secret_key} \\
      .venv/bin/aws --endpoint-url {endpoint.url} s3 ls --recursive s3://{local.s3_bucket_name}/
  data       {data_dir.resolve()}   (Ctrl-C stops the service and both servers)
""",
            file=sys.stderr,
            flush=True,
        )
        yield local


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except Exception:
        # The process edge: a fatal error (e.g. a permanent S3 error at start)
        # is written by the log, whose redaction masks secrets in its message
        # and traceback, instead of Python's bare traceback; exit 1 as before.
        log.exception("fatal error; exiting")
        return 1


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="cefmp4", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the service with the configuration from the environment")
    local = commands.add_parser("local", help="run against throwaway local Redis and SeaweedFS")
    local.add_argument("--data-dir", type=Path, default=Path(".cefmp4"))
    gc = commands.add_parser(
        "gc", help="abort multipart uploads the log no longer needs (dry run by default)"
    )
    gc.add_argument(
        "--older-than",
        type=duration,
        default=DEFAULT_OLDER_THAN,
        metavar="AGE",
        help="only abort uploads initiated at least AGE ago, e.g. 30m, 2h, 1d, 0s (default 1h)",
    )
    mode = gc.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run", dest="apply", action="store_false", help="only report (the default)"
    )
    mode.add_argument(
        "--apply", "--no-dry-run", dest="apply", action="store_true", help="abort them"
    )
    gc.set_defaults(apply=False)
    eventscli.add_parser(commands)
    retrycli.add_parser(commands)
    statuscli.add_parser(commands)
    verifycli.add_parser(commands)
    commands.add_parser("doctor", help="check Redis, S3, ffprobe, WATCH_DIR and inotify limits")
    args = parser.parse_args(argv)
    if args.command == "verify" and not (args.paths or args.stream or args.since):
        parser.error("verify: give PATH..., --stream ID or --since AGE")
    try:
        config = environment.named_replica(environment.load(os.environ))
    except ConfigError as exc:
        if args.command == "doctor":
            return doctor.main(None, str(exc), sys.stdout)
        print(f"cefmp4: invalid configuration: {exc}", file=sys.stderr)
        return 2
    configure(config)
    return_large_buffers()
    if args.command == "doctor":
        return doctor.main(config, "", sys.stdout)
    if args.command in ("run", "local"):
        try:
            if args.command == "local":
                with local_servers(config, args.data_dir) as local_config:
                    asyncio.run(serve(local_config))
            else:
                asyncio.run(serve(config))
        except StartupError as exc:
            print(f"cefmp4: cannot start: {exc}", file=sys.stderr)
            return 2
    elif args.command == "status":
        return asyncio.run(statuscli.run_status(config, args, sys.stdout))
    elif args.command == "verify":
        return asyncio.run(verifycli.run_verify(config, args, sys.stdout))
    elif args.command == "events":
        return eventscli.main(config, args)
    elif args.command == "retry":
        return asyncio.run(retrycli.run_retry(config, args, sys.stdout))
    elif args.command == "gc":
        asyncio.run(run_gc(config, apply=args.apply, older_than=args.older_than, out=sys.stdout))
    return 0
