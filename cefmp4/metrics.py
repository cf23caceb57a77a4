"""Prometheus metrics, registered on an injected registry (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
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
        # The watcher's per-path supervisor (cefmp4.watcher): a path it could
        # not stat or decide on, once per path and kind until the path is fine
        # or gone. kind: stat | notify | internal.
        self.watch_errors = Counter(
            "cefmp4_watch_errors",
            "Paths the watcher could not look at, by kind (once per path and problem)",
            ["kind"],
            registry=registry,
        )
        # Names the watcher will not read (cefmp4.filerules), once per path
        # and process. reason: symlink_outside | symlink | special_file.
        self.files_skipped = Counter(
            "cefmp4_files_skipped",
            "Recording names that are not followed or not regular files (once per path)",
            ["reason"],
            registry=registry,
        )
