"""A model replica's host memory: reused while it works, given back to the operating system once it is idle.

Reuse. A forward pass of a full-size model allocates and frees hundreds of MB of activations, and glibc's defaults
hand much of it back to the kernel at once: blocks over 32 MB are always mmap'ed, and the worker threads' arenas
unmap what they freed. The next pass faults those pages in again, zeroed by the kernel. On the 2-core VM of
docs/performance.md that kernel time was 35-45 % of a pass: Grounding DINO at 800 px took 14.4 s an image (7.8 s
of it in the kernel), SAM ViT-B 16.6 s, MobileSAM 2.2 s. With `MALLOC_TUNABLES` (one arena, no mmap, no trimming
while busy) they took 9.7, 10.0 and 1.2 s, for 12-27 % more peak RSS while busy. glibc reads its tunables only
when a process starts, so the builder puts them in the model replicas' environment (`replica_env`).

Giving back. Between requests glibc keeps the freed memory in its heaps (with the tunables, all of it; without,
big blocks stop being mmap'ed once the dynamic threshold has grown), so an idle replica would hold its high-water
mark for good. `malloc_trim(0)` returns those free pages: the replica then holds its weights and little else
between requests (docs/performance.md, "Memory").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

from serve_app import get_logger

logger = get_logger(__name__)

# One arena: freed blocks of any thread stay where the next pass of any thread finds them (per-thread arenas
# unmapped theirs). No mmap: a block over 32 MB would be mapped and unmapped on every pass. No trimming while
# busy: `release_free_memory` returns the free pages once the replica is idle.
MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def replica_env(reuse: bool, inherited: str | None = None) -> dict[str, str]:
    """Environment variables for a model replica's process (Ray's runtime_env `env_vars`). Tunables the operator
    already set in GLIBC_TUNABLES are kept, after ours, so theirs win (glibc applies the last of a name)."""
    if not reuse:
        return {}
    inherited = os.environ.get("GLIBC_TUNABLES", "") if inherited is None else inherited
    return {"GLIBC_TUNABLES": ":".join(part for part in (MALLOC_TUNABLES, inherited) if part)}


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
