"""Sharing a CPU node's cores among the model replicas that are working right now.

Splitting the cores once between the model roles (Grounding DINO and SAM on one core each, on a 2-core node)
leaves a core idle whenever one stage waits for the other. At 800 px Grounding DINO takes about five times
as long as SAM, so SAM's core idled most of the time and the service ran at 0.71 of the bare models'
throughput. Here each replica marks itself busy for the length of a batch. It takes the node's cores divided by
the replicas busy at that moment: all of them when it works alone, an equal share beside others. The marks are
files named by process id in a node-local directory (/dev/shm when there is one), so replicas from any
application on the node count, and a mark left by a killed process is ignored once its process is gone.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

# A mark older than this is from a process whose id was reused, not from a batch still running.
STALE_AFTER_S = 3600.0


def _default_directory() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"grounded-serve-busy-{os.getuid() if hasattr(os, 'getuid') else 0}"


class CoreShare:
    def __init__(self, cores: int, directory: Path | None = None):
        self.cores = max(1, int(cores))
        self.directory = directory or _default_directory()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._mark = self.directory / str(os.getpid())

    def busy_replicas(self) -> int:
        """Replicas (live processes) marked busy on this node, this one included when it is."""
        count = 0
        for mark in self.directory.iterdir():
            if not mark.name.isdigit():
                continue
            try:
                stale = time.time() - mark.stat().st_mtime > STALE_AFTER_S
            except FileNotFoundError:  # its batch just ended
                continue
            if _alive(int(mark.name)) and not stale:
                count += 1
            else:
                mark.unlink(missing_ok=True)  # its replica died mid-batch
        return count

    @contextlib.contextmanager
    def working(self) -> Iterator[int]:
        """Marks this replica busy and sets torch's threads to its share of the cores while the block runs."""
        self._mark.touch()
        try:
            threads = max(1, self.cores // max(1, self.busy_replicas()))
            torch.set_num_threads(threads)
            yield threads
        finally:
            self._mark.unlink(missing_ok=True)


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
