"""Projection snapshots in Redis, and the retention they make possible.

Why: every replica folds the whole log at start-up, so start-up time grows
with the log. A snapshot is the folded ``Projection`` as of one entry id; a
restart decodes it and reads only the entries after that id (the tail). The
log stays the source of truth: a snapshot that cannot be used (missing,
corrupt, another schema, ahead of the log) is ignored with a warning and the
log is replayed from its first entry, which gives the same projection as long
as the log is whole (``EVENT_RETENTION_DAYS=0``, the default).

Format: one string key ``<prefix>:snapshot`` holding the msgpack array
``[schema, last_id, projection]`` (``_Snapshot``), ``projection`` being the
``Projection`` struct as msgspec encodes it (its own ``last_id`` and
``events`` included). ``SCHEMA_VERSION`` changes whenever a decoder of the old
layout could misread the new one (a field changing meaning or type); adding
an optional field with a default does not need it. The header comes first so
that it can be read without the body: Redis' Lua ``cmsgpack.unpack_limit``
decodes just the two header items of a ``GETRANGE`` prefix.

Writes are monotonic: ``_SAVE`` (Lua, so read-compare-SET is atomic) replaces
the stored snapshot only if the new one's ``last_id`` is strictly newer, or
if what is stored has no readable header. Several replicas may therefore
snapshot independently; the newest wins, and an older one arriving late never
replaces it. Ids are compared as ``(ms, seq)`` integers (``parse_id`` here,
length-then-lexicographic on the digit strings in Lua, which is the same
order for Redis' canonical ids).

Retention (``trim``): ``XTRIM MINID`` to the smallest of

* the ``last_id`` the caller just stored a snapshot for (the stored snapshot
  is at least that new, so everything older is folded into it),
* now (Redis' clock, which made the ids) minus the retention period,
* for every consumer group, its oldest pending entry, else its last
  delivered id: an entry a group has not acknowledged is work not yet done,
  and trimming it would silently drop that work;
* the entry after the last one archived, when an ``archive`` is given: the
  caller's archiver is asked to archive everything below the other bounds
  first (``cefmp4.adapters.archive``), and what it could not archive stays.

MINID keeps the bound itself, so the entry at the snapshot's ``last_id``
stays. Bounds only move forward (groups advance, time advances, snapshots
are monotonic), so reading them without a transaction is safe. Once
anything was trimmed, a replay from scratch is no longer complete: ``LogInfo``
tells ``LiveProjection`` so and it says so loudly when it has no snapshot.

Redis errors are translated as in ``cefmp4.adapters.eventlog``: connection problems
and timeouts are ``TransientError`` (retried), the rest ``PermanentError``.
Loading retries until Redis answers (a process cannot start without its
projection); saving and trimming give up after a few attempts, because they
are an optimisation and must not stall the caller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple, TypeVar

import msgspec
import redis.asyncio as aioredis
import redis.exceptions as rexc
import structlog

from cefmp4.adapters.eventlog import call_redis
from cefmp4.domain.entryids import EntryId, format_id, parse_id
from cefmp4.domain.errors import CefError, PermanentError
from projections.streams import Projection

log = structlog.get_logger(__name__)

T = TypeVar("T")

# 2: the projection holds open streams and records of finished files (v1 held
# every stream ever); a v1 snapshot is ignored and the log replayed.
SCHEMA_VERSION = 2
# Attempts for the optional writes (snapshot, trim); loading retries forever.
WRITE_ATTEMPTS = 3
# Enough of the value for the header: 1 (array) + 9 (schema) + 2 + 41 (id).
_HEADER_BYTES = 64

# Archive every entry older than the given id; return the id through which the
# log is archived ("0-0": nothing). See cefmp4.adapters.archive.archive_through.
Archiver = Callable[[str], Awaitable[str]]


class UnusableSnapshot(CefError):
    """The stored value is not a snapshot this version can use."""


class _Header(msgspec.Struct, array_like=True):
    schema: int
    last_id: str


class _Snapshot(msgspec.Struct, array_like=True):
    schema: int
    last_id: str
    projection: Projection


class LogInfo(NamedTuple):
    """What ``XINFO STREAM`` says about the log, as far as restoring cares."""

    last_generated_id: str  # "0-0" for a log that does not exist
    length: int
    trimmed: bool  # entries were removed: a replay from the first entry is partial


class TrimResult(NamedTuple):
    minid: str | None  # None: nothing may be trimmed yet
    removed: int
    limited_by: str  # "snapshot", "retention", "archive" or "group <name>"


# -- pure functions -----------------------------------------------------------


def encode_snapshot(projection: Projection) -> bytes:
    parse_id(projection.last_id)  # never store a header the Lua guard cannot read
    return msgspec.msgpack.encode(_Snapshot(SCHEMA_VERSION, projection.last_id, projection))


def decode_snapshot(raw: bytes) -> Projection:
    """The projection in ``raw``; ``UnusableSnapshot`` says why it cannot be used."""
    try:
        header = msgspec.msgpack.decode(raw, type=_Header)
    except msgspec.DecodeError as exc:
        raise UnusableSnapshot(f"undecodable header: {exc}") from None
    if header.schema != SCHEMA_VERSION:
        raise UnusableSnapshot(f"schema {header.schema}, this version reads {SCHEMA_VERSION}")
    try:
        snapshot = msgspec.msgpack.decode(raw, type=_Snapshot)
    except msgspec.DecodeError as exc:
        raise UnusableSnapshot(f"undecodable body: {exc}") from None
    if snapshot.projection.last_id != snapshot.last_id:
        raise UnusableSnapshot(
            f"header id {snapshot.last_id} != projection id {snapshot.projection.last_id}"
        )
    try:
        parse_id(snapshot.last_id)
    except ValueError as exc:
        raise UnusableSnapshot(str(exc)) from None
    return snapshot.projection


def group_bound(pending_min: str | None, last_delivered: str) -> str:
    """The oldest entry a consumer group may still need."""
    return pending_min if pending_min is not None else last_delivered


def trim_bound(
    covered_id: str, now_ms: int, retention_ms: int, groups: Iterable[tuple[str, str]] = ()
) -> tuple[str | None, str]:
    """(MINID, what limited it) for XTRIM: entries strictly older than MINID may go.

    ``covered_id`` is the newest id a stored snapshot includes, ``groups``
    (name, bound) pairs from :func:`group_bound`. ``None`` when the bound is
    the very start of the log.
    """
    candidates: list[tuple[EntryId, str]] = [
        (parse_id(covered_id), "snapshot"),
        ((max(now_ms - retention_ms, 0), 0), "retention"),
        *((parse_id(bound), f"group {name}") for name, bound in groups),
    ]
    bound, why = min(candidates, key=lambda c: c[0])
    return (None if bound <= (0, 0) else format_id(bound)), why


# -- Redis --------------------------------------------------------------------

# KEYS: snapshot. ARGV: new last id (canonical), new value.
# Returns 1 if stored, 0 if the stored snapshot is as new or newer.
_SAVE = """
local function older(a, b)
  local am, as = string.match(a, '^(%d+)%-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)%-(%d+)$')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local head = redis.call('GETRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1)
if #head > 0 and string.byte(head, 1) == 0x93 then
  local ok, _, schema, stored = pcall(cmsgpack.unpack_limit, head, 2, 1)
  if ok and type(stored) == 'string' and string.match(stored, '^%d+%-%d+$')
     and not older(stored, ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


def snapshot_key(key_prefix: str) -> str:
    return f"{key_prefix}:snapshot"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SnapshotStore:
    """Load, save (monotonic) and retention for one deployment's snapshot key."""

    def __init__(self, redis: aioredis.Redis, key: str, events_key: str) -> None:
        self._redis = redis
        self.key = key
        self.events_key = events_key
        self._save = redis.register_script(_SAVE)

    async def load(self) -> Projection | None:
        """The stored projection, or None (missing or unusable: replay the log)."""
        raw = await call_redis(lambda: self._redis.get(self.key), attempts=None)
        if raw is None:
            return None
        if not isinstance(raw, bytes):  # only with decode_responses=True, which breaks msgpack
            raise PermanentError("snapshots need a Redis client without decode_responses")
        try:
            return decode_snapshot(raw)
        except UnusableSnapshot as exc:
            log.warning(
                "ignoring the stored snapshot; replaying the log",
                key=self.key,
                reason=str(exc),
                size=len(raw),
            )
            return None

    async def save(self, projection: Projection) -> bool:
        """Store ``projection`` unless the stored snapshot is as new; True if stored."""
        return await self.save_encoded(projection.last_id, encode_snapshot(projection))

    async def save_encoded(self, last_id: str, value: bytes) -> bool:
        """``save`` of ``encode_snapshot``'s output (encode where the cut is consistent)."""
        args: list[bytes | str | int] = [format_id(parse_id(last_id)), value, _HEADER_BYTES]
        stored = await call_redis(
            lambda: self._save(keys=[self.key], args=args), attempts=WRITE_ATTEMPTS
        )
        return bool(stored)

    async def log_info(self) -> LogInfo:
        async def info() -> LogInfo:
            try:
                raw: dict[str, Any] = await self._redis.xinfo_stream(self.events_key)
            except rexc.ResponseError as exc:
                if "no such key" not in str(exc).lower():
                    raise
                return LogInfo("0-0", 0, trimmed=False)
            length = int(raw["length"])
            added = raw.get("entries-added")  # Redis >= 7
            deleted = _text(raw.get("max-deleted-entry-id", b"0-0"))
            trimmed = (added is not None and int(added) > length) or deleted != "0-0"
            return LogInfo(_text(raw["last-generated-id"]), length, trimmed)

        return await call_redis(info, attempts=None)

    async def trim(
        self, covered_id: str, retention_seconds: float, archive: Archiver | None = None
    ) -> TrimResult:
        """XTRIM MINID: drop entries older than the retention period that the
        snapshot at ``covered_id`` covers, no consumer group still needs and,
        with ``archive``, that are archived (it is asked to archive them first)."""

        async def bounds() -> tuple[int, list[tuple[str, str]]]:
            seconds, micros = await self._redis.time()
            groups: list[tuple[str, str]] = []
            try:
                infos = await self._redis.xinfo_groups(self.events_key)
            except rexc.ResponseError as exc:
                if "no such key" not in str(exc).lower():
                    raise
                infos = []  # no log yet: nothing to trim, and the XTRIM below is a no-op
            for group in infos:
                name = _text(group["name"])
                pending_min: str | None = None
                if int(group["pending"]):
                    summary = await self._redis.xpending(self.events_key, name)
                    pending_min = None if summary["min"] is None else _text(summary["min"])
                groups.append((name, group_bound(pending_min, _text(group["last-delivered-id"]))))
            return seconds * 1000 + micros // 1000, groups

        now_ms, groups = await call_redis(bounds, attempts=WRITE_ATTEMPTS)
        minid, why = trim_bound(covered_id, now_ms, round(retention_seconds * 1000), groups)
        if minid is None:
            return TrimResult(None, 0, why)
        if archive is not None:
            archived = parse_id(await archive(minid))
            after_archived = (archived[0], archived[1] + 1)
            if after_archived < parse_id(minid):
                minid, why = format_id(after_archived), "archive"
        removed = await call_redis(
            lambda: self._redis.xtrim(self.events_key, minid=minid, approximate=False),
            attempts=WRITE_ATTEMPTS,
        )
        return TrimResult(minid, int(removed), why)
