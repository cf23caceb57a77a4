"""Stream ids: time-ordered (they sort by when the recording was first seen,
which keeps S3 listings chronological) and unique without coordination."""

from __future__ import annotations

import os
from datetime import UTC, datetime


def stream_id(now: datetime, entropy: bytes | None = None) -> str:
    """``20261124T013709123Z-9f1c2a4b7d3e``: UTC millisecond time + 48 random bits."""
    now = now.astimezone(UTC)
    rand = entropy if entropy is not None else os.urandom(6)
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{rand.hex()}"
