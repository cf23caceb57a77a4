"""Tests for cefmp4.domain.mp4 (structural completeness) and the recorder simulators.

Real ffmpeg output anchors the verdicts; hypothesis covers garbage, every
truncation point, and synthetic box trees whose chunk offsets we control.
"""

from __future__ import annotations

import asyncio
import itertools
import mmap
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cefmp4.adapters.mp4files import check_file
from cefmp4.domain.mp4 import (
    Box,
    Mp4Status,
    Mp4Verdict,
    check_structure,
    iter_child_boxes,
    iter_top_level_boxes,
)
from tests.mp4gen import (
    MIB,
    Mp4Sources,
    build_sources,
    chunk_offset_entries,
    make_mp4,
    record_append,
    record_faststart,
    record_mdat_patch,
    truncate_and_rewrite,
)
from tests.properties import examples

COMPLETE = Mp4Status.COMPLETE
INCOMPLETE = Mp4Status.INCOMPLETE
FRAGMENTED = Mp4Status.FRAGMENTED
INVALID = Mp4Status.INVALID

PROPERTY = settings(
    deadline=None,
    max_examples=examples(150),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Mp4Sources:
    return build_sources(tmp_path_factory.mktemp("mp4-sources"))


@pytest.fixture(scope="session")
def regular_bytes(sources: Mp4Sources) -> bytes:
    return sources.regular.read_bytes()


def _types(data: bytes) -> list[str]:
    return [b.type for b in iter_top_level_boxes(data)]


# --- real ffmpeg output ---------------------------------------------------------


def test_regular_is_complete_and_moov_is_at_the_end(sources: Mp4Sources) -> None:
    data = sources.regular.read_bytes()
    assert check_structure(data) == Mp4Verdict(COMPLETE, "")
    assert check_file(sources.regular) == Mp4Verdict(COMPLETE, "")
    types = _types(data)
    assert types[0] == "ftyp"
    assert types.index("mdat") < types.index("moov")


def test_faststart_is_complete_and_moov_comes_first(sources: Mp4Sources) -> None:
    data = sources.faststart.read_bytes()
    assert check_file(sources.faststart).status is COMPLETE
    types = _types(data)
    assert types.index("moov") < types.index("mdat")
    # ffmpeg moves its 8-byte free box along with moov, so no growth.
    assert len(data) == sources.regular.stat().st_size


def test_fragmented_is_fragmented(sources: Mp4Sources) -> None:
    data = sources.fragmented.read_bytes()
    assert check_file(sources.fragmented).status is FRAGMENTED
    types = _types(data)
    assert "moof" in types
    assert types.count("moof") > 1  # -g 25 over 3 s gives several fragments


def test_fragmented_header_alone_is_fragmented_not_complete(sources: Mp4Sources) -> None:
    # empty_moov output starts with ftyp + a moov without any chunk offsets;
    # only its mvex child tells it apart from a finished zero-length movie.
    data = sources.fragmented.read_bytes()
    moov = next(b for b in iter_top_level_boxes(data) if b.type == "moov")
    assert "mvex" in [c.type for c in iter_child_boxes(data, moov)]
    assert check_structure(data[: moov.end]).status is FRAGMENTED


def test_every_prefix_of_fragmented_is_not_complete(sources: Mp4Sources) -> None:
    data = sources.fragmented.read_bytes()
    for cut in range(0, len(data), max(1, len(data) // 200)):
        assert check_structure(data[:cut]).status is not COMPLETE, cut


def test_large_source_spans_several_parts_and_is_complete(sources: Mp4Sources) -> None:
    size = sources.large.stat().st_size
    assert 8 * MIB <= size <= 20 * MIB  # "roughly 12 MiB"
    assert check_file(sources.large).status is COMPLETE


def test_make_mp4_refuses_faststart_and_fragmented(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_mp4(tmp_path / "x.mp4", seconds=1, faststart=True, fragmented=True)


def _cut_points(data: bytes) -> list[int]:
    boxes = list(iter_top_level_boxes(data))
    points = set(range(1, 50))  # every cut inside ftyp/free and the mdat header
    for b in boxes:  # box boundaries and cuts inside each header
        points.update({b.offset, b.offset + 4, b.offset + b.header_size, b.end - 1})
    points.update(range(1, len(data), max(1, len(data) // 40)))  # evenly spaced
    points.update({len(data) - 8, len(data) - 1})
    return sorted(p for p in points if 0 < p < len(data))


@pytest.mark.parametrize("which", ["regular", "faststart"])
def test_every_sampled_strict_prefix_is_incomplete(sources: Mp4Sources, which: str) -> None:
    data = getattr(sources, which).read_bytes()
    cuts = _cut_points(data)
    assert len(cuts) >= 50
    for cut in cuts:
        verdict = check_structure(data[:cut])
        assert verdict.status is INCOMPLETE, (cut, verdict)
        assert verdict.reason


def test_zeroed_mdat_size_is_incomplete(regular_bytes: bytes) -> None:
    mdat = next(b for b in iter_top_level_boxes(regular_bytes) if b.type == "mdat")
    assert mdat.offset == 40  # ftyp(32) + free(8): the "patch-back at offset 40"
    patched = bytearray(regular_bytes)
    patched[mdat.offset : mdat.offset + 4] = bytes(4)
    assert check_structure(patched) == Mp4Verdict(
        INCOMPLETE, "mdat box has size 0 (not patched yet)"
    )


@pytest.mark.parametrize(
    "data",
    [
        random.Random(7).randbytes(4096),
        b"Hello, this is a text file and not a recording at all.\n" * 20,
        bytes(4096),  # zero-filled
        bytes([0x47]) + bytes(187),  # an MPEG-TS packet
        b"\x00\x00\x00\x03ftyp",  # a box smaller than its own header
        b"\x00\x00\x00\x20xx",  # header prefix no MP4 box type starts with
        b"\x7f\xff\xff\xffftypisom",  # a 2 GiB ftyp is not an ftyp
    ],
)
def test_not_an_mp4_is_invalid(data: bytes) -> None:
    verdict = check_structure(data)
    assert verdict.status is INVALID
    assert verdict.reason


@pytest.mark.parametrize(
    "data",
    [b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x20", b"\x00\x00\x00\x20ft", b"\x00\x00\x00\x01mdat"],
)
def test_prefix_of_a_plausible_header_is_incomplete(data: bytes) -> None:
    assert check_structure(data).status is INCOMPLETE


@pytest.mark.parametrize("where", ["zero", "file_end", "moov", "just_past_mdat"])
def test_stco_offset_outside_mdat_is_not_complete(regular_bytes: bytes, where: str) -> None:
    boxes = {b.type: b for b in iter_top_level_boxes(regular_bytes)}
    entries = chunk_offset_entries(regular_bytes)
    assert entries and all(width == 4 for _, width in entries)  # ffmpeg: stco below 4 GiB
    bad = {
        "zero": 0,
        "file_end": len(regular_bytes),
        "moov": boxes["moov"].offset + 8,
        "just_past_mdat": boxes["mdat"].end,
    }[where]
    pos, _ = entries[len(entries) // 2]
    mutated = bytearray(regular_bytes)
    mutated[pos : pos + 4] = struct.pack(">I", bad)
    verdict = check_structure(mutated)
    assert verdict.status is INCOMPLETE
    assert "outside every mdat" in verdict.reason


def test_empty_file_is_incomplete(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.touch()
    assert check_file(empty) == Mp4Verdict(INCOMPLETE, "empty file")
    assert check_structure(b"") == Mp4Verdict(INCOMPLETE, "empty file")


def test_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        check_file(tmp_path / "nope.mp4")


def test_buffer_types_agree(sources: Mp4Sources, regular_bytes: bytes) -> None:
    with open(sources.regular, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert check_structure(m).status is COMPLETE
    assert check_structure(bytearray(regular_bytes)).status is COMPLETE
    assert check_structure(memoryview(regular_bytes)).status is COMPLETE
    # A typed view must still be judged byte by byte.
    usable = len(regular_bytes) - len(regular_bytes) % 4
    typed = memoryview(regular_bytes[:usable]).cast("I")
    assert check_structure(typed) == check_structure(regular_bytes[:usable])


def test_box_geometry(regular_bytes: bytes) -> None:
    boxes = list(iter_top_level_boxes(regular_bytes))
    assert boxes[0] == Box(type="ftyp", offset=0, size=boxes[0].size, header_size=8)
    assert [b.offset for b in boxes[1:]] == [b.end for b in boxes[:-1]]
    assert boxes[-1].end == len(regular_bytes)


def test_largesize_mdat_is_understood(regular_bytes: bytes) -> None:
    # Rewrite "free(8) mdat(size)" into "mdat(size=1, largesize)" as ffmpeg
    # does past 4 GiB; offsets stay valid because the payload does not move.
    boxes = {b.type: b for b in iter_top_level_boxes(regular_bytes)}
    free, mdat = boxes["free"], boxes["mdat"]
    assert free.end == mdat.offset
    large = bytearray(regular_bytes)
    large[free.offset : mdat.payload_offset] = struct.pack(
        ">I4sQ", 1, b"mdat", mdat.size + free.size
    )
    assert check_structure(large).status is COMPLETE
    assert [b.type for b in iter_top_level_boxes(large)] == ["ftyp", "mdat", "moov"]


# --- hypothesis: garbage and truncation ------------------------------------------


@PROPERTY
@given(st.binary(max_size=600))
def test_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    verdict = check_structure(data)
    assert isinstance(verdict.status, Mp4Status)
    assert isinstance(verdict.reason, str)
    # Only COMPLETE comes without a reason; and it must be earned.
    assert (verdict.reason == "") == (verdict.status is COMPLETE), verdict
    if verdict.status is COMPLETE:
        _assert_tiles_with_offsets_in_mdat(data)


@PROPERTY
@given(st.binary(min_size=0, max_size=64))
def test_never_raises_behind_a_valid_ftyp(tail: bytes) -> None:
    ftyp = struct.pack(">I4s4sI4s", 20, b"ftyp", b"isom", 512, b"isom")
    verdict = check_structure(ftyp + tail)
    assert verdict.status is not INVALID
    # Without an mdat and a moov there is no movie to call complete.
    if not {"moov", "mdat"} <= set(_types(ftyp + tail)):
        assert verdict.status is not COMPLETE, verdict


def _assert_tiles_with_offsets_in_mdat(data: bytes) -> None:
    """The invariants a COMPLETE verdict stands for, checked independently."""
    boxes = list(iter_top_level_boxes(data))
    assert boxes and boxes[0].offset == 0 and boxes[-1].end == len(data)
    assert all(a.end == b.offset for a, b in itertools.pairwise(boxes))
    mdats = [(b.payload_offset, b.end) for b in boxes if b.type == "mdat"]
    assert mdats and [b.type for b in boxes].count("moov") == 1
    for pos, width in chunk_offset_entries(data):
        offset = int.from_bytes(data[pos : pos + width], "big")
        assert any(lo <= offset < hi for lo, hi in mdats), (offset, mdats)


@PROPERTY
@given(st.data())
def test_never_raises_on_corrupted_real_file(regular_bytes: bytes, data: st.DataObject) -> None:
    mutated = bytearray(regular_bytes)
    moov = next(b for b in iter_top_level_boxes(regular_bytes) if b.type == "moov")
    writes = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(mutated) - 1), st.integers(0, 255)),
            min_size=1,
            max_size=8,
        )
    )
    for pos, value in writes:
        # Bias half the writes into moov, where the parser does the most work.
        mutated[pos if pos % 2 else moov.offset + pos % moov.size] = value
    verdict = check_structure(mutated)
    assert isinstance(verdict.status, Mp4Status)
    if verdict.status is COMPLETE:
        # "Complete" is a claim about the bytes, whatever they are: the top-level
        # boxes still tile the file and every chunk offset lies inside an mdat.
        _assert_tiles_with_offsets_in_mdat(bytes(mutated))
    else:
        assert verdict.reason, verdict


@PROPERTY
@given(st.data())
def test_truncated_real_file_is_never_complete(regular_bytes: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(regular_bytes) - 1))
    assert check_structure(regular_bytes[:cut]).status is not COMPLETE


# --- hypothesis: synthetic box trees ----------------------------------------------


def _box(box_type: bytes, payload: bytes, *, large: bool = False) -> bytes:
    if large:
        return struct.pack(">I4sQ", 1, box_type, 16 + len(payload)) + payload
    return struct.pack(">I4s", 8 + len(payload), box_type) + payload


def _full_box(box_type: bytes, payload: bytes) -> bytes:
    return _box(box_type, b"\x00\x00\x00\x00" + payload)  # version + flags


def _moov(traks: list[tuple[bool, list[int]]]) -> bytes:
    """A moov with one trak per (co64?, chunk offsets); sizes ignore offset values."""
    body = _full_box(b"mvhd", bytes(96))
    for co64, offsets in traks:
        fmt = ">Q" if co64 else ">I"
        table = _full_box(
            b"co64" if co64 else b"stco",
            struct.pack(">I", len(offsets)) + b"".join(struct.pack(fmt, o) for o in offsets),
        )
        stbl = _box(b"stbl", _full_box(b"stsd", bytes(4)) + _full_box(b"stts", bytes(4)) + table)
        minf = _box(b"minf", _full_box(b"vmhd", bytes(8)) + stbl)
        mdia = _box(b"mdia", _full_box(b"mdhd", bytes(20)) + _full_box(b"hdlr", bytes(21)) + minf)
        body += _box(b"trak", _full_box(b"tkhd", bytes(80)) + mdia)
    return _box(b"moov", body + _box(b"udta", b""))


@st.composite
def synthetic_mp4s(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]]]:
    """ftyp [free] + moov and 1-3 mdats in any order; every mdat is referenced.

    Returns the file and the mdat payload ranges. No box follows the last
    referenced one for free, so every strict prefix loses something needed.
    """
    mdat_sizes = draw(st.lists(st.integers(1, 48), min_size=1, max_size=3))
    large = draw(st.lists(st.booleans(), min_size=len(mdat_sizes), max_size=len(mdat_sizes)))
    n_traks = draw(st.integers(1, 3))
    # (co64?, [(mdat index, position in it)]), both reduced modulo below.
    chunk_refs = st.lists(st.tuples(st.integers(0, 99), st.integers(0, 99)), max_size=6)
    refs = [(draw(st.booleans()), draw(chunk_refs)) for _ in range(n_traks)]
    # Every mdat referenced by at least one chunk, so dropping any is noticed.
    refs[0] = (refs[0][0], [*refs[0][1], *((i, 0) for i in range(len(mdat_sizes)))])
    order = draw(st.permutations(["moov", *range(len(mdat_sizes))]))
    ftyp = _box(b"ftyp", b"isom" + struct.pack(">I", 512) + b"isomiso2avc1mp41")
    head = ftyp + (_box(b"free", b"") if draw(st.booleans()) else b"")

    def moov_with(payloads: list[tuple[int, int]]) -> bytes:
        return _moov(
            [
                (co64, [payloads[m % len(payloads)][0] + r % mdat_sizes[m % len(payloads)]
                        for m, r in chunks])
                for co64, chunks in refs
            ]
        )  # fmt: skip

    moov_size = len(moov_with([(0, 1)] * len(mdat_sizes)))
    payloads: list[tuple[int, int]] = [(0, 0)] * len(mdat_sizes)
    pos = len(head)
    for item in order:
        if item == "moov":
            pos += moov_size
        else:
            assert isinstance(item, int)
            start = pos + (16 if large[item] else 8)
            payloads[item] = (start, start + mdat_sizes[item])
            pos = payloads[item][1]
    out = head
    for item in order:
        if item == "moov":
            out += moov_with(payloads)
        else:
            assert isinstance(item, int)
            out += _box(b"mdat", bytes([item + 1]) * mdat_sizes[item], large=large[item])
    assert len(out) == pos
    return out, payloads


@PROPERTY
@given(synthetic_mp4s())
def test_synthetic_trees_are_complete(tree: tuple[bytes, list[tuple[int, int]]]) -> None:
    data, _ = tree
    assert check_structure(data) == Mp4Verdict(COMPLETE, "")


@PROPERTY
@given(synthetic_mp4s(), st.data())
def test_truncated_synthetic_trees_are_not_complete(
    tree: tuple[bytes, list[tuple[int, int]]], data: st.DataObject
) -> None:
    blob, _ = tree
    cut = data.draw(st.integers(0, len(blob) - 1))
    assert check_structure(blob[:cut]).status is not COMPLETE


@PROPERTY
@given(synthetic_mp4s(), st.data())
def test_one_offset_outside_every_mdat_breaks_completeness(
    tree: tuple[bytes, list[tuple[int, int]]], data: st.DataObject
) -> None:
    blob, payloads = tree
    entries = chunk_offset_entries(blob)
    pos, width = data.draw(st.sampled_from(entries))
    bad = data.draw(
        st.integers(0, 2 ** (8 * width) - 1).filter(
            lambda v: not any(lo <= v < hi for lo, hi in payloads)
        )
    )
    mutated = bytearray(blob)
    mutated[pos : pos + width] = bad.to_bytes(width, "big")
    verdict = check_structure(mutated)
    assert verdict.status is not COMPLETE
    assert "outside every mdat" in verdict.reason


# --- recorder simulators --------------------------------------------------------


def _same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


async def _watch(dst: Path, task: asyncio.Task[None]) -> list[bool]:
    """Sample check_file(dst) until ``task`` finishes; runs of "was it COMPLETE".

    Runs rather than samples because how often the watcher gets a turn is up
    to the scheduler; the shape (e.g. never complete, then complete) is not.
    """
    runs: list[bool] = []
    while not task.done():
        try:
            complete = check_file(dst).status is COMPLETE
        except FileNotFoundError:  # the writer has not created it yet
            pass
        else:
            if not runs or runs[-1] != complete:
                runs.append(complete)
        await asyncio.sleep(0)
    await task
    return runs


async def test_record_append_is_never_complete_early(sources: Mp4Sources, tmp_path: Path) -> None:
    dst = tmp_path / "rec.mp4"
    task = asyncio.create_task(record_append(sources.regular, dst, chunk=4096, delay=0))
    # Complete only once the last byte is down (the watcher may catch that).
    assert await _watch(dst, task) in ([False], [False, True])
    assert _same_bytes(dst, sources.regular)
    assert check_file(dst).status is COMPLETE


@pytest.mark.parametrize("which", ["regular", "faststart", "large"])
async def test_record_mdat_patch(sources: Mp4Sources, tmp_path: Path, which: str) -> None:
    src: Path = getattr(sources, which)
    dst = tmp_path / "rec.mp4"
    before: list[Mp4Verdict] = []

    async def before_patch() -> None:
        before.append(check_file(dst))

    chunk = 1 * MIB if which == "large" else 4096
    task = asyncio.create_task(
        record_mdat_patch(src, dst, chunk=chunk, delay=0, before_patch=before_patch)
    )
    runs = await _watch(dst, task)
    # Every byte but the size field is final here: only the patch is missing.
    assert before == [Mp4Verdict(INCOMPLETE, "mdat box has size 0 (not patched yet)")]
    assert runs in ([False], [False, True])
    assert _same_bytes(dst, src)
    assert check_file(dst).status is COMPLETE


async def test_record_faststart_with_given_version(sources: Mp4Sources, tmp_path: Path) -> None:
    dst = tmp_path / "rec.mp4"
    task = asyncio.create_task(
        record_faststart(
            sources.regular, dst, chunk=1024, delay=0, faststart_version=sources.faststart
        )
    )
    # Growing, then the regular file is complete, then the rewrite's first
    # chunks leave a new moov header over old bytes, then complete again. Once
    # the whole moov is rewritten the payload still changes under a consistent
    # tree: that window is the settle time's job, not this check's.
    assert await _watch(dst, task) == [False, True, False, True]
    assert _same_bytes(dst, sources.faststart)
    assert check_file(dst) == Mp4Verdict(COMPLETE, "")


async def test_record_faststart_remuxes_like_ffmpeg(sources: Mp4Sources, tmp_path: Path) -> None:
    dst = tmp_path / "rec.mp4"
    await record_faststart(sources.regular, dst, chunk=16384, delay=0)
    # The in-simulator remux is the same stream copy build_sources ran.
    assert _same_bytes(dst, sources.faststart)
    assert check_file(dst).status is COMPLETE


async def test_truncate_and_rewrite(sources: Mp4Sources, tmp_path: Path) -> None:
    dst = tmp_path / "rec.mp4"
    await record_append(sources.large, dst, chunk=4 * MIB, delay=0)
    assert dst.stat().st_size > sources.regular.stat().st_size
    await truncate_and_rewrite(sources.regular, dst)
    assert _same_bytes(dst, sources.regular)
    assert check_file(dst).status is COMPLETE


async def test_truncate_and_rewrite_in_chunks_restarts_from_empty(
    sources: Mp4Sources, tmp_path: Path
) -> None:
    dst = tmp_path / "rec.mp4"
    await record_append(sources.regular, dst, chunk=1 * MIB, delay=0)
    task = asyncio.create_task(truncate_and_rewrite(sources.faststart, dst, chunk=4096))
    runs = await _watch(dst, task)
    # Possibly the old complete file, then the restart, then complete again.
    assert runs in ([False], [False, True], [True, False], [True, False, True])
    assert _same_bytes(dst, sources.faststart)
    assert check_file(dst).status is COMPLETE
