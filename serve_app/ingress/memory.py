"""A byte budget for decoded images in one ingress replica.

Without it, `max_ongoing_requests` x `TASK_CONCURRENCY` tasks could each hold a decoded image and its
full-resolution masks at once (a 5 KiB 1-bit PNG of 40 MP decodes to 120 MB). A task takes its share
before decoding, from the image header, and gives it back when its pixels and masks are no longer needed.
A task waits for budget; it does not fail. A task larger than the whole budget runs alone.
"""

from __future__ import annotations

import asyncio
import contextlib


class ByteBudget:
    def __init__(self, capacity: int):
        self.capacity = max(1, int(capacity))
        self.used = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int):
        nbytes = min(max(0, int(nbytes)), self.capacity)
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + nbytes <= self.capacity)
            self.used += nbytes
        try:
            yield
        finally:
            async with self._changed:
                self.used -= nbytes
                self._changed.notify_all()


def task_bytes(width: int, height: int, masks: int) -> int:
    """What one task holds at its peak: the encoded and RGB pixels with a conversion's working copy (8 bytes a
    pixel; 16-bit and float images convert through float32), and `masks` boolean masks at full size."""
    return width * height * (8 + masks)
