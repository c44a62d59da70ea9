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


def takes_tensors(image_processor) -> bool:
    """Whether a transformers image processor is torchvision-based (tensor input, a `device` to work on)."""
    backend = getattr(image_processor, "backend", None)
    return backend == "torchvision" or bool(getattr(image_processor, "is_fast", False))


def set_cpu_threads(num_threads: int | None) -> None:
    """Ray pins OMP_NUM_THREADS=1 in replicas; let the config give a replica more cores."""
    if num_threads and num_threads > 0:
        torch.set_num_threads(int(num_threads))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; a container's cgroup limit is not visible here)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cpu_bf16_instructions() -> str | None:
    """The CPU's bf16 matrix instructions ("amx_bf16" or "avx512_bf16"), or None. Read from the kernel's CPU flags:
    without them torch emulates bf16 on CPU, which is slower than fp32, so bf16 is only used where they exist."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:  # not Linux: no way to tell here, so no bf16
        return None
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags), None)


def effective_precision(device: torch.device, requested: str = "fp32") -> str:
    """What PRECISION means on this device: fp16/bf16 autocast on CUDA; bf16 autocast on a CPU with bf16 matrix
    instructions (AMX or AVX-512 BF16); fp32 otherwise, said once in the log."""
    logger = get_logger(__name__)
    if requested == "fp32" or device.type == "cuda":
        return requested
    if device.type == "cpu" and requested == "bf16":
        instructions = cpu_bf16_instructions()
        if instructions:
            logger.info("PRECISION=bf16 on CPU: autocast to bf16 (%s detected)", instructions)
            return "bf16"
        logger.warning("PRECISION=bf16: this CPU has no bf16 matrix instructions (AMX or AVX-512 BF16), where bf16 "
                       "would be slower than fp32; running fp32")
        return "fp32"
    logger.warning("PRECISION=%s applies to CUDA GPUs (and bf16 to CPUs with AMX or AVX-512 BF16); running fp32 on "
                   "%s", requested, device)
    return "fp32"


def autocast_for(device: torch.device, precision: str = "fp32"):
    """Autocast for a precision that `effective_precision` already resolved for this device."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)
