"""The event archive: log entries kept in S3 before Redis trims them.

Why
---
The log is trimmed (``projections.snapshots.trim``) so that Redis holds a
recent window and a restart replays only a tail. The log is also the audit
trail of every recording. So before entries are trimmed they are written to
the bucket as append-only segments of the same JSON the log carries
(``cefmp4.domain.archive_format``: gzip JSON lines, keys named by first and last
id), under ``EVENT_ARCHIVE_PREFIX``, which the config keeps disjoint from
``S3_KEY_PREFIX`` so recordings and archive never mix.

Design
------
* The remote is the truth. How far the archive goes (:meth:`EventArchive.
  archived_through`) is read from the bucket listing, from the last id in
  the segment names, not from a marker in Redis that could disagree with
  what is actually stored: trimming relies on it, and a wrong answer there
  loses entries for good. Only the last key seen is kept in memory, so the
  next call lists just the keys after it, not every segment again.
* Segments are only ever added. :func:`archive_through` reads what follows
  the archive out of Redis (ids below a bound) and writes it in segments of
  at most ``max_segment_entries``, each after the one before; the return
  value is the newest id stored, exactly, so the caller may trim everything
  up to it. A second call with the same bound writes nothing.
* Overlap is allowed and harmless. A segment can repeat entries another one
  holds: two replicas archiving at once from the same listing, or a retried
  PutObject. Same first and last id means the same key and the same bytes
  (deterministic gzip), so an overwrite changes nothing; otherwise
  :meth:`EventArchive.read` drops every id not greater than the last one it
  yielded, so each entry comes out once, in id order.
* Erring low is safe, erring high is not. ``archived_through`` is the
  greatest last id of the keys it has listed. A segment written concurrently
  by another replica whose key sorts before the last one seen is missed by
  the incremental listing; that can only make the answer lower than the
  truth (less is trimmed, and the next run rewrites some entries, which read
  deduplicates), never higher.
* Gaps are not invented: the archive starts at the first entry Redis still
  held when archiving began, and a segment that disappears between listing
  and fetching (deleted by hand, a lifecycle rule) is skipped by ``read``.
* CPU work (gzip, JSON) runs in a worker thread; the next segment is fetched
  while the current one is being consumed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import AsyncIterator

from cefmp4.adapters.eventlog import Entry, EventLog
from cefmp4.adapters.storage import ObjectStore
from cefmp4.domain.archive_format import (
    RawEntry,
    decode_segment,
    encode_segment,
    fresh,
    parse_segment_key,
    segment_key,
)
from cefmp4.domain.entryids import ZERO_ID, format_id, parse_id
from cefmp4.domain.events import decode

CONTENT_TYPE = "application/gzip"


class EventArchive:
    """The segments under ``prefix`` in ``store``'s bucket."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self._store = store
        self.prefix = prefix
        self._last_key = ""  # the greatest key listed so far
        self._through = parse_id(ZERO_ID)  # the greatest last id among those keys

    async def archived_through(self) -> str:
        """The newest entry id archived, ``"0-0"`` if none (from the listing)."""
        keys = await self._store.list_keys(self.prefix, start_after=self._last_key)
        for key in keys:
            span = parse_segment_key(self.prefix, key)
            if span is not None:
                self._through = max(self._through, parse_id(span[1]))
        if keys:
            self._last_key = keys[-1]
        return format_id(self._through)

    async def write(self, entries: list[RawEntry]) -> str | None:
        """Store ``entries`` (in id order) as one segment; its key, None if empty."""
        if not entries:
            return None
        key = segment_key(self.prefix, entries[0].id, entries[-1].id)
        body = await asyncio.to_thread(encode_segment, entries)
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        await self._store.put_object(key, body, md5, CONTENT_TYPE)
        return key

    async def _segment(self, key: str) -> list[RawEntry]:
        body = await self._store.get_object(key)
        if body is None:
            return []  # gone since the listing: see the module docstring
        return await asyncio.to_thread(decode_segment, body)

    async def read(self, after: str = ZERO_ID) -> AsyncIterator[RawEntry]:
        """Every archived entry with an id greater than ``after``, in id order,
        each id once; segments that end at or before ``after`` are not fetched."""
        cursor = parse_id(after)
        keys = []
        for key in await self._store.list_keys(self.prefix):
            span = parse_segment_key(self.prefix, key)
            if span is not None and parse_id(span[1]) > cursor:
                keys.append(key)
        if not keys:
            return
        pending = asyncio.ensure_future(self._segment(keys[0]))
        try:
            for following in [*keys[1:], None]:
                entries = await pending
                if following is not None:
                    pending = asyncio.ensure_future(self._segment(following))
                kept, cursor = fresh(entries, cursor)
                for entry in kept:
                    yield entry
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending

    async def events(self, after: str = ZERO_ID) -> AsyncIterator[Entry]:
        """``read``, decoded as the log's entries are: for a replay when the log
        was trimmed and no snapshot can be used (the archive holds the rest)."""
        async for raw in self.read(after):
            fields = {
                b"type": raw.type.encode(),
                b"v": str(raw.v).encode(),
                b"data": bytes(raw.data),
            }
            yield raw.id, decode(fields)


async def archive_through(
    log: EventLog, archive: EventArchive, bound: str, *, max_segment_entries: int = 50_000
) -> str:
    """Archive every entry with an id below ``bound`` that is not archived yet,
    in segments of at most ``max_segment_entries``; return the new
    ``archived_through`` (the newest id the archive now holds, ``"0-0"`` if none).

    Call it before ``XTRIM MINID bound`` and trim no further than the entry
    after the returned id: entries above it are not in the archive.
    """
    through = await archive.archived_through()
    while True:
        entries = await log.read_raw_after(through, max_segment_entries, until=bound)
        if not entries:
            return through
        await archive.write(entries)
        through = entries[-1].id
