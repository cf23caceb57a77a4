"""Running the real service inside a test, against real Redis and real S3.

``running(config)`` starts the whole service (watcher + the three consumer
groups) in the test's event loop; ``Harness.until`` polls the projection until
a condition holds or a deadline passes (a condition, not a sleep), and dumps
the event log on failure so the reason is visible. ``subprocess_env`` builds
the environment for the kill -9 tests, which run ``python -m cefmp4 run``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from cefmp4.adapters.eventlog import EventLog
from cefmp4.dev.localservers import S3Endpoint
from cefmp4.domain.config import Config
from cefmp4.domain.events import Event, UnknownEvent
from cefmp4.runtime.service import Service, connect
from projections.streams import StreamState, fold

MiB = 1024 * 1024


def service_config(
    watch_dir: Path, redis_url: str, key_prefix: str, bucket: str, s3: S3Endpoint, **overrides: Any
) -> Config:
    base: dict[str, Any] = {
        "watch_dir": str(watch_dir),
        "redis_url": redis_url,
        "redis_key_prefix": key_prefix,
        "s3_bucket_name": bucket,
        "s3_endpoint_url": s3.url,
        "s3_access_key_id": s3.access_key,
        "s3_secret_access_key": s3.secret_key,
        "s3_region_name": s3.region,
        "chunk_size_bytes": 5 * MiB,
        "settle_seconds": 0.5,
        "stream_timeout_seconds": 3.0,
        "rescan_interval_seconds": 1.0,
        "claim_idle_seconds": 2.0,
        "prom_port": 0,
        "s3_timeout_seconds": 20.0,
    }
    base.update(overrides)
    return Config(**base)


def subprocess_env(config: Config) -> dict[str, str]:
    """The environment that makes ``python -m cefmp4 run`` use ``config``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "REDIS_"))}
    raw = msgspec.to_builtins(config, enc_hook=str)
    env.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in raw.items()
                if v is not None})  # fmt: skip
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    env["LOG_LEVEL"] = "INFO"
    return env


PYTHON = sys.executable


class History:
    """Every stream the log ever had, for assertions about finished ones.

    The service's ``Projection`` retires settled streams (its state follows
    what is live or on disk); a test wants to look at a stream after it
    finished, so it folds the whole log with the same pure ``fold`` and keeps
    everything. ``by_path`` is the newest stream created for each path.
    """

    def __init__(self, entries: Iterable[tuple[str, Event]] = ()) -> None:
        self.streams: dict[str, StreamState] = {}
        self.by_path: dict[str, str] = {}
        for _entry_id, event in entries:
            old = self.streams.get(event.stream_id)
            new = fold(old, event)
            if new is not None:
                self.streams[new.stream_id] = new
                if old is None:
                    self.by_path[new.path] = new.stream_id

    def for_path(self, path: str) -> StreamState | None:
        stream_id = self.by_path.get(path)
        return None if stream_id is None else self.streams.get(stream_id)

    def live(self) -> list[StreamState]:
        return [s for s in self.streams.values() if not s.terminal]


class Harness:
    def __init__(
        self, config: Config, redis: aioredis.Redis, registry: CollectorRegistry | None = None
    ) -> None:
        self.config = config
        self.log = EventLog(redis, config.events_key, "test")
        self.registry = registry or CollectorRegistry()  # the running service's metrics

    async def events(self) -> list[tuple[str, Event]]:
        entries = await self.log.read_after("0-0", count=1_000_000)
        return [(i, e) for i, e in entries if not isinstance(e, UnknownEvent)]

    async def projection(self) -> History:
        return History(await self.events())

    async def until(
        self, condition: Callable[[History], bool], *, timeout: float = 60.0, what: str = ""
    ) -> History:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            projection = await self.projection()
            if condition(projection):
                return projection
            if loop.time() > deadline:
                dump = "\n".join(f"{i} {e!r}" for i, e in await self.events())
                raise AssertionError(f"timed out waiting for {what or condition}:\n{dump}")
            await asyncio.sleep(0.05)

    async def terminal(self, path: Path, *, timeout: float = 60.0) -> StreamState:
        """Wait until the newest stream of ``path`` completed (with sidecar) or failed."""

        def done(p: History) -> bool:
            s = p.for_path(str(path))
            return s is not None and (s.status == "failed" or s.metadata_key is not None)

        projection = await self.until(done, timeout=timeout, what=f"{path} to finish")
        state = projection.for_path(str(path))
        assert state is not None
        return state


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Harness]:
    async with connect(config) as (redis, store):
        registry = CollectorRegistry()
        service = Service(config, redis, store, registry)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        try:
            yield Harness(config, redis, registry)
        finally:
            stop.set()
            async with asyncio.timeout(30):
                await task


@asynccontextmanager
async def log_only(config: Config) -> AsyncIterator[tuple[Harness, Service]]:
    """The service wired but not running: for one-pass (``run_once``) checks."""
    async with connect(config) as (redis, store):
        yield Harness(config, redis), Service(config, redis, store, CollectorRegistry())


def objects(s3_client: Any, bucket: str) -> dict[str, bytes]:
    listing = s3_client.list_objects_v2(Bucket=bucket)
    return {
        o["Key"]: s3_client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in listing.get("Contents", [])
    }


def open_uploads(s3_client: Any, bucket: str) -> list[Mapping[str, Any]]:
    return list(s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


class ServiceProcess:
    """``python -m cefmp4 run`` as a child process: the only honest way to
    test kill -9, SIGTERM and several replicas (tests and benchmarks).

    Runs in ``workdir`` (default: next to the log) so no stray ``.env`` is read.
    ``prefix`` goes before the interpreter (e.g. ``setpriv --reuid ...`` to
    run it as another user) and ``python`` replaces it.
    """

    def __init__(
        self,
        config: Config,
        log_path: Path,
        replica_id: str = "",
        workdir: Path | None = None,
        *,
        prefix: Sequence[str] = (),
        python: str = PYTHON,
    ) -> None:
        self.env = subprocess_env(config)
        if replica_id:
            self.env["REPLICA_ID"] = replica_id
        self.replica_id = replica_id
        self.log_path = log_path
        self._workdir = workdir or log_path.parent
        self._command = [*prefix, python, "-m", "cefmp4", "run"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "service not started"
        return self.proc.pid

    def start(self, ready_timeout: float | None = None) -> None:
        """Start; with ``ready_timeout``, also wait for "service running"."""
        self._workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self._command,
                env=self.env,
                cwd=self._workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if ready_timeout is None:
            return
        deadline = time.monotonic() + ready_timeout
        # Ready = the watcher lease is decided: this replica watches (its
        # first scan is done or under way) or stands by.
        while not any(line in self.log_tail(1_000_000) for line in ("] watching", "standing by")):
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"service not running after {ready_timeout}s")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.returncode = self.proc.wait()

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait; the exit code (SIGKILL and raise after ``timeout``)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return self.returncode

    def stop(self, grace: float = 30.0) -> int | None:
        """Best-effort terminate for cleanup paths: never raises."""
        if self.proc is None:
            return self.returncode
        try:
            return self.terminate(grace)
        except subprocess.TimeoutExpired:
            return self.returncode

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_tail(1_000_000).splitlines()[-lines:])

    def __enter__(self) -> ServiceProcess:
        self.start(ready_timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
