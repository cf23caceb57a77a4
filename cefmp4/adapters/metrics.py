"""Prometheus metrics, registered on an injected registry (no globals).

Every label is bounded (a reason, a group, a kind; never a stream id or a
path), so the number of series does not grow with the recordings handled.
docs/METRICS.md describes each metric; the tests check that the dashboard
and the alert rules in deploy/ reference only metrics this page has.

Three kinds of values:

* counted where things happen: events, parts, bytes, completions, failures,
  handler errors (``uploaded`` and ``completed_stream`` keep each count in
  one call, so related series cannot drift apart);
* sampled every few seconds from the projection and the probes by
  ``cefmp4.runtime.sampler``: live streams, bytes not yet durable, age of the oldest
  unfinished recording, backlog of the consumer groups, blocked;
* the seed's names (``video_*``, ``streams_*_total``, ``active_streams_gauge``)
  for its users' dashboards: views of the ``cefmp4_*`` series computed at
  scrape time by ``SeedNames``, so nothing is counted twice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# From a second (a small file right after the recorder closed it) to a day.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 86400)
# A recording's life, FileSeen to StreamCompleted: seconds to a day.
RECORDING_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.last_upload_at: datetime | None = None
        self.events = Counter(
            "cefmp4_events_appended", "Events appended to the log", ["type"], registry=registry
        )
        self.parts = Counter(
            "cefmp4_parts_uploaded", "Parts sent to S3", ["why"], registry=registry
        )
        self.bytes = Counter("cefmp4_bytes_uploaded", "Bytes sent to S3", registry=registry)
        self.completed = Counter(
            "cefmp4_streams_completed", "Recordings completed in S3", ["mp4"], registry=registry
        )
        self.failed = Counter(
            "cefmp4_streams_failed",
            "Streams ended without an object",
            ["reason"],
            registry=registry,
        )
        self.handler_errors = Counter(
            "cefmp4_handler_errors",
            "Consumer handler failures by group and kind",
            ["group", "kind"],
            registry=registry,
        )
        self.sidecars = Counter(
            "cefmp4_sidecars_written", "Metadata sidecars", ["ffprobe"], registry=registry
        )
        self.finalize_seconds = Histogram(
            "cefmp4_finalize_seconds",
            "StreamIdle handled to StreamCompleted",
            registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
        )
        self.live_streams = Gauge(
            "cefmp4_live_streams", "Streams not yet completed or failed", registry=registry
        )
        self.undecodable = Counter(
            "cefmp4_events_undecodable",
            "Entries a consumer group left pending because this version cannot decode them"
            " (counted once per entry and process)",
            ["group", "type"],
            registry=registry,
        )
        self.blocked = Gauge(
            "cefmp4_blocked",
            "1 while S3 refuses this deployment's requests (work waits), by cause",
            ["cause"],
            registry=registry,
        )
        self.bytes_copied = Counter(
            "cefmp4_bytes_copied",
            "Bytes copied inside S3 from the object a continued recording extends (not sent)",
            registry=registry,
        )
        # The watcher's per-path supervisor (cefmp4.runtime.watcher): a path it could
        # not stat or decide on, once per path and kind until the path is fine
        # or gone. kind: stat | notify | internal.
        self.watch_errors = Counter(
            "cefmp4_watch_errors",
            "Paths the watcher could not look at, by kind (once per path and problem)",
            ["kind"],
            registry=registry,
        )
        # Names the watcher will not read (cefmp4.domain.filerules), once per path
        # and process. reason: symlink_outside | symlink | special_file.
        self.files_skipped = Counter(
            "cefmp4_files_skipped",
            "Recording names that are not followed or not regular files (once per path)",
            ["reason"],
            registry=registry,
        )
        # --- what an operator alerts on ---
        self.close_to_durable = Histogram(
            "cefmp4_close_to_durable_seconds",
            "Last change of the file (StreamIdle's mtime) to StreamCompleted",
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.last_upload = Gauge(
            "cefmp4_last_upload_timestamp_seconds",
            "Unix time of this replica's last part or object accepted by S3 (0: none yet)",
            registry=registry,
        )
        self.not_durable = Gauge(
            "cefmp4_not_durable_bytes",
            "Bytes of live streams on disk but not yet in S3 (file size minus recorded parts;"
            " every replica reports the same log-wide value)",
            registry=registry,
        )
        self.oldest_unfinished = Gauge(
            "cefmp4_oldest_unfinished_seconds",
            "Age of the oldest live stream since its FileSeen (0: none live)",
            registry=registry,
        )
        # The close fast path (cefmp4.adapters.closes): off with WATCH_POLL, off
        # Linux, at the inotify limits; then files finish by quiet time only.
        self.close_notifications = Gauge(
            "cefmp4_close_notifications",
            "1 while the watcher gets the writers' close signals (inotify), 0 when not",
            registry=registry,
        )
        self.watcher_lease = Gauge(
            "cefmp4_watcher_lease_held",
            "1 while this replica holds the watcher lease (watches the directory)",
            registry=registry,
        )
        self.group_lag = Gauge(
            "cefmp4_group_lag",
            "Log entries not yet delivered to the consumer group",
            ["group"],
            registry=registry,
        )
        self.group_pending = Gauge(
            "cefmp4_group_pending",
            "Entries delivered to the consumer group and not yet acknowledged",
            ["group"],
            registry=registry,
        )
        # --- the seed's names ---
        self.stream_duration = Histogram(
            "video_stream_duration_seconds",
            "A recording's FileSeen to its StreamCompleted",
            registry=registry,
            buckets=RECORDING_BUCKETS,
        )
        self.processing_time = Histogram(
            "video_processing_time_seconds",
            "StreamIdle to StreamCompleted of a recording",
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        registry.register(SeedNames(self))
        # The process' own: CPU, memory, open files, GC, Python version.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

    def uploaded(self, why: str, size: int, at: datetime) -> None:
        """S3 accepted a part (or a small file's single object) of ``size`` bytes."""
        self.parts.labels(why).inc()
        self.bytes.inc(size)
        self.last_upload.set(at.timestamp())
        self.last_upload_at = at  # for the replica heartbeat (cefmp4 status)

    def completed_stream(
        self, mp4: str, *, seen: datetime, idle: datetime, changed_ns: int, at: datetime
    ) -> None:
        """A recording became an object at ``at``: first seen at ``seen``, called
        idle at ``idle``, last changed on disk at ``changed_ns`` (its mtime)."""
        self.completed.labels(mp4).inc()
        self.stream_duration.observe(max(0.0, (at - seen).total_seconds()))
        self.processing_time.observe(max(0.0, (at - idle).total_seconds()))
        # mtime comes from the file system's clock (an NFS server's, say):
        # a little skew must not make a negative latency.
        self.close_to_durable.observe(max(0.0, at.timestamp() - changed_ns / 1e9))


class SeedNames(Collector):
    """The seed's metric names as views of the ``cefmp4_*`` series.

    Computed at scrape time from the counters' current values, so every fact
    is counted once. ``video_failed_operations_total{operation_type}`` is the
    handler failures per consumer group (``uploaders``, ``finalizers``,
    ``metadata``). ``active_streams_gauge`` keeps the seed's name although
    promtool's lint dislikes a type in a name (docs/METRICS.md).
    """

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> list[Metric]:
        # Names only, for the registry's duplicate check; values at collect.
        return list(self._families(sample=False))

    def collect(self) -> Iterator[Metric]:
        return self._families(sample=True)

    def _families(self, *, sample: bool) -> Iterator[Metric]:
        m = self._m
        yield _counter("video_chunks_uploaded", "Parts sent to S3 (cefmp4_parts_uploaded)",
                       _total(m.parts) if sample else 0.0)  # fmt: skip
        yield _counter("video_bytes_uploaded", "Bytes sent to S3 (cefmp4_bytes_uploaded)",
                       _total(m.bytes) if sample else 0.0)  # fmt: skip
        yield _counter("streams_completed", "Recordings completed (cefmp4_streams_completed)",
                       _total(m.completed) if sample else 0.0)  # fmt: skip
        yield _counter("streams_failed", "Streams failed (cefmp4_streams_failed)",
                       _total(m.failed) if sample else 0.0)  # fmt: skip
        failures = CounterMetricFamily(
            "video_failed_operations",
            "Handler failures per consumer group (cefmp4_handler_errors)",
            labels=["operation_type"],
        )
        if sample:
            per_group: defaultdict[str, float] = defaultdict(float)
            for (group, _kind), value in _by_labels(m.handler_errors).items():
                per_group[group] += value
            for group, value in sorted(per_group.items()):
                failures.add_metric([group], value)
        yield failures
        yield GaugeMetricFamily(
            "active_streams_gauge",
            "Streams not yet completed or failed (cefmp4_live_streams)",
            value=_total(m.live_streams) if sample else 0.0,
        )


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _total(metric: Counter | Gauge) -> float:
    """The sum over all label values of a counter (its ``_total`` samples) or gauge."""
    return sum(
        s.value
        for family in metric.collect()
        for s in family.samples
        if s.name.endswith("_total") or family.type == "gauge"
    )


def _by_labels(metric: Counter) -> dict[tuple[str, ...], float]:
    return {
        tuple(s.labels.values()): s.value
        for family in metric.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }
