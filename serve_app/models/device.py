"""Choosing where a model runs."""

from __future__ import annotations

import torch

from serve_app import get_logger


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` uses CUDA when a GPU is visible to this process, else the CPU."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was requested but no CUDA GPU is visible to this process")
    return torch.device(requested)


def set_cpu_threads(num_threads: int | None) -> None:
    """Ray pins OMP_NUM_THREADS=1 in replicas; let the config give a replica more cores."""
    if num_threads and num_threads > 0:
        torch.set_num_threads(int(num_threads))


def lower_cpu_priority(niceness: int) -> int:
    """Raise this process's nice value by `niceness` for every thread it has (Linux keeps one per thread; threads
    started later inherit it from the thread that starts them). Returns how many threads were changed.

    On a CPU box the model replicas share cores with Serve's proxy and the ingress, which answer /health
    (Label Studio gives it 1 s) and the editor's clicks. A niced model replica still gets every idle cycle, but
    yields to them under load."""
    import os

    if niceness <= 0 or not hasattr(os, "setpriority"):
        return 0
    changed = 0
    try:
        thread_ids = [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        thread_ids = [0]  # not Linux: the calling thread (the process on most Unixes)
    for thread_id in thread_ids:
        try:
            current = os.getpriority(os.PRIO_PROCESS, thread_id)
            os.setpriority(os.PRIO_PROCESS, thread_id, min(19, current + niceness))
            changed += 1
        except OSError:  # the thread ended meanwhile
            continue
    return changed


def autocast_for(device: torch.device, precision: str = "fp32"):
    """fp16/bf16 autocast on CUDA only; on CPU it would be slower and less exact, so it stays fp32."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        get_logger(__name__).warning("PRECISION=%s applies to GPUs only; running fp32 on %s", precision, device)
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device_type="cuda", dtype=dtype)
