"""The watcher's rules (``cefmp4.domain.watchrules.decide``), one table row per rule.

``decide`` is where "is this a new recording, a growing one, or a finished
one?" is answered; a wrong answer either loses data (finishing a file that is
still being written, overwriting a completed object) or never finishes it.
Each row names the rule of the module docstring it covers.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cefmp4.domain.events import Continues
from cefmp4.domain.filerules import FileStat
from cefmp4.domain.mp4 import Mp4Status, Mp4Verdict
from cefmp4.domain.partplan import PartPlan
from cefmp4.domain.watchrules import (
    Action,
    CheckMp4,
    Forget,
    Gone,
    Grew,
    Seen,
    Stopped,
    Timing,
    Truncated,
    decide,
)
from projections.streams import Completion, FileRecord, Status, StreamState
from tests.properties import examples

T0 = datetime(2024, 1, 1, tzinfo=UTC)
TIMING = Timing(settle=1.0, timeout=30.0)  # no plan: every change is reported at once
# Coalescing as the watcher runs it, with a tiny part size: parts end at 10, 20, ...
COALESCE = Timing(settle=1.0, timeout=30.0, plan=PartPlan.uniform(10), coalesce=0.25)
SIZE, MTIME, INODE = 100, 5_000, 7

COMPLETE = Mp4Verdict(Mp4Status.COMPLETE, "")
INCOMPLETE = Mp4Verdict(Mp4Status.INCOMPLETE, "mdat size 0")
FRAGMENTED = Mp4Verdict(Mp4Status.FRAGMENTED, "moof")
INVALID = Mp4Verdict(Mp4Status.INVALID, "not an mp4")
VERDICTS = [COMPLETE, INCOMPLETE, FRAGMENTED, INVALID]


def stream(
    status: Status = "active",
    *,
    size: int = SIZE,
    mtime_ns: int = MTIME,
    inode: int = INODE,
    gone: Literal["deleted", "truncated"] | None = None,
    completion: tuple[int, int] | None = None,
    plan: PartPlan | None = None,
) -> StreamState:
    done = None
    if completion is not None:
        done = Completion(
            size=completion[0],
            mtime_ns=completion[1],
            etag="e",
            sha256="h",
            parts=0,
            mp4="complete",
            mp4_reason="",
            at=T0,
        )
    return StreamState(
        stream_id="s1",
        path="/w/a.mp4",
        rel_path="a.mp4",
        bucket="b",
        key="k",
        inode=inode,
        started_at=T0,
        status=status,
        size=size,
        mtime_ns=mtime_ns,
        gone=gone,
        completion=done,
        plan=plan,
    )


def completed() -> StreamState:
    return stream("completed", completion=(SIZE, MTIME))


def record(
    status: Literal["completed", "failed"], *, retry: bool = False, md5s: bytes = b""
) -> FileRecord:
    part_size = 40 if md5s else 0
    return FileRecord(
        "s1", "k", status, SIZE, MTIME, INODE, retry=retry, part_size=part_size, part_md5s=md5s
    )


# What a stream that extends the completed object of s1 (100 bytes) carries.
CONTINUES = Continues("s1", "k", SIZE)
DIGESTS = bytes(range(16)) + bytes(range(16, 32)) + bytes(range(32, 48))  # 3 parts of 40
CONTINUES_PARTS = Continues(
    "s1", "k", SIZE, 40, (bytes(range(16)).hex(), bytes(range(16, 32)).hex(), DIGESTS[32:].hex())
)


def file(size: int = SIZE, mtime_ns: int = MTIME, inode: int = INODE) -> FileStat:
    return FileStat(size, mtime_ns, inode)


class Case(msgspec.Struct, frozen=True, kw_only=True):
    current: FileStat | None
    stream: StreamState | FileRecord | None
    expected: list[Action]
    quiet_for: float = 0.0
    verdict: Mp4Verdict | None = None
    idle_sent: tuple[int, int] | None = None
    timing: Timing = TIMING


CASES: dict[str, Case] = {
    # --- gone from disk ---
    "gone while live": Case(current=None, stream=stream(), expected=[Gone("s1")]),
    "gone while idle (idle is still live)": Case(
        current=None, stream=stream("idle"), expected=[Gone("s1")]
    ),
    "gone, never seen": Case(current=None, stream=None, expected=[]),
    # A finished recording's file left the disk: its record goes (bounded state).
    "gone after completed": Case(current=None, stream=completed(), expected=[Forget("s1")]),
    "gone after failed": Case(current=None, stream=stream("failed"), expected=[Forget("s1")]),
    "gone after failed as deleted (no record)": Case(
        current=None, stream=stream("failed", gone="deleted"), expected=[]
    ),
    "gone, already reported": Case(current=None, stream=stream(gone="deleted"), expected=[]),
    # --- new recordings ---
    "new path": Case(current=file(), stream=None, expected=[Seen(file())]),
    "completed, unchanged": Case(current=file(), stream=completed(), expected=[]),
    "completed, unchanged vs completion though the stream saw less": Case(
        # The reference is what was uploaded, not the last BytesAvailable.
        current=file(),
        stream=stream("completed", size=60, mtime_ns=1, completion=(SIZE, MTIME)),
        expected=[],
    ),
    # Grew in place after completion: the recorder paused past the timeout and
    # went on. Still a new stream and object, but it names what it continues.
    "completed, then grew": Case(
        current=file(size=SIZE + 1),
        stream=completed(),
        expected=[Seen(file(size=SIZE + 1), CONTINUES)],
    ),
    "completed, then grew and mtime moved": Case(
        current=file(size=SIZE + 1, mtime_ns=MTIME + 9),
        stream=completed(),
        expected=[Seen(file(size=SIZE + 1, mtime_ns=MTIME + 9), CONTINUES)],
    ),
    "completed, then grew under a new inode (other content)": Case(
        current=file(size=SIZE + 1, inode=INODE + 1),
        stream=completed(),
        expected=[Seen(file(size=SIZE + 1, inode=INODE + 1))],
    ),
    "completed, then shrank": Case(
        current=file(size=SIZE - 1), stream=completed(), expected=[Seen(file(size=SIZE - 1))]
    ),
    "completed, then patched (mtime)": Case(
        current=file(mtime_ns=MTIME + 1),
        stream=completed(),
        expected=[Seen(file(mtime_ns=MTIME + 1))],
    ),
    "completed, then replaced (inode)": Case(
        current=file(inode=INODE + 1), stream=completed(), expected=[Seen(file(inode=INODE + 1))]
    ),
    "completed, changed back to the stream's last size": Case(
        # Compared with the completion (100 bytes), not stream.size (60).
        current=file(size=60, mtime_ns=1),
        stream=stream("completed", size=60, mtime_ns=1, completion=(SIZE, MTIME)),
        expected=[Seen(file(size=60, mtime_ns=1))],
    ),
    "failed, unchanged": Case(current=file(), stream=stream("failed"), expected=[]),
    "failed, then changed": Case(
        current=file(size=SIZE + 5), stream=stream("failed"), expected=[Seen(file(size=SIZE + 5))]
    ),
    "record, unchanged": Case(current=file(), stream=record("completed"), expected=[]),
    "record, gone": Case(current=None, stream=record("completed"), expected=[Forget("s1")]),
    "record, grew": Case(
        current=file(size=SIZE + 1),
        stream=record("completed"),
        expected=[Seen(file(size=SIZE + 1), CONTINUES)],
    ),
    "record with parts, grew: the part MD5s travel in the Seen": Case(
        current=file(size=SIZE * 3),
        stream=record("completed", md5s=DIGESTS),
        expected=[Seen(file(size=SIZE * 3), CONTINUES_PARTS)],
    ),
    "record with parts, patched in place (same size)": Case(
        current=file(mtime_ns=MTIME + 1),
        stream=record("completed", md5s=DIGESTS),
        expected=[Seen(file(mtime_ns=MTIME + 1))],
    ),
    "record with parts, shrank": Case(
        current=file(size=SIZE - 1),
        stream=record("completed", md5s=DIGESTS),
        expected=[Seen(file(size=SIZE - 1))],
    ),
    "failed record, grew (no object to continue)": Case(
        current=file(size=SIZE + 1), stream=record("failed"), expected=[Seen(file(size=SIZE + 1))]
    ),
    "failed record, retry asked, grew": Case(
        current=file(size=SIZE + 1),
        stream=record("failed", retry=True),
        expected=[Seen(file(size=SIZE + 1))],
    ),
    "failed record, retry asked, unchanged file": Case(
        current=file(), stream=record("failed", retry=True), expected=[Seen(file())]
    ),
    "completed record, retry flag ignored": Case(
        current=file(), stream=record("completed", retry=True), expected=[]
    ),
    "failed after delete, file reappears identical": Case(
        current=file(), stream=stream("failed", gone="deleted"), expected=[Seen(file())]
    ),
    # --- live stream that is already being ended ---
    "live, deleted, file back": Case(current=file(), stream=stream(gone="deleted"), expected=[]),
    "live, truncated, bigger now": Case(
        current=file(size=SIZE * 2, inode=INODE + 1),
        stream=stream(gone="truncated"),
        expected=[],
    ),
    # --- shrink / replace while live ---
    "shrank": Case(
        current=file(size=SIZE - 1),
        stream=stream(),
        expected=[Truncated("s1", SIZE - 1), Seen(file(size=SIZE - 1))],
    ),
    "shrank to zero": Case(
        current=file(size=0), stream=stream(), expected=[Truncated("s1", 0), Seen(file(size=0))]
    ),
    "new inode, same size": Case(
        current=file(inode=INODE + 1),
        stream=stream(),
        expected=[Truncated("s1", SIZE), Seen(file(inode=INODE + 1))],
    ),
    "new inode, bigger": Case(
        current=file(size=SIZE + 9, inode=INODE + 1),
        stream=stream(),
        expected=[Truncated("s1", SIZE + 9), Seen(file(size=SIZE + 9, inode=INODE + 1))],
    ),
    "idle stream shrank": Case(
        current=file(size=1),
        stream=stream("idle"),
        expected=[Truncated("s1", 1), Seen(file(size=1))],
    ),
    # --- growth ---
    "grew": Case(
        current=file(size=SIZE + 1), stream=stream(), expected=[Grew("s1", file(size=SIZE + 1))]
    ),
    "grew, mtime too": Case(
        current=file(size=SIZE + 1, mtime_ns=MTIME + 1),
        stream=stream(),
        expected=[Grew("s1", file(size=SIZE + 1, mtime_ns=MTIME + 1))],
    ),
    "same size patched (mtime)": Case(
        current=file(mtime_ns=MTIME + 1),
        stream=stream(),
        expected=[Grew("s1", file(mtime_ns=MTIME + 1))],
    ),
    "grew after idle": Case(
        current=file(size=SIZE + 1),
        stream=stream("idle"),
        expected=[Grew("s1", file(size=SIZE + 1))],
    ),
    "grew while quiet and complete (stat wins)": Case(
        current=file(size=SIZE + 1),
        stream=stream(),
        quiet_for=99.0,
        verdict=COMPLETE,
        expected=[Grew("s1", file(size=SIZE + 1))],
    ),
    # --- quiet ---
    "quiet < settle": Case(current=file(), stream=stream(), quiet_for=0.5, expected=[]),
    "quiet < settle, complete": Case(
        current=file(), stream=stream(), quiet_for=0.5, verdict=COMPLETE, expected=[]
    ),
    "quiet == settle, no verdict": Case(
        current=file(), stream=stream(), quiet_for=1.0, expected=[CheckMp4()]
    ),
    "quiet >= settle, no verdict": Case(
        current=file(), stream=stream(), quiet_for=5.0, expected=[CheckMp4()]
    ),
    "settled + complete": Case(
        current=file(),
        stream=stream(),
        quiet_for=1.0,
        verdict=COMPLETE,
        expected=[Stopped("s1", file(), "settled", COMPLETE)],
    ),
    "settled + complete, older idle sent": Case(
        current=file(),
        stream=stream(),
        quiet_for=1.0,
        verdict=COMPLETE,
        idle_sent=(SIZE - 1, MTIME - 1),
        expected=[Stopped("s1", file(), "settled", COMPLETE)],
    ),
    "quiet >= timeout, no verdict": Case(
        current=file(), stream=stream(), quiet_for=30.0, expected=[CheckMp4()]
    ),
    "idle already sent for this (size, mtime)": Case(
        current=file(),
        stream=stream(),
        quiet_for=99.0,
        verdict=COMPLETE,
        idle_sent=(SIZE, MTIME),
        expected=[],
    ),
    "idle already sent, before the verdict": Case(
        current=file(), stream=stream(), quiet_for=99.0, idle_sent=(SIZE, MTIME), expected=[]
    ),
}

CASES |= {
    # --- growth, coalesced (a Grew per write would flood the log) ---
    "coalesce: grew inside a part, still writing": Case(
        current=file(size=SIZE + 5), stream=stream(), quiet_for=0.1, timing=COALESCE, expected=[]
    ),
    "coalesce: patched, still writing": Case(
        current=file(mtime_ns=MTIME + 1),
        stream=stream(),
        quiet_for=0.0,
        timing=COALESCE,
        expected=[],
    ),
    "coalesce: a new whole part exists": Case(
        # The uploader has work: report at once, not when the recorder pauses.
        current=file(size=SIZE + 10),
        stream=stream(),
        quiet_for=0.0,
        timing=COALESCE,
        expected=[Grew("s1", file(size=SIZE + 10))],
    ),
    "coalesce: paused inside a part": Case(
        current=file(size=SIZE + 5),
        stream=stream(),
        quiet_for=0.25,
        timing=COALESCE,
        expected=[Grew("s1", file(size=SIZE + 5))],
    ),
    "coalesce: the stream's own plan, not the unrecorded one, says where parts end": Case(
        # Recorded (95, 20): parts end at 95, 115, ... - SIZE + 10 = 110 makes no new
        # one, though the config's plan (10, 10) would have ended one at 110.
        current=file(size=SIZE + 10),
        stream=stream(plan=PartPlan(95, 20)),
        quiet_for=0.0,
        timing=COALESCE,
        expected=[],
    ),
    "coalesce: a new whole part of the stream's own plan": Case(
        current=file(size=SIZE + 15),
        stream=stream(plan=PartPlan(95, 20)),
        quiet_for=0.0,
        timing=COALESCE,
        expected=[Grew("s1", file(size=SIZE + 15))],
    ),
    "coalesce: shrink is never held back": Case(
        current=file(size=SIZE - 1),
        stream=stream(),
        quiet_for=0.0,
        timing=COALESCE,
        expected=[Truncated("s1", SIZE - 1), Seen(file(size=SIZE - 1))],
    ),
}

for _v in (INCOMPLETE, FRAGMENTED, INVALID):
    # Not structurally complete: waiting is cheap, finishing early truncates.
    CASES[f"settled + {_v.status.value}, before timeout"] = Case(
        current=file(), stream=stream(), quiet_for=29.9, verdict=_v, expected=[]
    )
for _v in VERDICTS:
    # The timeout ends every stream, whatever its content.
    CASES[f"timeout + {_v.status.value}"] = Case(
        current=file(),
        stream=stream(),
        quiet_for=30.0,
        verdict=_v,
        expected=[Stopped("s1", file(), "timeout", _v)],
    )


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_decide(case: Case) -> None:
    actions = decide(
        case.current,
        case.stream,
        quiet_for=case.quiet_for,
        verdict=case.verdict,
        idle_sent=case.idle_sent,
        timing=case.timing,
    )
    assert actions == case.expected


# --- properties over arbitrary inputs ---

near = st.integers(min_value=0, max_value=3)
statuses = st.sampled_from(["active", "idle", "completed", "failed"])
gones = st.sampled_from([None, None, "deleted", "truncated"])
streams = st.builds(
    stream,
    statuses,
    size=near,
    mtime_ns=near,
    inode=st.integers(1, 2),
    gone=gones,
    completion=st.none() | st.tuples(near, near),
)
live_streams = st.builds(
    stream, st.sampled_from(["active", "idle"]), size=near, mtime_ns=near, inode=st.integers(1, 2)
)


@st.composite
def timings(draw: st.DrawFn) -> Timing:
    # The service runs with SETTLE_SECONDS <= STREAM_TIMEOUT_SECONDS; the
    # "settle before idle" property only holds in that configuration.
    settle = draw(st.floats(min_value=0, max_value=50, allow_nan=False))
    timeout = draw(st.floats(min_value=settle, max_value=100, allow_nan=False).filter(bool))
    chunk = draw(st.sampled_from([0, 1, 2, 10]))
    plan = PartPlan.uniform(chunk) if chunk else None
    coalesce = draw(st.floats(min_value=0, max_value=min(settle, 1.0)))
    return Timing(settle, timeout, plan, coalesce)


class Look(msgspec.Struct, frozen=True):
    current: FileStat | None
    state: StreamState | None
    quiet_for: float
    verdict: Mp4Verdict | None
    idle_sent: tuple[int, int] | None
    timing: Timing


def variants(base: FileStat) -> list[FileStat]:
    replace = msgspec.structs.replace
    return [
        base,
        base,
        replace(base, size=base.size + 1),
        replace(base, size=max(base.size - 1, 0)),
        replace(base, mtime_ns=base.mtime_ns + 1),
        replace(base, inode=base.inode + 1),
    ]


@st.composite
def looks(draw: st.DrawFn) -> Look:
    # Inputs are drawn *relative to each other*: independent draws would almost
    # never produce "file equals the stream and quiet just below settle", which
    # is exactly where a wrong Stopped would hide. Half of the draws focus on a
    # live, not-gone stream whose file is unchanged or barely changed.
    if draw(st.booleans()):
        state: StreamState | None = draw(live_streams)
        assert state is not None
        base = FileStat(state.size, state.mtime_ns, state.inode)
        replace = msgspec.structs.replace
        current: FileStat | None = draw(
            st.sampled_from([base, base, replace(base, mtime_ns=base.mtime_ns + 1)])
        )
    else:
        state = draw(st.none() | streams)
        base = (
            FileStat(SIZE, MTIME, INODE)
            if state is None
            else FileStat(state.size, state.mtime_ns, state.inode)
        )
        current = draw(st.sampled_from([None, *variants(base)]))
    timing = draw(timings())
    quiet_for = draw(
        st.sampled_from(
            [
                0.0,
                timing.settle / 2,
                timing.settle,
                timing.timeout,
                max(timing.settle - 0.001, 0.0),
                max(timing.timeout - 0.001, 0.0),
            ]
        )
        | st.floats(min_value=0, max_value=200, allow_nan=False)
    )
    idle_sent = draw(
        st.sampled_from([None, None, None, (base.size, base.mtime_ns)]) | st.tuples(near, near)
    )
    verdict = draw(st.sampled_from([None, COMPLETE, COMPLETE, INCOMPLETE, FRAGMENTED, INVALID]))
    return Look(current, state, quiet_for, verdict, idle_sent, timing)


@settings(max_examples=examples(500), deadline=None)
@given(look=looks())
def test_decide_invariants(look: Look) -> None:
    current, state, quiet_for = look.current, look.state, look.quiet_for
    verdict, idle_sent, timing = look.verdict, look.idle_sent, look.timing
    actions = decide(
        current, state, quiet_for=quiet_for, verdict=verdict, idle_sent=idle_sent, timing=timing
    )
    if any(isinstance(a, Stopped) for a in actions):
        # Finishing a stream whose file differs from what was uploaded, or that
        # has not been quiet for the settle time, would upload a torn file.
        assert current is not None and state is not None
        assert (current.size, current.mtime_ns) == (state.size, state.mtime_ns)
        assert current.inode == state.inode
        assert quiet_for >= timing.settle
        assert verdict is not None
        assert idle_sent != (current.size, current.mtime_ns)
        assert not state.terminal and state.gone is None
        # Early ("settled") only for a structurally complete file; otherwise
        # only after the full timeout.
        settled = Stopped(state.stream_id, current, "settled", verdict)
        timeout = Stopped(state.stream_id, current, "timeout", verdict)
        assert (actions == [settled] and verdict.status is Mp4Status.COMPLETE) or (
            actions == [timeout] and quiet_for >= timing.timeout
        )
    if any(isinstance(a, Grew) for a in actions):
        # Growth is reported only for a live stream whose file really differs.
        assert current is not None and state is not None and not state.terminal
        assert actions == [Grew(state.stream_id, current)]
        assert (current.size, current.mtime_ns) != (state.size, state.mtime_ns)
    if state is not None and state.terminal:
        # A completed object is never appended to: changed content is a new
        # stream; a file that left the disk only drops the record.
        new = [a for a in actions if isinstance(a, Seen) and a.stat == current]
        assert actions in ([], [Forget(state.stream_id)]) or (len(new) == 1 and actions == new)
        assert (actions == [Forget(state.stream_id)]) == (
            current is None and state.gone != "deleted"
        )
    # A continuation exactly when the file of a completed object grew in
    # place, and it names that object.
    continued = [a.continues for a in actions if isinstance(a, Seen) and a.continues]
    grew_after_completion = (
        state is not None
        and state.terminal
        and state.completion is not None  # an object exists (what record_of goes by)
        and state.gone != "deleted"
        and current is not None
        and current.inode == state.inode
        and current.size > state.completion.size
    )
    assert bool(continued) == grew_after_completion
    if continued:
        assert state is not None and state.completion is not None
        assert continued == [Continues(state.stream_id, state.key, state.completion.size)]
    if current is not None and state is not None and not state.terminal and state.gone:
        # The uploader is already ending this stream; a second Truncated/Seen
        # would start a duplicate stream before the first one is terminal.
        assert actions == []
    if any(isinstance(a, Truncated) for a in actions):
        assert current is not None and state is not None
        assert actions == [Truncated(state.stream_id, current.size), Seen(current)]
    if any(isinstance(a, Gone) for a in actions):
        assert current is None and state is not None and actions == [Gone(state.stream_id)]
    if any(isinstance(a, Forget) for a in actions):
        assert current is None and state is not None and state.terminal
    assert len(actions) == len(set(map(type, actions)))


# --- liveness: the safety checks above pass for a decide() that never acts ---


def _watch_over_time(
    current: FileStat, state: StreamState, verdict: Mp4Verdict, timing: Timing, until: float
) -> list[tuple[float, list[Action]]]:
    """What the watcher does on each tick while the file stays ``current``:
    decide, and on CheckMp4 decide again with the verdict (as the watcher
    does), for quiet_for from 0 to ``until``. Returns (quiet_for, actions) of
    every tick that acted."""
    acted = []
    # Evenly spaced ticks, plus the instants the rules name (a watcher ticks
    # often; what matters is that acting never needs more than the rule says).
    ticks = {until * i / 50 for i in range(51)} | {timing.coalesce, timing.settle, timing.timeout}
    for quiet_for in sorted(t for t in ticks if t <= until):
        actions = decide(current, state, quiet_for=quiet_for, verdict=None, idle_sent=None,
                         timing=timing)  # fmt: skip
        if actions == [CheckMp4()]:
            actions = decide(current, state, quiet_for=quiet_for, verdict=verdict,
                             idle_sent=None, timing=timing)  # fmt: skip
        if actions:
            acted.append((quiet_for, actions))
    return acted


@settings(max_examples=examples(300), deadline=None)
@given(state=live_streams, grown=st.integers(1, 25), patched=st.booleans(), timing=timings())
def test_a_growing_file_is_reported(
    state: StreamState, grown: int, patched: bool, timing: Timing
) -> None:
    """A live stream whose file grew (or was patched in place) gets Grew, at
    the latest once the file paused for the coalescing time."""
    current = FileStat(state.size + grown, state.mtime_ns + int(patched), state.inode)
    acted = _watch_over_time(current, state, COMPLETE, timing, until=timing.coalesce)
    assert acted and acted[0][1] == [Grew(state.stream_id, current)], acted
    assert acted[0][0] <= timing.coalesce


@settings(max_examples=examples(300), deadline=None)
@given(state=live_streams, verdict=st.sampled_from(VERDICTS), timing=timings())
def test_a_quiet_file_goes_idle(state: StreamState, verdict: Mp4Verdict, timing: Timing) -> None:
    """A live stream whose file stopped changing goes idle: after the settle
    time when it is structurally complete, after the timeout whatever it is."""
    current = FileStat(state.size, state.mtime_ns, state.inode)
    acted = _watch_over_time(current, state, verdict, timing, until=timing.timeout)
    assert acted, "a quiet file never went idle"
    quiet_for, actions = acted[0]
    if verdict.status is Mp4Status.COMPLETE:
        # (with settle == timeout the timeout rule comes first: also idle)
        settled = Stopped(state.stream_id, current, "settled", verdict)
        timeout = Stopped(state.stream_id, current, "timeout", verdict)
        assert actions in ([settled], [timeout]), acted
        assert quiet_for <= timing.settle
    else:
        assert actions == [Stopped(state.stream_id, current, "timeout", verdict)], acted
        assert quiet_for <= timing.timeout
