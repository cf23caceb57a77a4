"""Durations as operators write them: ``90s``, ``30m``, ``24h``, ``7d``, ``1h30m``.

One parser for every flag and variable that takes a duration (``cefmp4 gc
--older-than``, ``EVENT_RETENTION``, ``cefmp4 events --since``), so they
all accept the same spellings. Pure.
"""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(r"(\d+)([smhd])")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def duration(text: str) -> timedelta:
    """``30m``, ``2h``, ``1d``, ``0s``, ``1h30m`` -> timedelta; ValueError otherwise."""
    value = text.strip()
    if not value or _DURATION.sub("", value):
        raise ValueError(f"not a duration like 30m, 2h, 1d or 0s: {text!r}")
    total = timedelta()
    for amount, unit in _DURATION.findall(value):
        total += timedelta(**{_UNIT[unit]: int(amount)})
    return total


def human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
