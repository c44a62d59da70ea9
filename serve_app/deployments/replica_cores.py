"""Sharing a CPU node's cores among the model replicas that are working right now.

Splitting the cores once between the model roles (Grounding DINO and SAM on one core each, on a 2-core node)
leaves a core idle whenever one stage waits for the other. At 800 px Grounding DINO takes about five times
as long as SAM, so SAM's core idled most of the time and the service ran at 0.71 of the bare models'
throughput. Here each replica marks itself busy for the length of a batch. It takes the node's cores divided by
the replicas busy at that moment: all of them when it works alone, an equal share beside others. The marks are
files named by process id in a node-local directory (/dev/shm when there is one), so replicas from any
application on the node count, and a mark left by a killed process is ignored once its process is gone.

A batch of a big model is long (Grounding DINO at 800 px: 10-20 s on CPU), so the share is taken again while it
runs: a forward pre-hook on every torch module (torch's public global hook) re-reads the marks at most every
`RECHECK_S` and changes the working thread's torch threads when the count of busy batches has changed.

A replica may run several batches at once on CPU, one per lane (serve_app.deployments.batching): each lane marks
itself (`PID` for the first, `PID.LANE` for the others) and counts as one busy batch. torch's thread count is
the process's, and every lane takes the same share from the same marks, so the lanes agree on it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

from serve_app import get_logger

logger = get_logger(__name__)

# A mark older than this is from a process whose id was reused, not from a batch still running.
STALE_AFTER_S = 3600.0
# How often a running batch re-reads the marks (a directory listing: tens of microseconds).
RECHECK_S = 0.05

_working = threading.local()  # .lane: the batch this thread is running, if any
_hook_installed = False


def _default_directory() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"grounded-serve-busy-{os.getuid() if hasattr(os, 'getuid') else 0}"


class CoreShare:
    def __init__(self, cores: int, directory: Path | None = None):
        self.cores = max(1, int(cores))
        self.directory = directory or _default_directory()

    def busy_batches(self) -> int:
        """Batches running on this node right now (marked by live processes), this replica's included."""
        count = 0
        try:
            marks = list(self.directory.iterdir())
        except OSError:
            return 1
        for mark in marks:
            pid = mark.name.split(".", 1)[0]
            if not pid.isdigit():
                continue
            try:
                stale = time.time() - mark.stat().st_mtime > STALE_AFTER_S
            except FileNotFoundError:  # its batch just ended
                continue
            if _alive(int(pid)) and not stale:
                count += 1
            else:
                mark.unlink(missing_ok=True)  # its replica died mid-batch
        return count

    @contextlib.contextmanager
    def working(self, lane: int = 0) -> Iterator[int]:
        """Marks one batch of this replica busy and sets torch's threads to its share of the cores while the block
        runs (on the thread that runs the model); the share follows the other batches while the block runs."""
        mark = self.directory / (str(os.getpid()) if lane == 0 else f"{os.getpid()}.{lane}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)  # /dev/shm may have been cleaned meanwhile
            mark.touch()
        except OSError as exc:  # nowhere to mark: this batch keeps the threads it has
            logger.warning("cannot mark this replica busy in %s (%s); torch threads stay at %d", self.directory, exc,
                           torch.get_num_threads())
            yield torch.get_num_threads()
            return
        _install_hook()
        running = _Lane(self)
        try:
            running.take_share()
            _working.lane = running
            yield running.threads
        finally:
            _working.lane = None
            mark.unlink(missing_ok=True)


class _Lane:
    """One running batch's thread count, re-read from the marks at most every RECHECK_S."""

    def __init__(self, share: CoreShare):
        self.share = share
        self.threads = 0
        self.checked = 0.0

    def take_share(self) -> None:
        self.checked = time.monotonic()
        self.threads = max(1, self.share.cores // max(1, self.share.busy_batches()))
        if self.threads != torch.get_num_threads():  # the process's count: another lane may have set it since
            torch.set_num_threads(self.threads)

    def recheck(self) -> None:
        if time.monotonic() - self.checked >= RECHECK_S:
            self.take_share()


def _install_hook() -> None:
    global _hook_installed
    if not _hook_installed:
        torch.nn.modules.module.register_module_forward_pre_hook(_before_forward)
        _hook_installed = True


def _before_forward(module, inputs) -> None:
    if torch.compiler.is_compiling():  # a compiled graph's threads are fixed (serve_app.models.compiled)
        return
    lane = getattr(_working, "lane", None)
    if lane is not None:
        lane.recheck()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def lower_cpu_priority(niceness: int) -> int:
    """Raise this process's nice value by `niceness` for every thread it has (Linux keeps one per thread; threads
    started later inherit it from the thread that starts them). Returns how many threads were changed.

    On a CPU box the model replicas share cores with Serve's proxy and the ingress, which answer /health
    (Label Studio gives it 1 s) and the editor's clicks. A niced model replica still gets every idle cycle, but
    yields to them under load."""
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
