"""Giving a model replica's freed host memory back to the operating system.

A forward pass of a full-size model allocates hundreds of MB of activations and frees them at its end; glibc's
malloc keeps most of that in its heaps (big blocks stop being mmap'ed once the dynamic threshold has grown) so
an idle replica holds its high-water mark for good. `malloc_trim(0)` returns those free pages: the replica then
holds its weights and little else between requests (docs/performance.md, "Memory").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from serve_app import get_logger

logger = get_logger(__name__)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None where there is none (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        logger.info("malloc_trim is not available here; freed memory stays with the allocator")
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS; True when glibc released some. Safe to call from any thread
    (malloc_trim takes each arena's lock); it costs a few milliseconds, so callers do it only when idle."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
