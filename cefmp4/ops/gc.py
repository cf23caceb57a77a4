"""``cefmp4 gc``: abort the multipart uploads the log no longer needs.

Why
---
An open multipart upload costs storage for its parts until someone completes
or aborts it. The service aborts what it abandons, but a crash at the wrong
moment, an upload replaced after the store lost track of it, or a hand-made
upload under the prefix can leave one behind. This command finds them.

Design
------
* The log decides. The uploads under ``S3_KEY_PREFIX`` are compared with the
  projection replayed from ``<prefix>:events`` by one pure function,
  :func:`plan_gc`; everything else here is I/O around it. Each upload gets one
  :class:`GcDecision`: what the log says about it (``reason``) and what to do
  (``action``).
* What the log says, per upload (matched by object key to the projection's
  streams and to its records of finished files; a finished stream whose
  file left the disk is forgotten, so its leftover upload is ``unknown_key``,
  which aborts it all the same):

    - ``unknown_key``: no stream has this key -> abort
    - ``stream_completed``: its stream completed, the object exists -> abort
    - ``stream_failed``: its stream failed, no object will come of it -> abort
    - ``replaced_upload``: its live stream records another upload -> abort
    - ``current_upload``: the upload its live stream records -> keep
    - ``not_recorded``: its live stream records no upload yet; the uploader
      adopts one such upload and aborts the rest (``Uploads.ensure_upload``),
      so aborting here would only throw away parts it can reuse -> keep

* Age guard: only uploads initiated at least ``older_than`` before ``now``
  may be aborted; a younger one is kept whatever the log says, so an upload
  whose ``UploadStarted`` (or whose stream's ``FileSeen``) is not yet in the
  log, or not yet folded, is never touched. ``Initiated`` is the store's
  clock, ``now`` this host's: keep ``older_than`` well above any clock skew.
* Order of reads: the uploads are listed *before* the log is replayed, so
  every fact written before an upload was listed is seen by the plan.
* Dry run by default: the plan is printed, one line per upload to abort, and
  a summary. ``apply`` aborts them one by one; ``NoSuchUpload`` means someone
  (the service, a lifecycle rule, another gc) was first, which is the goal.
* Assumptions: this deployment's log owns ``S3_KEY_PREFIX`` in the bucket
  (another deployment writing under the same prefix would look unknown). The
  projection starts from the newest snapshot, as the service's does, so log
  retention (which never trims past the snapshot) does not hide live streams.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Literal, TextIO

import msgspec

from cefmp4.adapters.eventlog import EventLog
from cefmp4.adapters.storage import ObjectStore, RemoteUpload
from cefmp4.domain.config import Config
from cefmp4.domain.durations import human
from cefmp4.domain.errors import NoSuchUpload
from cefmp4.runtime.service import connect
from consumers.deps import utcnow
from projections.live import LiveProjection
from projections.snapshots import SnapshotStore, snapshot_key
from projections.streams import FileRecord, Projection, StreamState

Action = Literal["abort", "keep"]
Reason = Literal[
    "unknown_key",
    "stream_completed",
    "stream_failed",
    "replaced_upload",
    "current_upload",
    "not_recorded",
]
ABORTABLE: frozenset[Reason] = frozenset(
    {"unknown_key", "stream_completed", "stream_failed", "replaced_upload"}
)
DEFAULT_OLDER_THAN = timedelta(hours=1)

_EXPLAIN: dict[Reason, str] = {
    "unknown_key": "no stream in the log has this key",
    "stream_completed": "its stream completed",
    "stream_failed": "its stream failed",
    "replaced_upload": "its stream records another upload",
    "current_upload": "the current upload of a live stream",
    "not_recorded": "its live stream records no upload yet (the uploader adopts it)",
}


class GcDecision(msgspec.Struct, frozen=True):
    upload: RemoteUpload
    action: Action
    reason: Reason  # what the log says; ``keep`` with an abortable reason = too young
    stream_id: str | None = None  # the stream the reason is about

    def describe(self) -> str:
        stream = f"stream {self.stream_id}" if self.stream_id else "no stream"
        return (
            f"{self.upload.key} upload {self.upload.upload_id} "
            f"initiated {self.upload.initiated.isoformat(timespec='seconds')} "
            f"({stream}): {_EXPLAIN[self.reason]}"
        )


Known = StreamState | FileRecord


def _classify(upload: RemoteUpload, streams: list[Known]) -> tuple[Reason, str | None]:
    """What the log says about ``upload``, given every stream or record with its key."""
    live = [s for s in streams if isinstance(s, StreamState) and not s.terminal]
    for s in live:
        if s.upload_id == upload.upload_id:
            return "current_upload", s.stream_id
    for s in live:
        if s.upload_id is None:
            return "not_recorded", s.stream_id
    if live:
        return "replaced_upload", live[0].stream_id
    if not streams:
        return "unknown_key", None
    done = [s for s in streams if s.status == "completed"]
    return (
        ("stream_completed", done[0].stream_id) if done else ("stream_failed", streams[0].stream_id)
    )


def plan_gc(
    uploads: list[RemoteUpload], projection: Projection, now: datetime, older_than: timedelta
) -> list[GcDecision]:
    """One decision per upload, in the given order (pure; see the module doc)."""
    by_key: dict[str, list[Known]] = {}
    everything: list[Known] = [*projection.streams.values(), *projection.files.values()]
    for known in everything:
        by_key.setdefault(known.key, []).append(known)
    cutoff = now - older_than
    decisions = []
    for upload in uploads:
        reason, stream_id = _classify(upload, by_key.get(upload.key, []))
        old_enough = upload.initiated <= cutoff
        action: Action = "abort" if reason in ABORTABLE and old_enough else "keep"
        decisions.append(GcDecision(upload, action, reason, stream_id))
    return decisions


def summary(decisions: Iterable[GcDecision], older_than: timedelta, *, gone: int | None) -> str:
    """One line; ``gone`` is how many aborts found the upload gone, None on a dry run."""
    decisions = list(decisions)
    aborts = sum(d.action == "abort" for d in decisions)
    kept = Counter(d.reason for d in decisions if d.action == "keep")
    young = sum(n for reason, n in kept.items() if reason in ABORTABLE)
    verb = (
        "to abort (dry run; --apply aborts them)"
        if gone is None
        else f"aborted ({gone} of them already gone)"
    )
    return (
        f"{len(decisions)} multipart upload{'' if len(decisions) == 1 else 's'}: {aborts} {verb}, "
        f"{len(decisions) - aborts} kept ({kept['current_upload']} current, "
        f"{kept['not_recorded']} not yet recorded, {young} younger than {human(older_than)})"
    )


async def apply_plan(store: ObjectStore, decisions: list[GcDecision], out: TextIO) -> int:
    """Abort every upload the plan says to; return how many were already gone."""
    gone = 0
    for d in decisions:
        if d.action != "abort":
            continue
        try:
            await store.abort_multipart(d.upload.key, d.upload.upload_id)
        except NoSuchUpload:
            gone += 1
            print(f"already gone  {d.describe()}", file=out)
            continue
        print(f"aborted       {d.describe()}", file=out)
    return gone


async def run_gc(
    config: Config,
    *,
    apply: bool,
    older_than: timedelta,
    out: TextIO,
    now: Callable[[], datetime] = utcnow,
) -> list[GcDecision]:
    """List, replay, plan, print; abort too if ``apply``. Returns the plan."""
    async with connect(config) as (redis, store):
        uploads = await store.list_uploads(config.s3_key_prefix)  # before the replay
        # From the snapshot when there is one: with EVENT_RETENTION_DAYS the
        # log alone may lack the FileSeen of a long-running live stream, whose
        # upload would then look unknown. Read-only: no snapshot, no trim.
        projection = await LiveProjection(
            EventLog(redis, config.events_key, config.replica),
            snapshots=SnapshotStore(
                redis, snapshot_key(config.redis_key_prefix), config.events_key
            ),
        ).catch_up()
        decisions = plan_gc(uploads, projection, now(), older_than)
        where = f"s3://{store.bucket}/{config.s3_key_prefix}"
        print(f"gc {where} against the log {config.events_key}", file=out)
        gone: int | None = None
        if apply:
            gone = await apply_plan(store, decisions, out)
        else:
            for d in decisions:
                if d.action == "abort":
                    print(f"would abort   {d.describe()}", file=out)
        print(summary(decisions, older_than, gone=gone), file=out)
    return decisions
