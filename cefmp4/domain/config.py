"""Configuration: parsed once, at the edge, into an immutable object.

Values come from the environment, then an optional ``.env`` file (the
environment wins). Names are the seed's (``WATCH_DIR``, ``CHUNK_SIZE_BYTES``,
...). Parsing and validation is msgspec's ``convert`` with constraints, so a
bad value becomes one ``ConfigError`` naming the variable and what is allowed;
the CLI turns that into exit code 2. Nothing here is read at import time.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from cefmp4.domain.durations import duration
from cefmp4.domain.errors import ConfigError
from cefmp4.domain.filerules import FollowSymlinks
from cefmp4.domain.partplan import MAX_PART_SIZE, MIN_PART_SIZE, PartPlan, plan_at_sight

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]

# One hour of log in Redis: at 64 cameras writing 1-minute segments that is
# ~30k entries, ~15 MB, where keeping everything would grow by ~300 MB a day.
# An hour is also how long an XREAD follower may be away and still resume
# from Redis; everything older is in the archive in the bucket.
DEFAULT_EVENT_RETENTION = timedelta(hours=1)


def retention_seconds(text: str) -> float:
    """``EVENT_RETENTION``: a duration (``90s``, ``24h``, ``7d``) or ``0`` (keep all)."""
    if text.strip() == "0":
        return 0.0
    try:
        return duration(text).total_seconds()
    except ValueError:
        raise ValueError(
            f"EVENT_RETENTION must be a duration like 90s, 24h or 7d, or 0 to keep all: {text!r}"
        ) from None


PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PartBytes = Annotated[int, msgspec.Meta(ge=MIN_PART_SIZE, le=MAX_PART_SIZE)]
# Leaves a recording's key (cefmp4.domain.objectkeys) at least ~500 bytes of path.
MAX_KEY_PREFIX_BYTES = 400


# S3_CHECKSUM's values (cefmp4.adapters.checksums does the arithmetic of each).
ChecksumMode = Literal["auto", "crc64nvme", "crc32c", "sha256", "md5", "none"]


class Config(
    msgspec.Struct, frozen=True, kw_only=True, rename="upper", forbid_unknown_fields=False
):
    watch_dir: Annotated[str, msgspec.Meta(min_length=1)] = "./local_watch_dir"
    # The part plan (cefmp4.domain.partplan), chosen once per recording when
    # it is first seen and recorded in its FileSeen. Parts 2.. of a recording
    # that is still being written: a part is durable only once it is whole.
    chunk_size_bytes: PartBytes = 10 * 1024 * 1024
    # Part 1: most recorders patch their first bytes at close, so part 1 is
    # sent a second time; S3's minimum keeps that resend small.
    first_part_bytes: PartBytes = 5 * 1024 * 1024
    # The largest part for a file that is already large when first seen
    # (moved into place, found at start-up); each part costs a request and
    # the store's per-part work. Memory: up to MAX_PARTS_IN_FLIGHT of them.
    large_part_bytes: PartBytes = 32 * 1024 * 1024
    stream_timeout_seconds: PositiveFloat = 30.0
    settle_seconds: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    # After the writer closed a file (or renamed it into place; inotify, Linux
    # only), how long it must stay unchanged before a structurally complete
    # file is finalized: covers writers that close and reopen to append.
    close_guard_seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.2
    # The safety net for missed notifications: a full walk + stat of WATCH_DIR
    # (about 0.4 CPU-s per 100k files, so not every few seconds on a recorder box).
    rescan_interval_seconds: PositiveFloat = 60.0
    watch_poll: bool = False
    poll_interval_seconds: PositiveFloat = 0.5
    s3_endpoint_url: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_bucket_name: Annotated[str, msgspec.Meta(min_length=3, max_length=63)] = "video-streams"
    s3_region_name: str = "us-east-1"
    s3_key_prefix: str = "streams/"
    s3_timeout_seconds: PositiveFloat = 60.0
    # The integrity check every part and the object carry (cefmp4.adapters.checksums):
    # ``crc64nvme`` / ``crc32c`` (flexible checksums, the object's as FULL_OBJECT,
    # far cheaper than MD5), ``sha256`` (each body's SHA-256 in its SigV4
    # signature, for stores that check signatures only), ``md5`` (Content-MD5),
    # ``none``; ``auto`` probes the store once at start (crc64nvme, crc32c,
    # sha256) and falls back to md5.
    s3_checksum: ChecksumMode = "auto"
    # Also hash every file with SHA-256 (into StreamCompleted and the sidecar):
    # one more full pass over the bytes; the server-verified full-object
    # checksum in the sidecar already proves the object.
    sidecar_sha256: bool = False
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: Annotated[str, msgspec.Meta(min_length=1)] = "cefmp4"
    # How long `cefmp4 run` waits for Redis at start before it exits 2 (a wrong
    # URL or password is not worth waiting for forever); once running, Redis
    # outages are waited out however long (cefmp4.runtime.startup).
    redis_start_timeout_seconds: PositiveFloat = 60.0
    ffprobe_path: str = "ffprobe"
    # How the metadata sidecar describes a recording (consumers.metadata):
    # ``auto`` reads duration and codecs from the MP4's own boxes when they
    # settle everything ffprobe would report (a complete H.264/AAC-LC MP4,
    # cefmp4.domain.mp4meta) and runs ffprobe otherwise; ``ffprobe`` always
    # runs it (one process per recording); ``boxes`` never does (what the
    # boxes cannot describe gets ``duration_seconds: null`` and the reason).
    metadata_probe: Literal["auto", "boxes", "ffprobe"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    app_env: Literal["development", "production"] = "development"
    # The HTTP endpoint (metrics, /healthz, /readyz; cefmp4.runtime.httpserver): unset
    # is 8000, or a free port when 8000 is taken (a second replica on the
    # host); 0 picks a free port; "off" serves nothing. The port is logged.
    prom_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | Literal["off"] | None = None
    max_concurrent_streams: PositiveInt = 4
    part_concurrency: PositiveInt = 4
    # Parts read into memory at once, across every stream (each as large as
    # its stream's plan makes it: the largest of FIRST_PART_BYTES,
    # CHUNK_SIZE_BYTES and LARGE_PART_BYTES, or a continued object's part
    # size): the bound on the service's memory above its base.
    max_parts_in_flight: PositiveInt = 4
    claim_idle_seconds: PositiveFloat = 60.0
    lease_ttl_seconds: Annotated[float, msgspec.Meta(ge=0.5)] = 10.0
    shutdown_grace_seconds: Annotated[float, msgspec.Meta(ge=0)] = 20.0
    replica_id: str = ""
    # Projection snapshots (projections.snapshots): one every N folded events
    # and at least every SNAPSHOT_INTERVAL_SECONDS while anything changed, so
    # a restart replays only the tail and a quiet system shrinks too; 0 in
    # SNAPSHOT_EVERY_EVENTS disables snapshots (and with them, trimming).
    snapshot_every_events: Annotated[int, msgspec.Meta(ge=0)] = 10_000
    snapshot_interval_seconds: PositiveFloat = 300.0
    # How long entries stay in Redis (``90s``, ``24h``, ``7d``; ``0`` keeps
    # all). Older ones are archived to the bucket, then trimmed - never one
    # the latest snapshot does not cover nor one a consumer group still needs.
    # Default 1h: see ``DEFAULT_EVENT_RETENTION``. EVENT_RETENTION_DAYS is the
    # older spelling, used when EVENT_RETENTION is not set.
    event_retention: str | None = None
    event_retention_days: Annotated[float, msgspec.Meta(ge=0)] | None = None
    # Where log entries are archived in the bucket before they are trimmed
    # (cefmp4.adapters.archive); disjoint from S3_KEY_PREFIX, so the two never mix.
    event_archive_prefix: str = "cefmp4-events/"
    # Exposure: the interface the metrics endpoint binds. Loopback by default,
    # so a host running `cefmp4 run` publishes nothing; the container image
    # sets 0.0.0.0 (its network namespace is the boundary there).
    metrics_addr: str = "127.0.0.1"
    # Which symlinks under WATCH_DIR are followed (cefmp4.domain.filerules): ``inside``
    # only those whose target resolves inside WATCH_DIR, ``outside`` (or
    # ``all``) any, ``never`` none. The default keeps a link to /etc/shadow
    # on a share from being uploaded; a skipped link is logged once.
    follow_symlinks: FollowSymlinks = "inside"

    def __post_init__(self) -> None:
        if self.event_retention is not None:
            retention_seconds(self.event_retention)  # ValueError names the allowed spellings
        if self.settle_seconds > self.stream_timeout_seconds:
            # The idle timeout would always win, and the MP4 check never run.
            raise ValueError(
                f"SETTLE_SECONDS ({self.settle_seconds:g}) must not exceed "
                f"STREAM_TIMEOUT_SECONDS ({self.stream_timeout_seconds:g})"
            )
        if len(self.s3_key_prefix.encode()) > MAX_KEY_PREFIX_BYTES:
            # Object keys are at most 1,024 bytes; the path needs the room.
            raise ValueError(f"S3_KEY_PREFIX must be at most {MAX_KEY_PREFIX_BYTES} bytes")
        archive, recordings = self.event_archive_prefix, self.s3_key_prefix
        if archive.startswith(recordings) or recordings.startswith(archive):
            # One prefix would list (and gc would look at) the other's objects.
            raise ValueError(
                f"EVENT_ARCHIVE_PREFIX ({archive!r}) and S3_KEY_PREFIX ({recordings!r}) "
                "must not be prefixes of each other"
            )
        if not is_host(self.metrics_addr):
            raise ValueError(
                f"METRICS_ADDR: expected an IP address or a hostname, got {self.metrics_addr!r}"
            )

    def plan_at_sight(self, size: int) -> PartPlan:
        """The part plan for a recording first seen with ``size`` bytes."""
        return plan_at_sight(
            size,
            first=self.first_part_bytes,
            chunk=self.chunk_size_bytes,
            large=self.large_part_bytes,
        )

    @property
    def unrecorded_plan(self) -> PartPlan:
        """How a stream whose FileSeen records no plan (written before plans
        were recorded) was cut: CHUNK_SIZE_BYTES for every part, as then."""
        return PartPlan.uniform(self.chunk_size_bytes)

    @property
    def watch_root(self) -> Path:
        """WATCH_DIR as an absolute path (msgspec converts no Path from env text)."""
        return Path(self.watch_dir).resolve()

    @property
    def event_retention_seconds(self) -> float:
        """The retention period in seconds; 0 keeps every entry in Redis."""
        if self.event_retention is not None:
            return retention_seconds(self.event_retention)
        if self.event_retention_days is not None:
            return self.event_retention_days * 86_400
        return DEFAULT_EVENT_RETENTION.total_seconds()

    @property
    def events_key(self) -> str:
        return f"{self.redis_key_prefix}:events"

    @property
    def replica(self) -> str:
        # environment.load fills REPLICA_ID with host-pid when it is unset; a
        # Config built in code without one (tests) is replica "cefmp4".
        return self.replica_id or "cefmp4"


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_host(value: str) -> bool:
    """Pure: ``value`` is an IPv4/IPv6 address or an RFC 1123 hostname.

    What an operator could mean by a bind address; anything else (a URL, a
    port glued on, spaces) is a typo better refused at start than at bind.
    """
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    name = value.removesuffix(".")
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(x) for x in name.split("."))


def parse(values: Mapping[str, str]) -> Config:
    """Pure: the Config from variable names to values; raise ConfigError.

    ``values`` may hold unrelated variables (the whole environment); only the
    Config's own names are read. Reading the environment and the .env file is
    ``cefmp4.adapters.environment.load``'s job.
    """
    names = {f.encode_name for f in msgspec.structs.fields(Config)}
    # An empty variable means "not set", as in most twelve-factor services.
    chosen = {k: v for k, v in values.items() if k in names and v != ""}
    if "LOG_LEVEL" in chosen:
        chosen["LOG_LEVEL"] = chosen["LOG_LEVEL"].upper()
    try:
        return msgspec.convert(chosen, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


def _explain(exc: msgspec.ValidationError) -> str:
    # msgspec says "Expected `int` >= 5242880 - at `$.CHUNK_SIZE_BYTES`";
    # lead with the variable, which is what the operator has to fix.
    message = str(exc)
    if "Expected `bool`" in message:
        message = message.replace("got `str`", "allowed: true, false, 1, 0")
    if " - at `$." in message:
        what, _, where = message.rpartition(" - at `$.")
        return f"{where.rstrip('`')}: {what}"
    return message
