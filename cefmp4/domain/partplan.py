"""Pure multipart part planning.

Part boundaries are a deterministic function of the part number alone, never of
how fast the file grew: part ``n`` always covers the same byte range of a given
recording. That is what lets a restarted or a second replica agree with the log
about which bytes a recorded ``PartUploaded`` covers, and lets a finalizer
re-read exactly those bytes to see whether the recorder patched them.

Sizes: ``chunk`` bytes for parts 1-1000, then the size doubles every 1000 parts
(capped at S3's 5 GiB part maximum), so 10,000 parts reach past S3's 5 TiB
object limit for any chunk >= 10 MiB (5 MiB reaches 4.88 TiB).

While a file grows only *whole* parts are sent: S3 rejects a non-last part
smaller than 5 MiB at completion (EntityTooSmall). The last part, sent at
finalization, is whatever remains and may be any size.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PART_SIZE = 5 * 1024 * 1024 * 1024
MAX_PARTS = 10_000
PARTS_PER_TIER = 1000
MAX_OBJECT_SIZE = 5 * 1024**4  # S3's limit per object: 5 TiB


class Span(msgspec.Struct, frozen=True):
    """Byte range ``[offset, offset + size)`` of part ``number`` (1-based)."""

    number: int
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


def part_size(number: int, chunk: int) -> int:
    """Nominal size of part ``number``; doubles every 1000 parts."""
    if number < 1 or number > MAX_PARTS:
        raise ValueError(f"part number {number} outside 1..{MAX_PARTS}")
    return min(chunk << ((number - 1) // PARTS_PER_TIER), MAX_PART_SIZE)


def part_offset(number: int, chunk: int) -> int:
    """Offset of the first byte of part ``number``, in O(tiers)."""
    if number < 1 or number > MAX_PARTS + 1:
        raise ValueError(f"part number {number} outside 1..{MAX_PARTS + 1}")
    offset = 0
    done = 0
    tier = 0
    while done < number - 1:
        count = min(PARTS_PER_TIER, number - 1 - done)
        offset += count * min(chunk << tier, MAX_PART_SIZE)
        done += count
        tier += 1
    return offset


def capacity(chunk: int) -> int:
    """Largest object size the plan can express in ``MAX_PARTS`` parts."""
    return part_offset(MAX_PARTS + 1, chunk)


def max_object_size(chunk: int) -> int:
    """Largest recording that can become one object: the plan's capacity, but
    never more than S3 accepts (the plan reaches 9.76 TiB for 10 MiB chunks)."""
    return min(capacity(chunk), MAX_OBJECT_SIZE)


def whole_part_count(size: int, chunk: int) -> int:
    """``len(list(whole_parts(size, chunk)))`` in O(tiers)."""
    count = 0
    offset = 0
    tier = 0
    while count < MAX_PARTS:
        length = min(chunk << tier, MAX_PART_SIZE)
        fit = min(PARTS_PER_TIER, (size - offset) // length)
        count += fit
        offset += fit * length
        if fit < PARTS_PER_TIER:
            return count
        tier += 1
    return count


def whole_parts(size: int, chunk: int) -> Iterator[Span]:
    """Parts that lie entirely inside the first ``size`` bytes, in order.

    These can be sent while the file still grows. The last full part is
    included even when it ends exactly at ``size``: if the file then turns out
    to be finished, it simply is the last part.
    """
    offset = 0
    for number in range(1, MAX_PARTS + 1):
        length = part_size(number, chunk)
        if offset + length > size:
            return
        yield Span(number, offset, length)
        offset += length


def final_parts(size: int, chunk: int) -> list[Span]:
    """Every part of a finished file of ``size`` bytes: whole parts + the tail.

    Raises ValueError when the file cannot be one object (``max_object_size``).
    """
    if size > max_object_size(chunk):
        raise ValueError(f"{size} bytes exceed the object size limit {max_object_size(chunk)}")
    spans = list(whole_parts(size, chunk))
    end = spans[-1].end if spans else 0
    if end < size:
        spans.append(Span(len(spans) + 1, end, size - end))
    return spans


def fits_single_put(size: int, chunk: int) -> bool:
    """A finished file smaller than the first part goes up with one PutObject."""
    return size < part_size(1, chunk)
