"""Hand memory that a request freed back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Return the heap memory the process has freed to the operating system.

    The scoring server runs each request in a worker thread, and glibc keeps what such a thread
    frees in its own arena for reuse: a request that decoded a 4096x4096 PNG left the server
    ~80 MiB larger for good, and the high-water marks of different threads add up.
    """
    if _TRIM is not None:
        _TRIM(0)
