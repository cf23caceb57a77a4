"""What the watcher concludes from one look at one path: a pure function.

Inputs are the file's current stat, what the projection knows of the path
(its newest open stream, or the record of its finished recording), how long
the file has been quiet (as seen by this watcher), the MP4 verdict if it was
computed, whether the writer closed the file (and how long ago), and which
(size, mtime) this process already reported idle. The output is a list of
actions the watcher turns into events; each carries what its event needs (the
stream, the stat, the verdict), so the watcher reports it without looking
anything up again.
Keeping this pure makes the rules testable exhaustively, and keeps the watcher
level-triggered: it never needs to remember what it emitted before a restart,
because the projection says it.

Rules, in order:
* gone from disk -> ``Gone`` for a live stream, ``Forget`` for the record of a
  finished one (so the projection drops it: state follows the disk);
* no stream, or new content where a finished one was, or a retry asked for a
  failed one -> ``Seen`` (a completed object is never overwritten: changed
  content after completion is a new recording with a new key). When the file
  of a completed object grew under the same inode (the recorder paused past
  the timeout and went on), the ``Seen`` carries what it continues, so the
  unchanged parts are copied from the first object instead of sent again;
* shrank or replaced (new inode) while live -> ``Truncated`` + ``Seen``;
* grew or patched -> ``Grew``, coalesced: at once when a new whole part
  exists, otherwise when the file pauses;
* closed by its writer (or moved into place) ``close_guard`` ago, unchanged
  since, and finished by its structure (``mp4.complete_when_closed``: a
  complete MP4, or a fragmented one ending with its ``mfra``) -> ``Stopped``
  with cause ``closed``, at once rather than after ``settle``;
* quiet for ``settle`` and structurally complete, or quiet for ``timeout``
  whatever the content -> ``Stopped`` (once per (size, mtime) per process).

A close is the same decision as quiet time, only earlier: it yields the same
``Stopped`` action, and a close that does not prove the file finished leaves
it to the quiet-time rules.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from cefmp4.domain.events import Continues, IdleCause
from cefmp4.domain.filerules import FileStat
from cefmp4.domain.mp4 import Mp4Status, Mp4Verdict, complete_when_closed
from cefmp4.domain.partplan import PartPlan, whole_part_count
from projections.streams import FileRecord, StreamState, record_of


class Seen(msgspec.Struct, frozen=True):
    """A new stream of the file as ``stat`` shows it; ``continues`` when the
    file extends a completed object."""

    stat: FileStat
    continues: Continues | None = None


class Grew(msgspec.Struct, frozen=True):
    """The live stream's file grew or was patched: report ``stat``."""

    stream_id: str
    stat: FileStat


class Gone(msgspec.Struct, frozen=True):
    """The live stream's file left the disk."""

    stream_id: str


class Truncated(msgspec.Struct, frozen=True):
    """The live stream's file shrank to ``size`` or was replaced."""

    stream_id: str
    size: int


class Forget(msgspec.Struct, frozen=True):
    """A finished recording's file left the disk: drop its record."""

    stream_id: str


class CheckMp4(msgspec.Struct, frozen=True):
    """Ask the caller to walk the MP4 boxes and decide again with the verdict."""


class Stopped(msgspec.Struct, frozen=True):
    """The recorder is done with the file (quiet and complete, quiet past the
    timeout, or closed and finished: ``cause``): report ``StreamIdle`` so the
    finalizer ends the stream."""

    stream_id: str
    stat: FileStat
    reason: Literal["settled", "timeout"]
    verdict: Mp4Verdict
    cause: IdleCause = "quiet"


Action = Seen | Grew | Gone | Truncated | Forget | CheckMp4 | Stopped


class Timing(msgspec.Struct, frozen=True):
    settle: float
    timeout: float
    # Coalescing of BytesAvailable while a file grows: report at once when a
    # new whole part of the stream's plan exists (the uploader has work),
    # otherwise only once the file paused for `coalesce` seconds. ``plan`` is
    # that of streams whose FileSeen recorded none (CHUNK_SIZE_BYTES); with
    # neither, every change is reported.
    plan: PartPlan | None = None
    coalesce: float = 0.0
    # How long a closed file must stay unchanged before its close counts.
    close_guard: float = 0.2


def decide(
    current: FileStat | None,
    stream: StreamState | FileRecord | None,
    *,
    quiet_for: float,
    verdict: Mp4Verdict | None,
    idle_sent: tuple[int, int] | None,
    timing: Timing,
    closed_for: float | None = None,
    mfra: bool = False,
) -> list[Action]:
    """``closed_for``: seconds since the writer closed the file (or moved it
    in), None when it did not or the file changed since; ``mfra``: the file
    ends with a complete ``mfra`` (``mp4.ends_with_mfra``; only read with a
    FRAGMENTED verdict)."""
    if isinstance(stream, StreamState) and stream.terminal:
        # A terminal stream speaks for its file the way its record does.
        stream = None if stream.gone == "deleted" else record_of(stream)
    if isinstance(stream, FileRecord):
        return _decide_finished(current, stream)
    if current is None:
        if stream is not None and stream.gone is None:
            return [Gone(stream.stream_id)]
        return []
    if stream is None:
        return [Seen(current)]
    if stream.gone is not None:
        return []  # the uploader is ending it; a new stream follows once it is terminal
    if current.inode != stream.inode or current.size < stream.size:
        return [Truncated(stream.stream_id, current.size), Seen(current)]
    changed = (current.size, current.mtime_ns) != (stream.size, stream.mtime_ns)
    if not changed and idle_sent == (current.size, current.mtime_ns):
        return []
    if closed_for is not None and closed_for >= timing.close_guard:
        if verdict is None:
            return [CheckMp4()]
        if complete_when_closed(verdict, mfra):
            # The writer is done: its last bytes and that it stopped, in one
            # pass (its last write, often a header patch, is not coalesced).
            grew = [Grew(stream.stream_id, current)] if changed else []
            return [*grew, Stopped(stream.stream_id, current, "settled", verdict, "closed")]
    if changed:
        plan = stream.plan or timing.plan
        if plan is None or quiet_for >= timing.coalesce:
            return [Grew(stream.stream_id, current)]
        new_part = whole_part_count(current.size, plan) > whole_part_count(stream.size, plan)
        return [Grew(stream.stream_id, current)] if new_part else []
    if quiet_for >= timing.timeout:
        if verdict is None:
            return [CheckMp4()]
        return [Stopped(stream.stream_id, current, "timeout", verdict)]
    if quiet_for >= timing.settle:
        if verdict is None:
            return [CheckMp4()]
        if verdict.status is Mp4Status.COMPLETE:
            return [Stopped(stream.stream_id, current, "settled", verdict)]
    return []


def settled_file(record: FileRecord, current: FileStat) -> bool:
    """The finished recording's file is as recorded and no retry was asked:
    nothing to do. The common case of a rescan (every finished file still on
    disk), so the watcher asks it before anything else."""
    if record.retry and record.status == "failed":
        return False
    return (current.size, current.mtime_ns, current.inode) == (
        record.size,
        record.mtime_ns,
        record.inode,
    )


def _decide_finished(current: FileStat | None, record: FileRecord) -> list[Action]:
    if current is None:
        return [Forget(record.stream_id)]
    if settled_file(record, current):
        return []
    if record.retry and record.status == "failed":
        return [Seen(current)]
    return [Seen(current, _continuation(current, record))]


def _continuation(current: FileStat, record: FileRecord) -> Continues | None:
    """A completed object's file that grew in place is continued, not replaced.

    Only growth of the same inode: a shrunk or replaced file is other content,
    and a same-size patch is a rewrite. Which parts are really unchanged is
    proven part by part later (MD5 of the local bytes against the record), so
    this only says where to look.
    """
    if record.status != "completed" or current.inode != record.inode:
        return None
    return record.continues() if current.size > record.size else None
