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
