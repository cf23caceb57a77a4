"""``cefmp4 status``: what the deployment is doing, from Redis alone.

What it shows
-------------
* **Live streams**: path, bytes on disk now vs bytes durable in S3 (the sum of
  the recorded part sizes), parts, age (since ``FileSeen``) and lag (now minus
  the stream's last recorded change: its file's recorded mtime or its last
  part, whichever is later; a growing lag on a live stream is a stuck one).
* **Recent outcomes**: the last ``--recent`` ``StreamCompleted`` and
  ``StreamFailed`` entries in Redis (the log's tail; older ones are in the
  archive, ``cefmp4 events --from-start``).
* **Backlog** per consumer group: ``pending`` (delivered, not acknowledged)
  and ``lag`` (entries not yet delivered), from ``XINFO GROUPS``.
* **Replicas** (their heartbeats, ``cefmp4.runtime.heartbeat``), which leases each
  holds (``<prefix>:lease:*``: the value is ``<owner>:<random>``, TTL from
  PTTL), and whether any is **blocked**, since when and why.

Design
------
* Facts, then a model, then a rendering. :func:`gather` does the I/O (one
  read-only projection catch-up, stats of the live files, a bounded backwards
  read of the log, XINFO, SCANs); :func:`build` turns :class:`Facts` into the
  :class:`Status` model and :func:`renderable`/:func:`render_text`/
  :func:`render_json` show it. The last three are pure and tested without
  Redis.
* Read-only: no snapshot, no trim, no group, no lease is written.
* ``--watch`` redraws in place (``rich.live``) every 2 s until Ctrl-C (exit 0);
  ``--json`` prints one JSON document. Exit 2 when Redis cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import signal
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec
import redis.asyncio as aioredis
import redis.exceptions as rexc
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cefmp4.adapters import files
from cefmp4.adapters.clients import probed_redis
from cefmp4.adapters.eventlog import EventLog, call_redis
from cefmp4.domain.config import Config
from cefmp4.domain.errors import CefError
from cefmp4.domain.events import CODEC, StreamCompleted, StreamFailed
from cefmp4.runtime.heartbeat import BlockedState, ReplicaState, read_heartbeats
from consumers.deps import utcnow
from projections.live import LiveProjection
from projections.snapshots import SnapshotStore, snapshot_key
from projections.streams import Projection, StreamState

DEFAULT_RECENT = 10
TAIL_SCAN_LIMIT = 20_000  # entries read backwards looking for outcomes, at most
WATCH_SECONDS = 2.0
GROUPS = ("uploaders", "finalizers", "metadata")


# -- facts (what gather reads) -------------------------------------------------


class LeaseFact(msgspec.Struct, frozen=True):
    key: str
    value: str
    pttl_ms: int


class GroupFact(msgspec.Struct, frozen=True):
    name: str
    pending: int
    lag: int | None  # None when Redis cannot tell (entries deleted mid-range)
    consumers: int


Outcome = StreamCompleted | StreamFailed


class Facts(msgspec.Struct, frozen=True, kw_only=True):
    now: datetime
    live: list[StreamState]
    on_disk: dict[str, int | None]  # path -> size now, None if gone
    paths: dict[str, str]  # stream id -> path, for the outcomes
    outcomes: list[tuple[str, Outcome]]  # newest first
    groups: list[GroupFact]
    leases: list[LeaseFact]
    heartbeats: list[ReplicaState]
    key_prefix: str


# -- the model -------------------------------------------------------------------


class LiveRow(msgspec.Struct, frozen=True, kw_only=True):
    stream_id: str
    path: str
    status: str
    on_disk: int | None
    durable: int
    parts: int
    age_seconds: float
    lag_seconds: float


class OutcomeRow(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    at: datetime
    stream_id: str
    outcome: str  # completed | failed
    path: str | None
    key: str | None = None
    size: int | None = None
    reason: str | None = None


class LeaseRow(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # watcher | trim | stream:<id> | ...
    owner: str
    ttl_seconds: float


class ReplicaRow(msgspec.Struct, frozen=True, kw_only=True):
    replica: str
    version: str
    started_at: datetime
    seen_seconds_ago: float | None
    watching: bool
    last_upload_at: datetime | None
    blocked: BlockedState | None
    leases: list[str]


class BlockedRow(msgspec.Struct, frozen=True, kw_only=True):
    replica: str
    cause: str
    since: datetime
    message: str


class Status(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime
    live: list[LiveRow]
    recent: list[OutcomeRow]
    backlog: list[GroupFact]
    replicas: list[ReplicaRow]
    leases: list[LeaseRow]
    blocked: list[BlockedRow]
    watcher: str | None  # the owner of the watcher lease


def _seconds(later: datetime, earlier: datetime) -> float:
    return max(0.0, (later - earlier).total_seconds())


def last_change(s: StreamState) -> datetime:
    """The latest recorded change of a stream: its file's mtime or its last part."""
    moments = [s.started_at, datetime.fromtimestamp(s.mtime_ns / 1e9, UTC)]
    moments += [p.uploaded_at for p in s.parts.values()]
    return max(moments)


def live_row(s: StreamState, on_disk: int | None, now: datetime) -> LiveRow:
    return LiveRow(
        stream_id=s.stream_id,
        path=s.path,
        status=s.status,
        on_disk=on_disk,
        durable=sum(p.size for p in s.parts.values()),
        parts=len(s.parts),
        age_seconds=_seconds(now, s.started_at),
        lag_seconds=_seconds(now, last_change(s)),
    )


def outcome_row(entry_id: str, event: Outcome, paths: Mapping[str, str]) -> OutcomeRow:
    path = paths.get(event.stream_id)
    if isinstance(event, StreamCompleted):
        return OutcomeRow(id=entry_id, at=event.at, stream_id=event.stream_id,
                          outcome="completed", path=path, key=event.key,
                          size=event.size)  # fmt: skip
    return OutcomeRow(id=entry_id, at=event.at, stream_id=event.stream_id, outcome="failed",
                      path=path, reason=event.reason)  # fmt: skip


def lease_row(fact: LeaseFact, key_prefix: str) -> LeaseRow:
    """``<prefix>:lease:<name>`` holding ``<owner>:<random>`` (owner may contain ``:``)."""
    name = fact.key.removeprefix(f"{key_prefix}:lease:")
    owner = fact.value.rpartition(":")[0] or fact.value
    return LeaseRow(name=name, owner=owner, ttl_seconds=max(0, fact.pttl_ms) / 1000)


def build(facts: Facts) -> Status:
    """The status model from the raw facts (pure)."""
    now = facts.now
    leases = sorted(
        (lease_row(f, facts.key_prefix) for f in facts.leases), key=lambda r: (r.name, r.owner)
    )
    held: dict[str, list[str]] = {}
    for lease in leases:
        held.setdefault(lease.owner, []).append(lease.name)
    replicas = [
        ReplicaRow(
            replica=h.replica,
            version=h.version,
            started_at=h.started_at,
            seen_seconds_ago=None if h.at is None else _seconds(now, h.at),
            watching=h.watching,
            last_upload_at=h.last_upload_at,
            blocked=h.blocked,
            leases=held.get(h.replica, []),
        )
        for h in sorted(facts.heartbeats, key=lambda h: h.replica)
    ]
    blocked = [
        BlockedRow(
            replica=h.replica,
            cause=h.blocked.cause,
            since=h.blocked.since,
            message=h.blocked.message,
        )
        for h in facts.heartbeats
        if h.blocked is not None
    ]
    live = sorted(
        (live_row(s, facts.on_disk.get(s.path), now) for s in facts.live),
        key=lambda r: (r.path, r.stream_id),
    )
    return Status(
        at=now,
        live=live,
        recent=[outcome_row(i, e, facts.paths) for i, e in facts.outcomes],
        backlog=sorted(facts.groups, key=lambda g: g.name),
        replicas=replicas,
        leases=leases,
        blocked=sorted(blocked, key=lambda b: b.replica),
        watcher=next((lease.owner for lease in leases if lease.name == "watcher"), None),
    )


# -- rendering (pure) --------------------------------------------------------------


def size_text(n: int | None) -> str:
    if n is None:
        return "gone"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _when(value: datetime | None, now: datetime) -> str:
    return "-" if value is None else f"{age_text(_seconds(now, value))} ago"


def renderable(status: Status) -> RenderableType:
    """The status as rich tables (shared by the text output and ``--watch``)."""
    now = status.at
    parts: list[RenderableType] = []
    headline = Text(f"cefmp4 status at {now.isoformat(timespec='seconds')}", style="bold")
    parts.append(headline)
    if status.blocked:
        for b in status.blocked:
            parts.append(Text(
                f"BLOCKED {b.replica}: {b.cause} since {_when(b.since, now)}: {b.message}",
                style="bold red",
            ))  # fmt: skip
    else:
        parts.append(Text("not blocked", style="green"))

    live = Table(title=f"live streams ({len(status.live)})", title_justify="left", expand=False)
    for column in ("path", "status", "on disk", "durable", "parts", "age", "lag"):
        live.add_column(column, justify="left" if column in ("path", "status") else "right")
    for r in status.live:
        live.add_row(r.path, r.status, size_text(r.on_disk), size_text(r.durable), str(r.parts),
                     age_text(r.age_seconds), age_text(r.lag_seconds))  # fmt: skip
    parts.append(live)

    recent = Table(title="recent outcomes (newest first)", title_justify="left")
    for column in ("when", "outcome", "path / key", "size / reason"):
        recent.add_column(column)
    for o in status.recent:
        where = o.path or o.key or o.stream_id
        what = size_text(o.size) if o.outcome == "completed" else (o.reason or "")
        style = "red" if o.outcome == "failed" else None
        recent.add_row(_when(o.at, now), Text(o.outcome, style=style or ""), where, what)
    parts.append(recent)

    backlog = Table(title="backlog", title_justify="left")
    for column in ("group", "pending", "lag", "consumers"):
        backlog.add_column(column, justify="left" if column == "group" else "right")
    for g in status.backlog:
        backlog.add_row(g.name, str(g.pending), "?" if g.lag is None else str(g.lag),
                        str(g.consumers))  # fmt: skip
    parts.append(backlog)

    replicas = Table(title=f"replicas ({len(status.replicas)})", title_justify="left")
    for column in ("replica", "version", "up", "seen", "watching", "last upload", "leases"):
        replicas.add_column(column)
    for rep in status.replicas:
        replicas.add_row(
            rep.replica + (" (blocked)" if rep.blocked else ""),
            rep.version,
            age_text(_seconds(now, rep.started_at)),
            "-" if rep.seen_seconds_ago is None else f"{age_text(rep.seen_seconds_ago)} ago",
            "yes" if rep.watching else "no",
            _when(rep.last_upload_at, now),
            ", ".join(rep.leases) or "-",
        )  # fmt: skip
    parts.append(replicas)

    leases = Table(title=f"leases ({len(status.leases)})", title_justify="left")
    for column in ("lease", "owner", "ttl"):
        leases.add_column(column)
    for lease in status.leases:
        leases.add_row(lease.name, lease.owner, f"{lease.ttl_seconds:.1f}s")
    parts.append(leases)
    return Group(*parts)


def render_text(status: Status, width: int = 120) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False,
                      highlight=False)  # fmt: skip
    console.print(renderable(status))
    return buffer.getvalue()


_json = msgspec.json.Encoder()


def render_json(status: Status) -> str:
    return _json.encode(status).decode()


# -- I/O --------------------------------------------------------------------------


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def read_groups(redis: aioredis.Redis, events_key: str) -> list[GroupFact]:
    async def read() -> list[dict[str, Any]]:
        try:
            return list(await redis.xinfo_groups(events_key))
        except rexc.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return []  # no log yet
            raise

    groups = await call_redis(read, attempts=3)
    return [
        GroupFact(
            name=_text(g["name"]),
            pending=int(g.get("pending") or 0),
            lag=None if g.get("lag") is None else int(g["lag"]),
            consumers=int(g.get("consumers") or 0),
        )
        for g in groups
    ]


async def read_leases(redis: aioredis.Redis, key_prefix: str) -> list[LeaseFact]:
    async def read() -> list[LeaseFact]:
        pattern = "".join(f"\\{c}" if c in "*?[]\\" else c for c in key_prefix) + ":lease:*"
        keys = [k async for k in redis.scan_iter(match=pattern, count=1000)]
        if not keys:
            return []
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)
            replies = await pipe.execute()
        facts = []
        for key, value, pttl in zip(keys, replies[::2], replies[1::2], strict=True):
            if value is not None:  # expired between SCAN and GET
                facts.append(LeaseFact(_text(key), _text(value), int(pttl)))
        return facts

    return await call_redis(read, attempts=3)


async def read_outcomes(
    redis: aioredis.Redis, events_key: str, count: int, *, limit: int = TAIL_SCAN_LIMIT
) -> list[tuple[str, Outcome]]:
    """The newest ``count`` completions and failures in Redis, newest first,
    reading at most ``limit`` entries backwards from the end."""
    found: list[tuple[str, Outcome]] = []
    upper, scanned, page = "+", 0, 1000
    while len(found) < count and scanned < limit:
        entries = await call_redis(
            lambda u=upper: redis.xrevrange(events_key, u, "-", count=page),  # type: ignore[misc]
            attempts=3,
        )
        if not entries:
            break
        for entry_id, raw_fields in entries:
            fields = {_bytes(k): _bytes(v) for k, v in (raw_fields or {}).items()}
            if fields.get(b"type") in (b"StreamCompleted", b"StreamFailed"):
                event = CODEC.decode(fields)
                if isinstance(event, StreamCompleted | StreamFailed):
                    found.append((_text(entry_id), event))
        scanned += len(entries)
        upper = f"({_text(entries[-1][0])}"
    return found[:count]


def stream_paths(projection: Projection) -> dict[str, str]:
    """Stream id -> path for every stream or file record the projection holds."""
    paths = {record.stream_id: path for path, record in projection.files.items()}
    paths.update({s.stream_id: s.path for s in projection.streams.values()})
    return paths


async def gather(
    config: Config, redis: aioredis.Redis, *, recent: int, now: datetime | None = None
) -> Facts:
    events = EventLog(redis, config.events_key, config.replica)
    # Read-only, from the newest snapshot plus the tail (as gc and retry do).
    projection = await LiveProjection(
        events,
        snapshots=SnapshotStore(redis, snapshot_key(config.redis_key_prefix), config.events_key),
    ).catch_up()
    live = projection.live()

    def sizes() -> dict[str, int | None]:
        result: dict[str, int | None] = {}
        for s in live:
            try:
                st = files.stat(s.path)
            except files.FileUnreadable:
                st = None
            result[s.path] = None if st is None else st.size
        return result

    on_disk = await asyncio.to_thread(sizes)
    outcomes = await read_outcomes(redis, config.events_key, recent)
    groups = await read_groups(redis, config.events_key)
    leases = await read_leases(redis, config.redis_key_prefix)
    heartbeats = await read_heartbeats(redis, config.redis_key_prefix)
    return Facts(
        now=now or utcnow(),
        live=live,
        on_disk=on_disk,
        paths=stream_paths(projection),
        outcomes=outcomes,
        groups=groups,
        leases=leases,
        heartbeats=heartbeats,
        key_prefix=config.redis_key_prefix,
    )


async def _watch(config: Config, redis: aioredis.Redis, recent: int, out: TextIO) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        console = Console(file=out)
        status = build(await gather(config, redis, recent=recent))
        with Live(renderable(status), console=console, auto_refresh=False) as live:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WATCH_SECONDS):
                        await stop.wait()
                if stop.is_set():
                    break
                status = build(await gather(config, redis, recent=recent))
                live.update(renderable(status), refresh=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run_status(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """The command: 0 when shown, 2 when Redis cannot be read (one line on stderr)."""
    try:
        async with probed_redis(config) as redis:
            if args.watch:
                await _watch(config, redis, args.recent, out)
                return 0
            status = build(await gather(config, redis, recent=args.recent))
    except CefError as exc:
        print(f"cefmp4 status: {exc}", file=sys.stderr)
        return 2
    out.write(render_json(status) + "\n" if args.json else render_text(status))
    return 0


def add_parser(commands: Any) -> None:
    status = commands.add_parser(
        "status", help="live streams, recent outcomes, backlog, replicas, leases (read-only)"
    )
    mode = status.add_mutually_exclusive_group()
    mode.add_argument("--json", action="store_true", help="one JSON document")
    mode.add_argument("--watch", action="store_true", help="refresh in place every 2 s")
    status.add_argument(
        "--recent",
        type=int,
        default=DEFAULT_RECENT,
        metavar="N",
        help=f"how many recent completions/failures to show (default {DEFAULT_RECENT})",
    )
