"""The ingress's threads for CPU work (decoding, RLE, polygons, JSON), taking the most urgent work first.

Few threads on purpose: this work holds the GIL much of the time, and more threads would starve the event loop
that answers /health and feeds the model replicas. With a background job queueing decodes and RLE, a click from
the editor must not wait behind them: work is taken by priority (serve_app.models.messages.Priority), then in
arrival order.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import Any, Callable


class PriorityPool:
    def __init__(self, threads: int, name: str = "ingress-cpu"):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._arrivals = itertools.count()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    async def run(self, priority: int, function: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((int(priority), next(self._arrivals), function, future, loop))
        return await future

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put((float("inf"), next(self._arrivals), None, None, None))

    def _work(self) -> None:
        while True:
            _, _, function, future, loop = self._queue.get()
            if function is None:
                return
            if future.cancelled():  # its caller gave up (a cancelled request): skip the work
                continue
            try:
                result = function()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
