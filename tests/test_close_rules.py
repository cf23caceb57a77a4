"""The close fast path's pure half: is a file its writer closed finished
(``mp4.ends_with_mfra``, ``mp4.complete_when_closed``), and what ``decide``
makes of a close (``closed_for``, ``mfra``).

Synthetic box sequences (hypothesis) for the structure rules, the real
ffmpeg recordings for ``file_ends_with_mfra``; the decision is checked with
the same random looks as ``test_watchrules``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from cefmp4.adapters.mp4files import file_ends_with_mfra
from cefmp4.domain.mp4 import (
    Mp4Status,
    Mp4Verdict,
    check_structure,
    complete_when_closed,
    ends_with_mfra,
    iter_top_level_boxes,
)
from cefmp4.domain.partplan import PartPlan
from cefmp4.domain.watchrules import Action, CheckMp4, Grew, Stopped, Timing, decide
from tests import mp4gen
from tests.properties import examples
from tests.test_watchrules import (
    COMPLETE,
    FRAGMENTED,
    INCOMPLETE,
    INVALID,
    MTIME,
    Look,
    file,
    looks,
    stream,
)


def box(kind: bytes, payload: bytes = b"", *, large: bool = False) -> bytes:
    if large:  # size 1 + a 64-bit largesize, as ffmpeg writes mdat past 4 GiB
        return struct.pack(">I4sQ", 1, kind, 16 + len(payload)) + payload
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


FTYP = box(b"ftyp", b"isom\x00\x00\x02\x00isomiso2")
MOOV = box(b"moov", box(b"mvhd", bytes(100)))
FRAG_MOOV = box(b"moov", box(b"mvhd", bytes(100)) + box(b"mvex", box(b"trex", bytes(24))))


def closed(buf: bytes) -> bool:
    return complete_when_closed(check_structure(buf), ends_with_mfra(buf))


def mfra(tfras: int, *, announced: int | None = None) -> bytes:
    body = b"".join(box(b"tfra", bytes(16)) for _ in range(tfras))
    size = 8 + len(body) + 16
    mfro = box(b"mfro", struct.pack(">II", 0, size if announced is None else announced))
    return box(b"mfra", body + mfro)


fillers = st.lists(
    st.builds(
        box,
        st.sampled_from([b"free", b"skip", b"mdat", b"wide"]),
        st.binary(max_size=64),
        large=st.booleans(),
    ),
    max_size=6,
)


@st.composite
def tiling_files(draw: st.DrawFn) -> bytes:
    """ftyp, then a moov and filler boxes in any order, laid end to end."""
    rest = draw(fillers)
    rest.insert(draw(st.integers(0, len(rest))), MOOV)
    return FTYP + b"".join(rest)


@st.composite
def fragmented(draw: st.DrawFn) -> bytes:
    """ftyp moov(mvex) (moof mdat)*: a fragmented file as written so far."""
    frags = draw(st.lists(st.binary(max_size=64), max_size=5))
    body = b"".join(box(b"moof", box(b"mfhd", bytes(8))) + box(b"mdat", d) for d in frags)
    return FTYP + FRAG_MOOV + body


@settings(max_examples=examples(300), deadline=None)
@given(data=tiling_files())
def test_any_box_sequence_that_tiles_is_complete(data: bytes) -> None:
    assert closed(data)


@settings(max_examples=examples(300), deadline=None)
@given(data=tiling_files(), st_cut=st.data())
def test_a_truncated_final_box_is_not_complete(data: bytes, st_cut: st.DataObject) -> None:
    last = list(iter_top_level_boxes(data))[-1]
    cut = st_cut.draw(st.integers(last.offset + 1, len(data) - 1))
    assert not closed(data[:cut])


@settings(max_examples=examples(300), deadline=None)
@given(data=fragmented(), tfras=st.integers(0, 3))
def test_fragmented_is_finished_only_with_its_mfra(data: bytes, tfras: int) -> None:
    assert check_structure(data).status is Mp4Status.FRAGMENTED
    assert not ends_with_mfra(data) and not closed(data)
    whole = data + mfra(tfras)
    assert ends_with_mfra(whole) and closed(whole)


@settings(max_examples=examples(300), deadline=None)
@given(data=fragmented(), tfras=st.integers(0, 3), delta=st.integers(-24, 64).filter(bool))
def test_mfra_with_a_wrong_mfro_size_is_not_finished(data: bytes, tfras: int, delta: int) -> None:
    right = len(mfra(tfras))
    assert not closed(data + mfra(tfras, announced=right + delta))


@settings(max_examples=examples(300), deadline=None)
@given(data=fragmented(), tfras=st.integers(0, 3), st_cut=st.data())
def test_no_strict_prefix_of_a_fragmented_file_is_finished(
    data: bytes, tfras: int, st_cut: st.DataObject
) -> None:
    whole = data + mfra(tfras)
    assert not closed(whole[: st_cut.draw(st.integers(0, len(whole) - 1))])


def test_mfra_must_be_the_last_box() -> None:
    data = FTYP + FRAG_MOOV + mfra(1) + box(b"free", bytes(8))
    assert not ends_with_mfra(data)
    # An mfro that is not mfra's last child, or a short one, is no trailer.
    inner = box(b"mfro", struct.pack(">II", 0, 40)) + box(b"tfra", bytes(8))
    assert not ends_with_mfra(FTYP + FRAG_MOOV + box(b"mfra", inner))


def test_real_recordings(sources: mp4gen.Mp4Sources, tmp_path: Path) -> None:
    frag = sources.fragmented.read_bytes()
    assert file_ends_with_mfra(sources.fragmented) and closed(frag)
    start = next(b.offset for b in iter_top_level_boxes(frag) if b.type == "mfra")
    stripped = tmp_path / "no-mfra.mp4"
    stripped.write_bytes(frag[:start])
    assert not file_ends_with_mfra(stripped) and not closed(frag[:start])
    for path in (sources.regular, sources.faststart):
        assert not file_ends_with_mfra(path)
        assert closed(path.read_bytes())


# -- decide ---------------------------------------------------------------

Acts = list[Action]
GUARD = Timing(settle=1.0, timeout=30.0, close_guard=0.2)


def test_a_close_of_a_finished_file_is_idle_before_the_settle_time() -> None:
    def at(closed_for: float | None, verdict: Mp4Verdict | None, mfra: bool = False) -> Acts:
        return decide(
            file(),
            stream(),
            quiet_for=0.3,
            verdict=verdict,
            idle_sent=None,
            timing=GUARD,
            closed_for=closed_for,
            mfra=mfra,
        )

    assert at(0.3, None) == [CheckMp4()]
    assert at(0.3, COMPLETE) == [Stopped("s1", file(), "settled", COMPLETE, "closed")]
    assert at(0.3, FRAGMENTED, mfra=True) == [
        Stopped("s1", file(), "settled", FRAGMENTED, "closed")
    ]
    # Not proven finished, or still inside the guard: the quiet-time rules.
    for verdict in (INCOMPLETE, FRAGMENTED, INVALID):
        assert at(0.3, verdict) == []
    assert at(0.1, COMPLETE) == []
    assert at(None, COMPLETE) == []


@settings(max_examples=examples(500), deadline=None)
@given(
    look=looks(),
    closed_for=st.none() | st.floats(0, 100, allow_nan=False),
    mfra=st.booleans(),
    guard=st.sampled_from([0.0, 0.2, 1.0]),
)
def test_decide_with_a_close(
    look: Look, closed_for: float | None, mfra: bool, guard: float
) -> None:
    timing = msgspec.structs.replace(look.timing, close_guard=guard)
    current, state, verdict = look.current, look.state, look.verdict

    def run(closed_for: float | None, mfra: bool) -> list[Action]:
        return decide(
            current,
            state,
            quiet_for=look.quiet_for,
            verdict=verdict,
            idle_sent=look.idle_sent,
            timing=timing,
            closed_for=closed_for,
            mfra=mfra,
        )

    without, with_close = run(None, False), run(closed_for, mfra)
    if any(isinstance(a, Stopped) and a.cause == "closed" for a in with_close):
        # Only a live stream whose structure proves it finished; a change
        # since the last report is reported first, in the same pass.
        assert closed_for is not None and closed_for >= guard
        assert verdict is not None and complete_when_closed(verdict, mfra)
        assert current is not None and state is not None and not state.terminal
        changed = (current.size, current.mtime_ns) != (state.size, state.mtime_ns)
        grew = [Grew(state.stream_id, current)] if changed else []
        assert with_close[:-1] == grew and isinstance(with_close[-1], Stopped)
        assert with_close[-1].stat == current
        assert changed or look.idle_sent != (current.size, current.mtime_ns)
    elif with_close != [CheckMp4()]:
        # A close that proves nothing changes nothing.
        assert with_close == without
    if closed_for is None or closed_for < guard:
        assert with_close == without


def test_a_last_write_before_the_close_is_reported_with_the_stop() -> None:
    # A recorder's last write is often a header patch: the size stays, the
    # mtime moves, and no new part fills. Without a close that change waits
    # for the coalescing window; after a close it goes out with the stop.
    patched = file(mtime_ns=MTIME + 1)
    timing = msgspec.structs.replace(GUARD, plan=PartPlan.uniform(10 << 20), coalesce=1.0)

    def at(closed_for: float | None) -> Acts:
        return decide(
            patched,
            stream(),
            quiet_for=0.3,
            verdict=COMPLETE,
            idle_sent=None,
            timing=timing,
            closed_for=closed_for,
        )

    assert at(None) == []  # coalesced: no new part, not quiet for 1 s yet
    assert at(0.3) == [Grew("s1", patched), Stopped("s1", patched, "settled", COMPLETE, "closed")]
