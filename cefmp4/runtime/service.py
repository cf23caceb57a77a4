"""Wiring and life cycle of one CefMP4 process.

``Service`` builds the adapters from the Config (one Redis connection pool,
one S3 client), replays the log into the projection, then runs the watcher and
the three consumer groups until ``stop`` is set. On stop the consumers stop
taking messages and let in-flight work finish within the grace period; what
does not finish stays pending in Redis and is picked up by the next start (or
another replica) - nothing is acknowledged that did not happen.

Every long-running task is supervised: an unexpected crash is logged with its
traceback, counted, and the task restarted with backoff instead of taking the
process down (which would only restart it into the same state).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, Counter

from cefmp4.adapters.archive import EventArchive, archive_through
from cefmp4.adapters.blocked import Blocked
from cefmp4.adapters.clients import redis_client, s3_client
from cefmp4.adapters.eventlog import EventLog, call_redis
from cefmp4.adapters.leases import Fence, Lease, StreamLeases
from cefmp4.adapters.metrics import Metrics
from cefmp4.adapters.retry import transient
from cefmp4.adapters.s3store import S3Store
from cefmp4.adapters.storage import ObjectStore
from cefmp4.domain.config import Config
from cefmp4.domain.ids import stream_id
from cefmp4.runtime.consumerloop import GroupConsumer, Handler
from cefmp4.runtime.health import Health, Probes, keep_beating
from cefmp4.runtime.heartbeat import BlockedState, Heartbeat, ReplicaState, package_version
from cefmp4.runtime.sampler import Backlog, Sampler, backlog_of
from cefmp4.runtime.watcher import Watcher
from consumers.deps import Deps, utcnow
from consumers.finalizer import Finalizer
from consumers.metadata import MetadataWriter
from consumers.uploader import Uploader
from consumers.uploads import Uploads, failer
from projections.live import LiveProjection
from projections.snapshots import SnapshotStore, snapshot_key

log = structlog.get_logger(__name__)


@contextlib.asynccontextmanager
async def connect(config: Config) -> AsyncIterator[tuple[aioredis.Redis, ObjectStore]]:
    """The two external clients, closed on exit."""
    redis = redis_client(config)
    # Enough connections for every part that may be in flight, plus sidecars.
    pool = config.max_concurrent_streams * config.part_concurrency + 4
    try:
        async with s3_client(config, pool=pool) as client:
            yield redis, S3Store(client, config.s3_bucket_name, timeout=config.s3_timeout_seconds)
    finally:
        await redis.aclose()


class Service:
    """One CefMP4 process: the adapters, the projection, the watcher and the
    consumer groups wired together (see the module docstring); ``start`` then
    ``run(stop)``.

    :param config: the parsed, immutable Config.
    :param redis: the client every Redis user of the process shares.
    :param store: the object store (wrapped so its calls wait while the
        deployment is blocked).
    :param registry: where the process's Prometheus metrics are registered.
    :param now: the wall clock of events and metrics (injected by tests).
    :param health: the liveness/readiness state the HTTP server reports; a
        new one when not given.
    """

    def __init__(
        self,
        config: Config,
        redis: aioredis.Redis,
        store: ObjectStore,
        registry: CollectorRegistry,
        *,
        now: Callable[[], Any] = utcnow,
        health: Health | None = None,
    ) -> None:
        events = EventLog(redis, config.events_key, config.replica)
        self.metrics = Metrics(registry)
        self.blocked = Blocked(self.metrics.blocked)  # S3 calls wait while it says so
        store = store.waiting_while_blocked(self.blocked)
        archive = EventArchive(store, config.event_archive_prefix)
        projection = LiveProjection(
            events,
            snapshots=SnapshotStore(
                redis, snapshot_key(config.redis_key_prefix), config.events_key
            ),
            snapshot_every=config.snapshot_every_events,
            snapshot_interval=config.snapshot_interval_seconds,
            retention_seconds=config.event_retention_seconds,
            archive=functools.partial(archive_through, events, archive),
            history=archive.events,
            trim_lease=Lease(
                redis,
                f"{config.redis_key_prefix}:lease:trim",
                config.replica,
                config.lease_ttl_seconds,
            ),
        )
        self.deps = Deps(
            config=config,
            events=events,
            projection=projection,
            store=store,
            stream_leases=StreamLeases(
                redis,
                key_prefix=config.redis_key_prefix,
                events_key=config.events_key,
                owner=config.replica,
                ttl=config.lease_ttl_seconds,
            ),
            metrics=self.metrics,
            now=now,
        )
        self._crashes = Counter(
            "cefmp4_task_crashes", "Supervised task crashes", ["task"], registry=registry
        )
        self.uploads = uploads = Uploads(self.deps)
        fail = failer(self.deps, uploads)
        handlers: list[Handler] = [
            Uploader(self.deps, uploads),
            Finalizer(self.deps, uploads),
            MetadataWriter(self.deps),
        ]
        self.consumers = [
            GroupConsumer(
                events,
                handler,
                consumer=config.replica,
                fail=fail,
                metrics=self.metrics,
                concurrency=config.max_concurrent_streams * 2,
                claim_idle_seconds=config.claim_idle_seconds,
            )
            for handler in handlers
        ]
        self.watcher = Watcher(
            self.deps, new_stream_id=lambda: stream_id(self.deps.now(), os.urandom(6))
        )
        self._redis = redis
        # /healthz and /readyz (cefmp4.runtime.health): the HTTP thread judges what
        # these loop tasks observe. Probing an empty prefix of the bucket
        # lists it: fails on a missing bucket, which HEAD of an object would not.
        self.health = health or Health()
        probe_prefix = f"{config.event_archive_prefix}readyz-probe/"
        self._probes = Probes(
            self.health,
            {
                "redis": lambda: call_redis(redis.ping, attempts=1),
                "s3": lambda: store.list_keys(probe_prefix),
            },
            self.blocked.reason,
        )
        self._sampler = Sampler(projection, self.metrics, now, backlog=self._backlog)
        # Who this replica is and how it is, for `cefmp4 status` (cefmp4.runtime.heartbeat).
        self._started_at = now()
        self.watching = False
        self._heartbeat = Heartbeat(redis, config, self.replica_state, now=now)

    async def start(self) -> None:
        """Make sure the bucket and groups exist and replay the log."""
        # S3 may be unreachable, or refuse our keys, at start for minutes: wait
        # for it rather than exit (the files on disk are the buffer meanwhile).
        # A blocked deployment is waited out inside the store (``Blocked``).
        async for attempt in transient(attempts=None, max_wait=30.0):
            with attempt:
                await self.deps.store.ensure_bucket()
                # S3_CHECKSUM=auto probes the store here, once, not in a stream's turn.
                await self.uploads.algorithm()
        for consumer in self.consumers:
            await consumer.start()
        projection = await self.deps.projection.catch_up()
        self.metrics.live_streams.set(len(projection.live()))
        log.info(
            "projection rebuilt",
            events=projection.events,
            streams=len(projection.streams),
            live=len(projection.live()),
        )

    async def run(self, stop: asyncio.Event) -> None:
        # Heartbeat and probes from the first moment (start may wait minutes
        # for S3) to the last (the shutdown grace): until cancelled, not stop.
        never = asyncio.Event()
        beat = functools.partial(keep_beating, self.health)
        liveness = [
            asyncio.create_task(self._supervise("heartbeat", beat, never)),
            asyncio.create_task(self._supervise("probes", self._probes.run, never)),
        ]
        try:
            await self.start()
            log.info(
                "service running",
                watch_dir=str(self.deps.config.watch_root),
                replica=self.deps.config.replica,
            )
            async with asyncio.TaskGroup() as group:
                group.create_task(self._supervise("watcher", lambda: self._watch(stop), stop))
                for consumer in self.consumers:
                    group.create_task(
                        self._supervise(consumer.group, lambda c=consumer: c.run(stop), stop)  # type: ignore[misc]
                    )
                group.create_task(self._supervise("sampler", lambda: self._sampler.run(stop), stop))
                group.create_task(
                    self._supervise("replica-heartbeat", lambda: self._heartbeat.run(stop), stop)
                )
                group.create_task(
                    self._supervise("snapshots", lambda: self.deps.projection.run(stop), stop)
                )
            log.info("service stopped")
        finally:
            for task in liveness:
                task.cancel()
            await asyncio.gather(*liveness, return_exceptions=True)

    def replica_state(self) -> ReplicaState:
        """What ``cefmp4 status`` shows of this replica (the heartbeat's payload)."""
        blocked = self.blocked.first()
        return ReplicaState(
            replica=self.deps.config.replica,
            version=package_version(),
            started_at=self._started_at,
            last_upload_at=self.metrics.last_upload_at,
            blocked=None
            if blocked is None
            else BlockedState(cause=blocked[0], since=blocked[1], message=blocked[2]),
            watching=self.watching,
        )

    async def _watch(self, stop: asyncio.Event) -> None:
        """Watch while holding the watcher lease; stand by otherwise.

        One replica watches the directory at a time (two watchers would each
        start a stream for the same file). The others keep uploading,
        finalizing and writing sidecars; a standby takes over within the
        lease TTL when the holder dies.
        """
        config = self.deps.config
        lease = Lease(self._redis, f"{config.redis_key_prefix}:lease:watcher", config.replica,
                      config.lease_ttl_seconds)  # fmt: skip
        standby_logged = False
        while not stop.is_set():
            if not await lease.acquire():
                if not standby_logged:
                    log.info("another replica watches the directory; standing by")
                    standby_logged = True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(config.lease_ttl_seconds / 3):
                        await stop.wait()
                continue
            standby_logged = False
            log.info("watching", watch_dir=str(config.watch_root))
            async with lease.kept() as lost:
                inner = asyncio.Event()
                relay = asyncio.create_task(_first_of(stop, lost, then=inner))
                self.metrics.watcher_lease.set(1)
                self.watching = True
                self._heartbeat.changed()
                try:
                    await self.watcher.run(inner, Fence(self._redis, config.events_key, lease))
                finally:
                    self.watching = False
                    self._heartbeat.changed()
                    self.metrics.watcher_lease.set(0)
                    relay.cancel()
            if lost.is_set() and not stop.is_set():
                log.warning("watcher lease lost; standing by")

    async def _backlog(self) -> list[Backlog]:
        key = self.deps.config.events_key
        infos: Any = await call_redis(lambda: self._redis.xinfo_groups(key), attempts=1)
        return backlog_of(infos)

    async def _supervise(
        self, name: str, task: Callable[[], Coroutine[Any, Any, None]], stop: asyncio.Event
    ) -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                await task()
                return
            except Exception:  # the task supervisor: record, back off, restart
                self._crashes.labels(name).inc()
                log.exception("task crashed; restarting", task=name, backoff=delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
                delay = min(delay * 2, 30.0)


async def _first_of(*events: asyncio.Event, then: asyncio.Event) -> None:
    """Set ``then`` as soon as any of ``events`` is set."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        then.set()
    finally:
        for w in waiters:
            w.cancel()
