"""release_free_memory gives freed heap pages back to the OS (glibc's malloc_trim), where glibc is the allocator."""

import ctypes.util
import platform
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, psutil
from serve_app.models.host_memory import release_free_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
block = 64 * 1024  # below glibc's mmap threshold: these live in the heap, as a model's freed activations do
blocks = [libc.malloc(block) for _ in range(4096)]  # 256 MiB
for pointer in blocks:
    ctypes.memset(pointer, 1, block)
guard = libc.malloc(block)  # keeps the heap's top in use, so free() alone cannot shrink it
for pointer in blocks:
    libc.free(pointer)
rss = lambda: psutil.Process().memory_info().rss / 2**20
held = rss()
released = release_free_memory()
print(held, rss(), released)
"""


@pytest.mark.skipif(platform.system() != "Linux" or "musl" in (ctypes.util.find_library("c") or ""),
                    reason="malloc_trim is glibc's")
def test_freed_heap_memory_goes_back_to_the_os():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60)
    held, after, released = out.stdout.split()
    assert released == "True"
    assert float(held) - float(after) > 200  # of the 256 MiB freed, the OS got at least 200 back
