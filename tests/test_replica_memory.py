"""A model replica's host memory (serve_app.deployments.replica_memory), where glibc is the allocator: with the replica's
malloc tunables a forward pass reuses the memory the previous one freed instead of faulting it in afresh, and
release_free_memory gives freed heap pages back to the OS (malloc_trim) once the replica is idle."""

import ctypes.util
import json
import os
import platform
import subprocess
import sys

import pytest

from serve_app.deployments.replica_memory import MALLOC_TUNABLES, replica_env

GLIBC = platform.system() == "Linux" and "musl" not in (ctypes.util.find_library("c") or "")

# A forward pass's pattern, on a worker thread as in a replica's batcher: activations of 8 to 96 MiB (several over
# glibc's 32 MiB mmap ceiling) allocated, filled and freed, pass after pass.
PASSES = r"""
import json, resource, threading, psutil, torch
from serve_app.deployments.replica_memory import release_free_memory
faults = []
def forward_passes():
    for _ in range(24):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        kept = [torch.ones(mib << 18) for mib in (8, 96, 24, 64, 48)]  # filled: every page touched
        del kept
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=forward_passes)
worker.start()
worker.join()
rss = lambda: psutil.Process().memory_info().rss / 2**20
busy = rss()
release_free_memory()
print(json.dumps({"faults": faults, "busy_mib": busy, "idle_mib": rss()}))
"""


def run_passes(tunables: str | None) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", PASSES], capture_output=True, text=True, check=True, timeout=120,
                         env={**env, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_replica_env_carries_the_tunables_and_keeps_the_operators_own_last():
    assert replica_env(False) == {}
    assert replica_env(True, inherited="") == {"GLIBC_TUNABLES": MALLOC_TUNABLES}
    mine = "glibc.malloc.arena_max=4"
    assert replica_env(True, inherited=mine) == {"GLIBC_TUNABLES": f"{MALLOC_TUNABLES}:{mine}"}  # last one wins


@pytest.mark.skipif(not GLIBC, reason="glibc's tunables")
def test_with_the_tunables_later_passes_reuse_memory_instead_of_faulting_it_in():
    pass_pages = (8 + 96 + 24 + 64 + 48) * 256  # 4 KiB pages a pass touches
    default = run_passes(None)
    tuned = run_passes(MALLOC_TUNABLES)
    # glibc's defaults map and unmap the big blocks: every pass faults in most of its pages again
    assert min(default["faults"][-3:]) > pass_pages // 2, default
    # tuned, the heap grows for a few passes (2 to 11 in runs here) to its high-water mark, then serves every pass
    # from it
    assert max(tuned["faults"][-3:]) < pass_pages // 50, tuned
    # and what it holds goes back to the OS once idle: at most 64 MiB more stays than with the defaults
    assert tuned["idle_mib"] < default["idle_mib"] + 64, (tuned, default)

PROBE = r"""
import ctypes, psutil
from serve_app.deployments.replica_memory import release_free_memory
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


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_freed_heap_memory_goes_back_to_the_os():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60)
    held, after, released = out.stdout.split()
    assert released == "True"
    assert float(held) - float(after) > 200  # of the 256 MiB freed, the OS got at least 200 back


def test_the_builder_gives_the_model_replicas_the_tunables_only_when_reuse_is_on():
    from serve_app.app import model_actor_options
    from serve_app.settings import Settings

    on = model_actor_options(Settings.load(env={"MODEL_MALLOC_REUSE": "true"}))
    assert on["runtime_env"]["env_vars"]["GLIBC_TUNABLES"].startswith(MALLOC_TUNABLES)
    assert model_actor_options(Settings.load(env={"MODEL_MALLOC_REUSE": "false"})) == {}
