"""Invariants of the part planner (after tusd's calcpartsize_test)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cefmp4.domain.partplan import (
    MAX_OBJECT_SIZE,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    PARTS_AT_SIGHT,
    PartPlan,
    capacity,
    final_parts,
    fits_single_put,
    max_object_size,
    part_offset,
    part_size,
    plan_at_sight,
    whole_part_count,
    whole_parts,
)

MiB = 1024 * 1024
TiB = 1024 * 1024 * MiB
chunks = st.integers(min_value=MIN_PART_SIZE, max_value=64 * MiB)
# Any plan: part 1 smaller, equal to or larger than the rest.
plans = st.builds(PartPlan, first=chunks, rest=chunks)
# Small chunk sizes make the tier structure reachable with small sizes; the
# invariants do not depend on the 5 MiB floor except the EntityTooSmall one.
sizes = st.integers(min_value=0, max_value=6 * TiB)


@given(plan=plans, size=sizes)
def test_final_parts_tile_the_file(plan: PartPlan, size: int) -> None:
    if size > max_object_size(plan):
        return
    spans = final_parts(size, plan)
    assert sum(s.size for s in spans) == size
    offset = 0
    for i, span in enumerate(spans, start=1):
        assert span.number == i
        assert span.offset == offset == part_offset(i, plan)
        assert 0 < span.size <= MAX_PART_SIZE
        offset = span.end
    assert len(spans) <= MAX_PARTS


@given(plan=plans, size=sizes)
def test_every_non_last_part_is_at_least_5_mib(plan: PartPlan, size: int) -> None:
    if size > max_object_size(plan):
        return
    spans = final_parts(size, plan)
    for span in spans[:-1]:
        assert span.size >= MIN_PART_SIZE


@given(plan=plans, small=sizes, grow=sizes)
def test_boundaries_do_not_depend_on_growth(plan: PartPlan, small: int, grow: int) -> None:
    """Parts sent while growing are exactly the prefix of the final plan."""
    final_size = small + grow
    if final_size > max_object_size(plan):
        return
    early = list(whole_parts(small, plan))
    final = final_parts(final_size, plan)
    assert early == final[: len(early)]
    for span in early:
        assert span.end <= small


@given(first=chunks, rest=st.integers(min_value=10 * MiB, max_value=5 * 1024 * MiB))
def test_five_tib_fits_for_default_and_larger_parts(first: int, rest: int) -> None:
    plan = PartPlan(first, rest)
    assert capacity(plan) >= 5 * TiB
    assert max_object_size(plan) == MAX_OBJECT_SIZE == 5 * TiB


@given(plan=plans, over=st.integers(min_value=1, max_value=5 * TiB))
def test_too_large_is_rejected_at_the_real_limit(plan: PartPlan, over: int) -> None:
    """Past S3's 5 TiB (or the plan's capacity, if smaller) nothing is planned;
    at the limit the plan still fits in MAX_PARTS parts."""
    limit = max_object_size(plan)
    assert limit == min(capacity(plan), 5 * TiB)
    with pytest.raises(ValueError, match="exceed"):
        final_parts(limit + over, plan)
    at_limit = final_parts(limit, plan)
    assert len(at_limit) <= MAX_PARTS and at_limit[-1].end == limit


@given(plan=plans, number=st.integers(min_value=1, max_value=MAX_PARTS))
def test_part_sizes_follow_the_plan_and_offsets_agree(plan: PartPlan, number: int) -> None:
    size = part_size(number, plan)
    if number == 1:
        assert size == plan.first
    else:
        assert size >= plan.rest or size == MAX_PART_SIZE
    if number > 2:
        assert size >= part_size(number - 1, plan)
    assert part_offset(number + 1, plan) - part_offset(number, plan) == size


def test_doubling_every_thousand_parts() -> None:
    plan = PartPlan(5 * MiB, 10 * MiB)
    assert part_size(1, plan) == 5 * MiB
    assert part_size(2, plan) == part_size(1000, plan) == 10 * MiB
    assert part_size(1001, plan) == 20 * MiB
    assert part_size(2001, plan) == 40 * MiB
    assert part_size(10_000, plan) == MAX_PART_SIZE
    assert part_offset(1001, plan) == 5 * MiB + 999 * 10 * MiB


@given(chunk=chunks, number=st.integers(min_value=1, max_value=MAX_PARTS + 1))
def test_a_uniform_plan_is_the_plan_before_plans_were_recorded(chunk: int, number: int) -> None:
    """Streams, snapshots and continuations from before plans were recorded
    were cut as ``chunk << ((n - 1) // 1000)``; ``PartPlan.uniform`` must
    cut them the same way or their parts would be re-sent or mis-copied."""
    plan = PartPlan.uniform(chunk)
    old_offset = sum(min(chunk << ((n - 1) // 1000), MAX_PART_SIZE) for n in range(1, number))
    assert part_offset(number, plan) == old_offset
    if number <= MAX_PARTS:
        assert part_size(number, plan) == min(chunk << ((number - 1) // 1000), MAX_PART_SIZE)


def test_small_files_go_up_in_one_put() -> None:
    plan = PartPlan(5 * MiB, 10 * MiB)
    assert fits_single_put(5 * MiB - 1, plan)
    assert not fits_single_put(5 * MiB, plan)
    assert final_parts(5 * MiB, plan) == list(whole_parts(5 * MiB, plan))
    assert final_parts(0, plan) == []


@given(plan=plans, size=st.integers(min_value=0, max_value=64 * 1024 * MiB))
def test_whole_part_count_agrees_with_whole_parts(plan: PartPlan, size: int) -> None:
    assert whole_part_count(size, plan) == len(list(whole_parts(size, plan)))


@given(
    size=st.integers(min_value=0, max_value=MAX_OBJECT_SIZE),
    first=chunks,
    chunk=chunks,
    large=st.integers(min_value=MIN_PART_SIZE, max_value=1024 * MiB),
)
def test_plan_at_sight(size: int, first: int, chunk: int, large: int) -> None:
    plan = plan_at_sight(size, first=first, chunk=chunk, large=large)
    assert plan.first == first
    assert chunk <= plan.rest <= max(chunk, large)  # never below CHUNK_SIZE_BYTES
    if plan.rest > chunk:  # a large file: about PARTS_AT_SIGHT parts, a MiB multiple
        assert plan.rest % MiB == 0 or plan.rest == large
        assert len(final_parts(size, plan)) <= PARTS_AT_SIGHT + 2 or plan.rest == large


def test_a_file_seen_small_keeps_the_chunk_size_and_one_seen_large_gets_larger_parts() -> None:
    sight = {"first": 5 * MiB, "chunk": 10 * MiB, "large": 32 * MiB}
    assert plan_at_sight(0, **sight) == PartPlan(5 * MiB, 10 * MiB)
    assert plan_at_sight(80 * MiB, **sight) == PartPlan(5 * MiB, 10 * MiB)
    assert plan_at_sight(128 * MiB, **sight) == PartPlan(5 * MiB, 16 * MiB)
    assert plan_at_sight(129 * MiB, **sight) == PartPlan(5 * MiB, 17 * MiB)  # rounded up
    assert plan_at_sight(256 * MiB, **sight) == PartPlan(5 * MiB, 32 * MiB)
    assert plan_at_sight(1024 * MiB, **sight) == PartPlan(5 * MiB, 32 * MiB)
    assert plan_at_sight(100 * 1024 * MiB, **sight) == PartPlan(5 * MiB, 32 * MiB)
