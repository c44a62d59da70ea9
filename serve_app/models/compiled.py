"""`torch.compile` for an image encoder, compiled and warmed up before the replica serves (COMPILE_ENCODERS).

A SAM-family image encoder always sees the same square input, so one graph serves every image. It is meant for
GPUs, where a replica's one CPU thread launches every kernel and a compiled graph launches fewer; on the
project's 2-core CPU, under the replicas' allocator, it made MobileSAM's encoder 1.2× faster and SAM ViT-B's 1.04×
(benchmarks/compiled_encoders.py, docs/models.md). Compiling costs time once per process (a minute or more on a
CPU, seconds when inductor's on-disk cache already holds the graphs), so the replica does it in its constructor,
not on a request.
A compiler failure, at warm-up or later, falls back to the eager module: the same answers, only slower.

On a CPU, inductor writes the torch thread count into its kernels and guards on it, while a CPU replica's threads
follow its share of the node's cores (serve_app.deployments.replica_cores). So the encoder is compiled for a few
counts (the cores, halved down to one) and a batch runs on the largest of them within its share: never more
threads than the share, never a compile on a request.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

import torch

from serve_app import get_logger

logger = get_logger(__name__)

# COMPILE_ENCODERS values -> torch.compile's mode; "cudagraphs" also replays CUDA graphs (CUDA only)
COMPILE_MODES = {"off": None, "on": "default", "cudagraphs": "reduce-overhead"}


def compile_mode(setting: str, device: torch.device) -> str | None:
    """torch.compile's mode for a COMPILE_ENCODERS value on this device (None: stay eager)."""
    mode = COMPILE_MODES[setting]
    if mode == "reduce-overhead" and device.type != "cuda":
        logger.warning("COMPILE_ENCODERS=cudagraphs needs a CUDA device; compiling for %s without CUDA graphs", device)
        return "default"
    return mode


def halvings(cores: int) -> tuple[int, ...]:
    """Thread counts to compile a CPU encoder for: the cores, halved down to one (16 -> 16, 8, 4, 2, 1)."""
    counts = [max(1, int(cores))]
    while counts[-1] > 1:
        counts.append(counts[-1] // 2)
    return tuple(sorted(counts))


def compiled_encoder(forward: Callable, setting: str, device: torch.device, name: str) -> "CompiledEncoder":
    """The encoder a model calls, for a COMPILE_ENCODERS value: on a CPU compiled for the cores' halvings."""
    from serve_app.models.device import usable_cores

    mode = compile_mode(setting, device)
    return CompiledEncoder(forward, mode, name, halvings(usable_cores()) if mode and device.type == "cpu" else ())


class CompiledEncoder:
    """Calls a compiled copy of `module` while it works, else `module` itself.

    `warm_up` compiles for each thread count (CPU) and batch size given. On a GPU, batches of one image and then
    of two: the second shape makes torch.compile generalise the batch dimension, so any later batch size reuses
    that graph instead of compiling on a request.
    """

    def __init__(self, module: Callable, mode: str | None, name: str, thread_counts: tuple[int, ...] = ()):
        self.module = module  # a bound method, not the module: module hooks must not run around the compiled graph
        self.name = name
        self.mode = mode
        self.thread_counts = tuple(sorted(set(thread_counts)))  # CPU: the counts compiled for; empty: any (GPU)
        self._compiled = torch.compile(module, mode=mode) if mode else None
        self._lock = threading.Lock()
        self._cpu_call = threading.Lock()
        self.compile_seconds = 0.0

    @property
    def active(self) -> bool:
        """Whether calls go through the compiled graph."""
        return self._compiled is not None

    def __call__(self, batch: torch.Tensor):
        compiled = self._compiled
        if compiled is not None:
            try:
                with self._compiled_threads():
                    if self.mode == "reduce-overhead":  # a CUDA graph's next replay overwrites its outputs
                        torch.compiler.cudagraph_mark_step_begin()
                        return _owned(compiled(batch))
                    return compiled(batch)
            except torch.OutOfMemoryError:  # the batch's, not the compiler's: eager would need the memory too
                raise
            except Exception as exc:  # the compiler's failure is not the request's: eager gives the same answer
                self._give_up(exc)
        return self.module(batch)

    def batch_size(self, requested: int) -> int:
        """Images per encoder call: one on a CPU, where one graph per thread count then serves every batch."""
        return 1 if self.thread_counts else requested

    def warm_up_on(self, example: Callable[[], torch.Tensor], encode: Callable[[torch.Tensor], object],
                   batch_size: int) -> None:
        """Compile now, encoding copies of `example()` (one prepared image) through `encode`, as serving does."""
        if self._compiled is None:
            return
        pixels = example()
        with torch.inference_mode():
            self.warm_up(lambda n: encode(pixels.repeat(n, 1, 1, 1)), (1, 2) if batch_size > 1 else (1,))

    def warm_up(self, run: Callable[[int], object], batch_sizes: tuple[int, ...] = (1, 2)) -> None:
        """Compile now: `run(n)` must encode a batch of n images the way serving does (same grad mode and autocast,
        which torch.compile's guards check)."""
        if self._compiled is None:
            return
        started, threads = time.perf_counter(), torch.get_num_threads()
        try:
            for count in self.thread_counts or (threads,):
                torch.set_num_threads(count)
                for size in batch_sizes:
                    run(size)
                    if self._compiled is None:  # the first failure already fell back to eager
                        return
        finally:
            torch.set_num_threads(threads)
        self.compile_seconds = time.perf_counter() - started
        logger.info("%s: compiled (torch.compile mode %s) and warmed up for batches of %s%s in %.1f s", self.name,
                    self.mode, " and ".join(map(str, batch_sizes)),
                    f" on {', '.join(map(str, self.thread_counts))} threads" if self.thread_counts else "",
                    self.compile_seconds)

    @contextlib.contextmanager
    def _compiled_threads(self) -> Iterator[None]:
        """Runs on the largest compiled thread count within the current one (the batch's share of the cores).
        One call at a time on a CPU: the count is the process's, and another call's count must not reach this
        call's guards (a count not compiled for would compile on the request)."""
        if not self.thread_counts:
            yield
            return
        with self._cpu_call:
            current = torch.get_num_threads()
            fitting = [count for count in self.thread_counts if count <= current]
            wanted = fitting[-1] if fitting else self.thread_counts[0]
            if wanted != current:
                torch.set_num_threads(wanted)
            try:
                yield
            finally:
                if wanted != current:
                    torch.set_num_threads(current)

    def _give_up(self, exc: Exception) -> None:
        with self._lock:
            if self._compiled is None:
                return
            self._compiled = None
        logger.warning("%s: torch.compile failed (%s: %s); running the encoder eagerly from now on", self.name,
                       type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")


def _owned(value):
    """Copies of the tensors in an encoder's output (a tensor, or lists, tuples and dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_owned(item) for item in value)
    if isinstance(value, dict):
        copied = value.copy()  # keeps a transformers ModelOutput's class
        for key, item in value.items():
            copied[key] = _owned(item)
        return copied
    return value
