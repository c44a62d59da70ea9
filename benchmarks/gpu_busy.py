"""How busy the GPU was while a load ran: NVML's utilisation sampled on a thread (nvidia-ml-py).

NVML's `utilization.gpu` is the share of its last sample period (1/6 s to 1 s, by card) in which at least one
kernel ran: a GPU "busy" at 100 % may still run small kernels that fill a fraction of its multiprocessors, which
is what the FLOP utilisation (benchmarks.flop_utilisation) shows. Where there is no NVML or no GPU (a CPU run),
the result says so instead of failing the benchmark.
"""

from __future__ import annotations

import statistics
import threading
import time


class GpuBusy:
    """`with GpuBusy() as busy: run()` then `busy.result()`."""

    def __init__(self, every_s: float = 0.1, device_index: int = 0):
        self.every_s = every_s
        self.device_index = device_index
        self.samples: list[int] = []
        self.memory_mb: list[float] = []
        self.why_not = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._seconds = 0.0

    def __enter__(self) -> "GpuBusy":
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except Exception as error:  # noqa: BLE001 - no package, no driver or no GPU: say which
            self.why_not = f"{type(error).__name__}: {error}"[:300]
            return self
        self._thread = threading.Thread(target=self._sample, args=(pynvml, handle), daemon=True, name="gpu-busy")
        self._started = time.monotonic()
        self._thread.start()
        return self

    def _sample(self, pynvml, handle) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                self.memory_mb.append(pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
            except Exception as error:  # noqa: BLE001 - keep what was sampled
                self.why_not = f"{type(error).__name__}: {error}"[:300]
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._seconds = time.monotonic() - self._started

    def result(self) -> dict:
        if not self.samples:
            return {"available": False, "why": self.why_not or "no sample taken"}
        ordered = sorted(self.samples)
        return {
            "available": True, "samples": len(self.samples), "seconds": round(self._seconds, 1),
            "mean_percent": round(statistics.fmean(self.samples), 1),
            "p50_percent": ordered[len(ordered) // 2],
            "share_of_samples_at_least_80": round(sum(s >= 80 for s in self.samples) / len(self.samples), 3),
            "share_of_samples_idle": round(sum(s == 0 for s in self.samples) / len(self.samples), 3),
            "memory_used_mb_max": round(max(self.memory_mb), 1) if self.memory_mb else None,
        }
