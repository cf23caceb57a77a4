"""How hard the property tests try.

The whole suite (``task test``, CI) runs every property with the example count
its test names. ``task test-unit``, the edit-test loop, sets
``CEFMP4_QUICK_PROPERTIES=1`` and runs a tenth of them (at least 10): the same
properties, searched less deeply, so the pure part answers in seconds.
"""

from __future__ import annotations

import os

QUICK = os.environ.get("CEFMP4_QUICK_PROPERTIES") == "1"


def examples(count: int) -> int:
    """``count`` in the full suite; a tenth of it (at least 10) when quick."""
    return max(10, count // 10) if QUICK else count
