"""Keep the resident set close to the parts actually in flight (glibc only).

Part buffers are large (10 MiB by default) and short-lived. glibc's malloc
raises its mmap threshold dynamically after the first such buffer is freed,
after which parts come from the heap arenas and freed ones stay resident in
per-thread arenas: the benchmark saw ~70 MiB held that way. A fixed 1 MiB
threshold makes every part buffer its own mapping, returned to the OS on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def return_large_buffers(threshold: int = 1 << 20) -> bool:
    """Ask glibc to mmap allocations >= ``threshold``; False where not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
