"""Redis Stream entry ids (``"<ms>-<seq>"``) as ordered pairs: pure.

Ids compare as ``(ms, seq)`` integer pairs, never as strings ("10-0" sorts
before "9-0" as text). Shared by the snapshots, the trim bound and the archive.
"""

from __future__ import annotations

EntryId = tuple[int, int]
ZERO_ID = "0-0"  # before every entry: "nothing yet"


def parse_id(entry_id: str) -> EntryId:
    """``"<ms>-<seq>"`` as a pair of ints (ValueError if it is not one)."""
    ms, sep, seq = entry_id.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        raise ValueError(f"not a stream entry id: {entry_id!r}")
    return int(ms), int(seq)


def format_id(entry_id: EntryId) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"
