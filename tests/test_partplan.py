"""Invariants of the part planner (after tusd's calcpartsize_test)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cefmp4.domain.partplan import (
    MAX_OBJECT_SIZE,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    capacity,
    final_parts,
    fits_single_put,
    max_object_size,
    part_offset,
    part_size,
    whole_part_count,
    whole_parts,
)

MiB = 1024 * 1024
TiB = 1024 * 1024 * MiB
chunks = st.integers(min_value=MIN_PART_SIZE, max_value=64 * MiB)
# Small chunk sizes make the tier structure reachable with small sizes; the
# invariants do not depend on the 5 MiB floor except the EntityTooSmall one.
sizes = st.integers(min_value=0, max_value=6 * TiB)


@given(chunk=chunks, size=sizes)
def test_final_parts_tile_the_file(chunk: int, size: int) -> None:
    if size > max_object_size(chunk):
        return
    spans = final_parts(size, chunk)
    assert sum(s.size for s in spans) == size
    offset = 0
    for i, span in enumerate(spans, start=1):
        assert span.number == i
        assert span.offset == offset == part_offset(i, chunk)
        assert 0 < span.size <= MAX_PART_SIZE
        offset = span.end
    assert len(spans) <= MAX_PARTS


@given(chunk=chunks, size=sizes)
def test_every_non_last_part_is_at_least_5_mib(chunk: int, size: int) -> None:
    if size > max_object_size(chunk):
        return
    spans = final_parts(size, chunk)
    for span in spans[:-1]:
        assert span.size >= MIN_PART_SIZE


@given(chunk=chunks, small=sizes, grow=sizes)
def test_boundaries_do_not_depend_on_growth(chunk: int, small: int, grow: int) -> None:
    """Parts sent while growing are exactly the prefix of the final plan."""
    final_size = small + grow
    if final_size > max_object_size(chunk):
        return
    early = list(whole_parts(small, chunk))
    final = final_parts(final_size, chunk)
    assert early == final[: len(early)]
    for span in early:
        assert span.end <= small


@given(chunk=st.integers(min_value=10 * MiB, max_value=5 * 1024 * MiB))
def test_five_tib_fits_for_default_and_larger_chunks(chunk: int) -> None:
    assert capacity(chunk) >= 5 * TiB
    assert max_object_size(chunk) == MAX_OBJECT_SIZE == 5 * TiB


@given(chunk=chunks, over=st.integers(min_value=1, max_value=5 * TiB))
def test_too_large_is_rejected_at_the_real_limit(chunk: int, over: int) -> None:
    """Past S3's 5 TiB (or the plan's capacity, if smaller) nothing is planned;
    at the limit the plan still fits in MAX_PARTS parts."""
    limit = max_object_size(chunk)
    assert limit == min(capacity(chunk), 5 * TiB)
    with pytest.raises(ValueError, match="exceed"):
        final_parts(limit + over, chunk)
    at_limit = final_parts(limit, chunk)
    assert len(at_limit) <= MAX_PARTS and at_limit[-1].end == limit


@given(chunk=chunks, number=st.integers(min_value=1, max_value=MAX_PARTS))
def test_part_size_grows_monotonically_and_offsets_agree(chunk: int, number: int) -> None:
    assert part_size(number, chunk) >= chunk or part_size(number, chunk) == MAX_PART_SIZE
    if number > 1:
        assert part_size(number, chunk) >= part_size(number - 1, chunk)
    assert part_offset(number + 1, chunk) - part_offset(number, chunk) == part_size(number, chunk)


def test_doubling_every_thousand_parts() -> None:
    chunk = 10 * MiB
    assert part_size(1000, chunk) == chunk
    assert part_size(1001, chunk) == 2 * chunk
    assert part_size(2001, chunk) == 4 * chunk
    assert part_size(10_000, chunk) == MAX_PART_SIZE


def test_small_files_go_up_in_one_put() -> None:
    chunk = 10 * MiB
    assert fits_single_put(chunk - 1, chunk)
    assert not fits_single_put(chunk, chunk)
    assert final_parts(chunk, chunk) == list(whole_parts(chunk, chunk))
    assert final_parts(0, chunk) == []


@given(chunk=chunks, size=st.integers(min_value=0, max_value=64 * 1024 * MiB))
def test_whole_part_count_agrees_with_whole_parts(chunk: int, size: int) -> None:
    assert whole_part_count(size, chunk) == len(list(whole_parts(size, chunk)))
