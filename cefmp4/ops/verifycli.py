"""``cefmp4 verify``: does each object equal its file, and what the log recorded?

For each completed recording chosen (``PATH...``, ``--stream ID``, or every
``StreamCompleted`` of the last ``--since`` period) it checks, never changing
anything:

* the object exists (HeadObject);
* size: the file's == ``StreamCompleted.size`` == the object's;
* ETag: computed from the file as S3 computes it - the MD5 of the file for a
  single PutObject (``parts == 0``), otherwise the multipart ETag of the part
  MD5s, the parts cut by the same plan the uploader used
  (``partplan.final_parts`` with the plan its ``FileSeen`` recorded) - == the object's ==
  the logged one;
  (S3 and SeaweedFS return MD5 ETags whichever checksum the parts carried);
* checksum: where HEAD reports the object's full-object CRC (``S3_CHECKSUM``
  crc64nvme/crc32c), the file's CRC == it (computed on the same pass);
* with ``--sha256``: the SHA-256 of the file == ``StreamCompleted.sha256``
  == the sidecar's ``sha256`` (unchecked when ``SIDECAR_SHA256`` was off).

Exit 0 when everything matches, 1 when anything differs (the line names the
path and what differs; that wins over 2), 2 when something could not be
checked (no completion recorded for a path, the file is missing, S3 cannot
be reached, or - for a recording seen before plans were recorded -
``CHUNK_SIZE_BYTES`` changed since the upload so the part plan is not the one used).

Where the facts come from
-------------------------
* The projection (newest snapshot plus the tail, read-only) says which
  stream a path's finished recording belongs to, and for recordings whose
  sidecar is pending it holds the completion itself.
* Otherwise the ``StreamCompleted`` entry is searched in the log from a
  bound: the stream's id is its ``FileSeen`` time, so its completion is
  after that (minus ``CLOCK_MARGIN`` for clocks of other replicas); with
  ``--since`` the bound is now minus the period. Entries Redis no longer
  holds (trimmed) are read from the archive (``EventArchive.events``) first.
* Files are read and hashed in a worker thread (hashlib releases the GIL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TextIO

import msgspec
import redis.asyncio as aioredis

from cefmp4.adapters import checksums
from cefmp4.adapters.archive import EventArchive
from cefmp4.adapters.checksums import multipart_etag
from cefmp4.adapters.clients import probed_redis, s3_client
from cefmp4.adapters.eventlog import Entry, EventLog, call_redis
from cefmp4.adapters.s3store import S3Store
from cefmp4.adapters.storage import ObjectInfo, ObjectStore
from cefmp4.domain.config import Config
from cefmp4.domain.durations import duration
from cefmp4.domain.entryids import ZERO_ID, parse_id
from cefmp4.domain.errors import CefError
from cefmp4.domain.events import FileSeen, MetadataWritten, StreamCompleted
from cefmp4.domain.partplan import PartPlan, Span, final_parts
from consumers.deps import utcnow
from projections.live import LiveProjection
from projections.snapshots import SnapshotStore, snapshot_key
from projections.streams import FileRecord, Projection

CLOCK_MARGIN = timedelta(hours=1)
READ_BLOCK = 8 * 1024 * 1024
S3_ATTEMPTS = 3
PAGE = 10_000

Outcome = Literal["ok", "differs", "unchecked"]


# -- the facts and the judgement (pure) ---------------------------------------------


class Expected(msgspec.Struct, frozen=True, kw_only=True):
    """What the log recorded about a completed object."""

    stream_id: str
    key: str
    size: int
    etag: str
    sha256: str
    parts: int  # 0: one PutObject
    sidecar_key: str
    plan: PartPlan | None = None  # FileSeen's; None: recorded none (CHUNK_SIZE_BYTES)


class FileDigest(msgspec.Struct, frozen=True, kw_only=True):
    size: int
    etag: str | None  # None: the part plan is not the upload's (CHUNK_SIZE_BYTES changed)
    sha256: str | None  # only with --sha256
    planned_parts: int
    crcs: dict[str, str] = {}  # tagged whole-file CRC by algorithm


class Finding(msgspec.Struct, frozen=True):
    check: str
    ok: bool | None  # None: could not be checked
    detail: str


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    stream_id: str | None
    key: str | None
    findings: list[Finding]

    @property
    def outcome(self) -> Outcome:
        if any(f.ok is False for f in self.findings):
            return "differs"
        if any(f.ok is None for f in self.findings):
            return "unchecked"
        return "ok"


def spans_for(size: int, parts: int, plan: PartPlan) -> list[Span]:
    """The byte ranges whose MD5s make the object's ETag (one span: a single PUT)."""
    if parts == 0:
        return [Span(1, 0, size)]
    return final_parts(size, plan)


def judge(
    path: str,
    expected: Expected | None,
    digest: FileDigest | None,
    obj: ObjectInfo | None,
    *,
    object_error: str | None = None,
    sidecar_sha256: str | None = None,
    sidecar_error: str | None = None,
    check_sha256: bool = False,
) -> Verdict:
    """The findings for one recording from what was read (pure).

    ``digest`` None: the file is missing; ``obj`` None with no
    ``object_error``: there is no object at the key.
    """
    if expected is None:
        why = "no StreamCompleted for this path in the log or the archive"
        return Verdict(path=path, stream_id=None, key=None, findings=[Finding("log", None, why)])
    findings: list[Finding] = []
    verdict = Verdict(path=path, stream_id=expected.stream_id, key=expected.key, findings=findings)
    if digest is None:
        findings.append(Finding("file", None, "the file is missing"))
    if object_error is not None:
        findings.append(Finding("object", None, f"cannot read the object: {object_error}"))
    elif obj is None:
        findings.append(Finding("object", False, f"no object at {expected.key}"))
    if digest is None or obj is None:
        return verdict
    sizes = {"file": digest.size, "log": expected.size, "object": obj.size}
    findings.append(_same("size", sizes))
    if digest.etag is None and expected.plan is None:
        findings.append(Finding("etag", None, (
            f"the log records {expected.parts} parts, CHUNK_SIZE_BYTES now plans "
            f"{digest.planned_parts} (the recording was seen before part plans were "
            "recorded): set it to the upload's value to check the ETag"
        )))  # fmt: skip
    elif digest.etag is None:
        findings.append(Finding("etag", None, (
            f"the log records {expected.parts} parts, the recording's part plan "
            f"{expected.plan} cuts {digest.planned_parts}"
        )))  # fmt: skip
    else:
        findings.append(
            _same("etag", {"file": digest.etag, "log": expected.etag, "object": obj.etag})
        )
    found = checksums.untag(obj.checksum)
    if found is not None and found[0] in digest.crcs:
        values = {"file": digest.crcs[found[0]], "object": obj.checksum}
        findings.append(_same("checksum", values))
    if check_sha256 and not expected.sha256:
        findings.append(Finding("sha256", None, "not recorded (SIDECAR_SHA256 was off)"))
    elif check_sha256:
        hashes: dict[str, str | int] = {"log": expected.sha256}
        if digest.sha256 is not None:
            hashes["file"] = digest.sha256
        if sidecar_error is not None:
            findings.append(Finding("sidecar", None, f"cannot read the sidecar: {sidecar_error}"))
        elif sidecar_sha256 is None:
            findings.append(Finding("sidecar", False, f"no sha256 in {expected.sidecar_key}"))
        else:
            hashes["sidecar"] = sidecar_sha256
        findings.append(_same("sha256", hashes))
    return verdict


def _same(check: str, values: dict[str, Any]) -> Finding:
    shown = ", ".join(f"{where} {value}" for where, value in values.items())
    if len(set(values.values())) == 1:
        return Finding(check, True, shown)
    return Finding(check, False, shown)


def describe(v: Verdict) -> str:
    """One line per recording."""
    label = {"ok": "OK       ", "differs": "DIFFERS  ", "unchecked": "UNCHECKED"}[v.outcome]
    if v.outcome == "ok":
        size = next((f.detail for f in v.findings if f.check == "size"), "")
        return f"{label} {v.path}  {v.key}  ({size.split(',')[0].removeprefix('file ')} bytes)"
    bad = [f for f in v.findings if f.ok is not True]
    return f"{label} {v.path}: " + "; ".join(f"{f.check}: {f.detail}" for f in bad)


def exit_code(verdicts: Iterable[Verdict]) -> int:
    outcomes = {v.outcome for v in verdicts}
    if "differs" in outcomes:
        return 1
    return 2 if "unchecked" in outcomes or not outcomes else 0


def stream_time(stream_id: str) -> datetime | None:
    """The time in a stream id (``20261124T013709123Z-...``), None if it has none."""
    try:
        return datetime.strptime(stream_id[:19], "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC)
    except ValueError:
        return None


def entry_id_at(moment: datetime) -> str:
    return f"{max(0, int(moment.timestamp() * 1000))}-0"


# -- I/O ------------------------------------------------------------------------------


def digest_file(path: str, parts: int, plan: PartPlan, *, sha256: bool) -> FileDigest | None:
    """Hash the file as S3 hashed the object (blocking: run it in a thread)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        spans = spans_for(size, parts, plan)
        whole = hashlib.sha256() if sha256 else None
        crcs = dict.fromkeys(checksums.CRCS, 0)
        md5s = []
        for span in spans:
            md5 = hashlib.md5(usedforsecurity=False)
            done = 0
            while done < span.size:
                block = os.pread(fd, min(READ_BLOCK, span.size - done), span.offset + done)
                if not block:
                    break  # shrank while reading: the size check says so
                md5.update(block)
                for crc in checksums.CRCS:
                    crcs[crc] = checksums.crc_value(crc, block, crcs[crc])
                if whole is not None:
                    whole.update(block)
                done += len(block)
            md5s.append(md5.hexdigest())
    finally:
        os.close(fd)
    planned = 0 if parts == 0 else len(spans)
    etag: str | None = md5s[0] if parts == 0 else None
    if parts and len(spans) == parts:
        etag = multipart_etag(md5s)
    return FileDigest(
        size=size,
        etag=etag,
        sha256=None if whole is None else whole.hexdigest(),
        planned_parts=planned,
        crcs={crc: checksums.tag(crc, value) for crc, value in crcs.items()},
    )


class Found(msgspec.Struct, kw_only=True):
    """What a log search found about the streams it looked for."""

    completions: dict[str, StreamCompleted] = msgspec.field(default_factory=dict)
    paths: dict[str, str] = msgspec.field(default_factory=dict)
    sidecars: dict[str, str] = msgspec.field(default_factory=dict)
    plans: dict[str, PartPlan] = msgspec.field(default_factory=dict)

    def take(self, event: object, wanted: set[str] | None) -> None:
        stream = getattr(event, "stream_id", None)
        if stream is None or (wanted is not None and stream not in wanted):
            return
        if isinstance(event, StreamCompleted):
            self.completions.setdefault(stream, event)
        elif isinstance(event, FileSeen):
            self.paths.setdefault(stream, event.path)
            if event.plan is not None:
                self.plans.setdefault(stream, event.plan)
        elif isinstance(event, MetadataWritten):
            self.sidecars[stream] = event.key


async def log_entries(
    events: EventLog, redis: aioredis.Redis, archive: EventArchive | None, after: str
) -> AsyncIterator[Entry]:
    """Entries after ``after``: the archive's first when Redis was trimmed past it."""
    cursor = after
    first = await call_redis(lambda: redis.xrange(events.key, "-", "+", count=1), attempts=3)
    # Nothing in Redis, or its oldest entry after the bound: the rest is archived.
    if archive is not None and (not first or parse_id(_text(first[0][0])) > parse_id(after)):
        async for entry_id, event in archive.events(after):
            cursor = entry_id
            yield entry_id, event
    while True:
        page = await events.read_after(cursor, PAGE)
        for entry_id, event in page:
            yield entry_id, event
        if len(page) < PAGE:
            return
        cursor = page[-1][0]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Target(msgspec.Struct, frozen=True):
    path: str
    stream_id: str | None


def targets_of(
    projection: Projection, paths: list[str], streams: list[str]
) -> tuple[list[Target], set[str]]:
    """The chosen recordings; the stream ids whose completion must come from the log."""
    by_stream = {r.stream_id: p for p, r in projection.files.items() if r.status == "completed"}
    targets = []
    for path in paths:
        record = projection.files.get(path)
        stream = record.stream_id if record and record.status == "completed" else None
        if stream is None:
            open_ = projection.for_path(path)
            stream = open_.stream_id if open_ and open_.completion else None
        targets.append(Target(path, stream))
    for stream in streams:
        s = projection.streams.get(stream)
        targets.append(Target(by_stream.get(stream) or (s.path if s else ""), stream))
    wanted = {t.stream_id for t in targets if t.stream_id}
    return targets, {s for s in wanted if not _pending_completion(projection, s)}


def _pending_completion(projection: Projection, stream_id: str) -> bool:
    s = projection.streams.get(stream_id)
    return s is not None and s.completion is not None


def expected_of(
    projection: Projection,
    found: Found,
    stream_id: str | None,
    records: Mapping[str, FileRecord] | None = None,
) -> Expected | None:
    """What the log says of ``stream_id``'s object; ``records``: the
    projection's file records by stream id (where the plan is kept when the
    log no longer has the recording's FileSeen)."""
    if stream_id is None:
        return None
    s = projection.streams.get(stream_id)
    if s is not None and s.completion is not None:
        c = s.completion
        return Expected(stream_id=stream_id, key=s.key, size=c.size, etag=c.etag,
                        sha256=c.sha256, parts=c.parts, plan=s.plan,
                        sidecar_key=s.metadata_key or f"{s.key}.metadata.json")  # fmt: skip
    e = found.completions.get(stream_id)
    if e is None:
        return None
    sidecar = found.sidecars.get(stream_id, f"{e.key}.metadata.json")
    record = (records or {}).get(stream_id)
    plan = found.plans.get(stream_id) or (record.plan() if record is not None else None)
    return Expected(stream_id=stream_id, key=e.key, size=e.size, etag=e.etag, sha256=e.sha256,
                    parts=e.parts, sidecar_key=sidecar, plan=plan)  # fmt: skip


@contextlib.asynccontextmanager
async def open_store(config: Config) -> AsyncIterator[S3Store]:
    async with s3_client(config) as client:
        yield S3Store(client, config.s3_bucket_name, timeout=config.s3_timeout_seconds,
                      attempts=S3_ATTEMPTS)  # fmt: skip


async def _sidecar_sha256(store: ObjectStore, key: str) -> tuple[str | None, str | None]:
    try:
        body = await store.get_object(key)
    except CefError as exc:
        return None, str(exc)
    if body is None:
        return None, None
    try:
        value = json.loads(body).get("sha256")
    except (ValueError, AttributeError):
        return None, None
    return (value if isinstance(value, str) else None), None


async def check_one(
    config: Config, store: ObjectStore, target: Target, expected: Expected | None, sha256: bool
) -> Verdict:
    if expected is None:
        return judge(target.path, None, None, None)
    plan = expected.plan or config.unrecorded_plan
    digest = None
    if target.path:
        digest = await asyncio.to_thread(
            digest_file, target.path, expected.parts, plan, sha256=sha256
        )
    obj, object_error = None, None
    try:
        obj = await store.head_object(expected.key)
    except CefError as exc:
        object_error = str(exc)
    if (
        digest is not None
        and obj is not None
        and digest.etag != obj.etag
        and plan != config.unrecorded_plan
    ):
        # A replica from before plans ignores FileSeen.plan and cuts by its own
        # CHUNK_SIZE_BYTES: an object it completed has that layout. The ETag
        # binds the part MD5s, so a match under either cut proves the bytes.
        other = await asyncio.to_thread(
            digest_file, target.path, expected.parts, config.unrecorded_plan, sha256=sha256
        )
        if other is not None and other.etag == obj.etag:
            digest = other
    sidecar, sidecar_error = None, None
    if sha256 and object_error is None:
        sidecar, sidecar_error = await _sidecar_sha256(store, expected.sidecar_key)
    return judge(target.path or f"(stream {expected.stream_id})", expected, digest, obj,
                 object_error=object_error, sidecar_sha256=sidecar, sidecar_error=sidecar_error,
                 check_sha256=sha256)  # fmt: skip


async def verify(
    config: Config,
    *,
    paths: list[str],
    streams: list[str],
    since: timedelta | None,
    sha256: bool,
    now: datetime | None = None,
) -> list[Verdict]:
    now = now or utcnow()
    async with probed_redis(config) as redis, open_store(config) as store:
        events = EventLog(redis, config.events_key, config.replica)
        archive = EventArchive(store, config.event_archive_prefix)
        # Read-only, as the service restores: the snapshot, else the archive, then Redis.
        projection = await LiveProjection(
            events,
            snapshots=SnapshotStore(
                redis, snapshot_key(config.redis_key_prefix), config.events_key
            ),
            history=archive.events,
        ).catch_up()
        targets, wanted = targets_of(projection, paths, streams)
        found = Found()
        if since is not None:
            async for _, event in log_entries(events, redis, archive, entry_id_at(now - since)):
                found.take(event, None)
            # Recordings that began before the window: their FileSeen (the
            # plan they were cut by) is older than it.
            began_before = {s for s in found.completions if s not in found.paths}
            if began_before:
                await _find(found, events, redis, archive, began_before)
            by_stream = {r.stream_id: p for p, r in projection.files.items()}
            for stream in found.completions:
                path = by_stream.get(stream) or found.paths.get(stream, "")
                targets.append(Target(path, stream))
        elif wanted:
            await _find(found, events, redis, archive, wanted)
        for i, t in enumerate(targets):
            if not t.path and t.stream_id in found.paths:
                targets[i] = Target(found.paths[t.stream_id], t.stream_id)
        records = {r.stream_id: r for r in projection.files.values()}
        return [
            await check_one(
                config, store, t, expected_of(projection, found, t.stream_id, records), sha256
            )
            for t in targets
        ]


async def _find(
    found: Found,
    events: EventLog,
    redis: aioredis.Redis,
    archive: EventArchive,
    wanted: set[str],
) -> None:
    """Read the log from the start of the earliest ``wanted`` stream (its id
    says when) until each one's FileSeen and completion are found."""
    times = [stream_time(s) for s in wanted]
    bound = (
        ZERO_ID
        if any(t is None for t in times)
        else entry_id_at(min(t for t in times if t) - CLOCK_MARGIN)
    )
    async for _, event in log_entries(events, redis, archive, bound):
        found.take(event, wanted)
        if wanted <= found.completions.keys() and wanted <= found.paths.keys():
            break


async def run_verify(
    config: Config, args: argparse.Namespace, out: TextIO, *, cwd: Path | None = None
) -> int:
    base = cwd or Path.cwd()
    paths = [p if os.path.isabs(p) else str(base / p) for p in args.paths]
    try:
        verdicts = await verify(config, paths=paths, streams=args.stream, since=args.since,
                                sha256=args.sha256)  # fmt: skip
    except CefError as exc:
        print(f"cefmp4 verify: {exc}", file=sys.stderr)
        return 2
    if args.json:
        doc = [{**msgspec.to_builtins(v), "outcome": v.outcome} for v in verdicts]
        out.write(json.dumps(doc) + "\n")
    else:
        for v in verdicts:
            print(describe(v), file=out)
        if not verdicts:
            print("nothing to verify", file=out)
    return exit_code(verdicts)


def add_parser(commands: Any) -> None:
    verify = commands.add_parser(
        "verify", help="compare objects with their files and with the log (read-only)"
    )
    verify.add_argument("paths", nargs="*", metavar="PATH", help="a recording on disk")
    verify.add_argument(
        "--stream", action="append", default=[], metavar="ID", help="a stream id (repeatable)"
    )
    verify.add_argument(
        "--since",
        type=duration,
        default=None,
        metavar="AGE",
        help="every recording completed in the last AGE, e.g. 24h",
    )
    verify.add_argument(
        "--sha256", action="store_true", help="also the SHA-256 (file, log, sidecar)"
    )
    verify.add_argument("--json", action="store_true", help="one JSON document")
