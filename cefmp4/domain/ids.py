"""Stream ids: time-ordered (they sort by when the recording was first seen,
which keeps S3 listings chronological) and unique without coordination.

Pure: the caller supplies the clock's reading and the random bytes
(``os.urandom(6)`` in the service)."""

from __future__ import annotations

from datetime import UTC, datetime


def stream_id(now: datetime, entropy: bytes) -> str:
    """``20261124T013709123Z-9f1c2a4b7d3e``: UTC millisecond time + 48 random
    bits (``entropy``, 6 bytes)."""
    now = now.astimezone(UTC)
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{entropy.hex()}"
