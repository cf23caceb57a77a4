"""``cefmp4 retry``: ask for another attempt at recordings that failed.

A stream fails for good only for reasons that belong to its recording (the
file could not be read, it was empty at the idle timeout, S3 rejected it as
such); a blocked deployment (credentials, permissions, clock skew, a missing
bucket) is waited out instead and needs no retry. Once the cause is fixed -
the file's permissions, say - this command appends one ``RetryRequested``
per chosen stream. It creates nothing itself: the watcher, the only writer
of new streams, sees the request in the projection's record of the file and
starts a new stream for it, as for a new recording, at its next look at
the file (a notification or the rescan, so within RESCAN_INTERVAL_SECONDS);
the failed stream and its events stay as they were (the audit trail).

Which streams: ``STREAM_ID`` or ``PATH`` (absolute, or relative to the
current directory) of a failed recording, or ``--all-failed``. Only failed
recordings whose file is still on disk have a record; one whose file is gone
has nothing left to retry. Exit 0 when at least one retry was requested, 1
when nothing matched, 2 on bad configuration.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from cefmp4.adapters.eventlog import EventLog
from cefmp4.domain.config import Config
from cefmp4.domain.events import RetryRequested
from cefmp4.runtime.service import connect
from consumers.deps import utcnow
from projections.live import LiveProjection
from projections.snapshots import SnapshotStore, snapshot_key
from projections.streams import FileRecord


def add_parser(commands: Any) -> None:
    retry = commands.add_parser(
        "retry", help="ask for another attempt at failed recordings whose file is still there"
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("target", nargs="?", metavar="STREAM_ID|PATH", help="one failed stream")
    which.add_argument("--all-failed", action="store_true", help="every failed recording")


def select(
    files: Mapping[str, FileRecord], target: str | None, *, all_failed: bool
) -> list[tuple[str, FileRecord]]:
    """The failed records ``target`` names (a stream id or a path), or all of them (pure)."""
    failed = sorted((p, r) for p, r in files.items() if r.status == "failed")
    if all_failed:
        return failed
    return [(p, r) for p, r in failed if target in (r.stream_id, p)]


async def run_retry(
    config: Config, args: argparse.Namespace, out: TextIO, *, cwd: Path | None = None
) -> int:
    target: str | None = args.target
    if target is not None and "/" in target:
        target = str((cwd or Path.cwd()) / target) if not os.path.isabs(target) else target
    async with connect(config) as (redis, _store):
        events = EventLog(redis, config.events_key, config.replica)
        # Read-only: from the newest snapshot plus the tail, as the service does.
        projection = await LiveProjection(
            events,
            snapshots=SnapshotStore(
                redis, snapshot_key(config.redis_key_prefix), config.events_key
            ),
        ).catch_up()
        chosen = select(projection.files, target, all_failed=args.all_failed)
        for path, record in chosen:
            if record.retry:
                print(f"already requested  {record.stream_id}  {path}", file=out)
                continue
            await events.append(RetryRequested(stream_id=record.stream_id, at=utcnow(), path=path))
            reason = record.failure_reason or "unknown reason"
            print(f"retry requested    {record.stream_id}  {path}  (failed: {reason})", file=out)
    if not chosen:
        what = "no failed recordings" if args.all_failed else f"no failed recording {target}"
        print(f"{what} with its file still on disk", file=out)
        return 1
    return 0
