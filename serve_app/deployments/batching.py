"""One batching layer for the model deployments: `ModelBatcher`, with its settings from `user_config`.

Why not `@serve.batch`: it closes a batch when `batch_wait_timeout_s` passes and only then waits for the
model to be free, so requests that arrive while a batch runs form batches of one that queue behind it
(measured: 51 of 68 detector batches had one item on a 64-task request). `ModelBatcher` gives the model
everything that queued while it was busy: no idle wait when the replica is quiet, full batches when it is
loaded. Its settings are read in the deployment's `reconfigure`, so `serve deploy` changes them live.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from serve_app import get_logger
from serve_app.deployments.replica_cores import CoreShare
from serve_app.models.device import set_cpu_threads, usable_cores
from serve_app.deployments.replica_memory import release_free_memory
from serve_app.deployments.replica_placement import log_placement
from serve_app.models.messages import Priority

logger = get_logger(__name__)

DEFAULT_MAX_BATCH_SIZE = 8
# `when_idle` runs once the queue has stayed empty this long: a replica that answers clicks one after another
# keeps its memory warm, one left idle gives back what its last batch freed (serve_app.deployments.replica_memory).
IDLE_AFTER_S = 2.0


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_wait_timeout_s: float = 0.0  # wait this long for more items only when the model is idle
    # 0 = on CPU the usable cores divided by the model replicas busy at that moment, followed while a batch runs
    # (serve_app.deployments.replica_cores): a stage working alone gets every core, and running more threads than cores
    # (slower by a quarter) is avoided; on GPU Ray's default.
    torch_threads: int = 0
    # On CPU a batch holds only as many items as the model runs in about this long: batching a big model there
    # gains nothing (Grounding DINO at 800 px was 24 % slower per image in batches of 4) and delays every item of
    # the batch, while small models still batch fully. 0 = no cap. GPUs are not capped.
    cpu_batch_s: float = 1.0
    # A batch of background items (Priority.BACKGROUND) holds only as many as the model runs in this long, so a
    # click arriving meanwhile waits at most about that; 0 = no cap. On a GPU the cap is max_batch_size anyway.
    background_batch_s: float = 0.25
    # On CPU, batches that cpu_batch_s holds to one item (a big model) run side by side, up to this many at once,
    # each on its share of the cores: two one-thread Grounding DINO passes at 800 px ran 1.12-1.30x the images/s
    # of one two-thread pass. 0 = the node's usable cores (when torch_threads is 0); 1 = one batch at a time.
    # Only models that declare `concurrent_batches` run in lanes.
    cpu_lanes: int = 0

    @classmethod
    def from_user_config(cls, user_config: Mapping[str, Any] | None) -> "BatchConfig":
        config = dict(user_config or {})
        unknown = set(config) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown user_config key(s): {', '.join(sorted(unknown))}")
        parsed = cls(
            max_batch_size=int(config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)),
            batch_wait_timeout_s=float(config.get("batch_wait_timeout_s", 0.0)),
            torch_threads=int(config.get("torch_threads", 0)),
            cpu_batch_s=float(config.get("cpu_batch_s", 1.0)),
            background_batch_s=float(config.get("background_batch_s", 0.25)),
            cpu_lanes=int(config.get("cpu_lanes", 0)),
        )
        if (parsed.max_batch_size < 1 or not parsed.batch_wait_timeout_s >= 0 or parsed.torch_threads < 0
                or not parsed.background_batch_s >= 0 or not parsed.cpu_batch_s >= 0 or parsed.cpu_lanes < 0):
            raise ValueError(f"invalid batch settings: {parsed}")
        return parsed


class ModelBatcher:
    """Runs a batch function on a worker thread; each run takes every item waiting, up to `max_batch_size`.

    A batch function takes a list of items and returns one result per item. When it raises, the items of
    that batch are run again one by one, so only the item that fails gets the error: a bad image never
    fails the other callers' items that happened to share its batch.

    Items with a lower `priority` attribute (serve_app.models.messages.Priority) are taken first, in arrival
    order within a priority, and a batch holds one priority: a click queued behind a background job's items
    is the very next batch, with the other clicks waiting but none of the background items. Background batches
    are kept short (`background_batch_s`) so the batch a click waits for is short too.

    On CPU, when batches are held to one item by `cpu_batch_s` and more items wait, a model that declares
    `concurrent_batches` runs up to `cpu_lanes` batches at once on worker threads; CoreShare gives each its share
    of the cores. One item alone still gets every core.
    """

    def __init__(self, batch_fn: Callable[[list], list], *, config: BatchConfig = BatchConfig(),
                 on_batch: Callable[[int, list[float]], None] | None = None, on_cpu: bool = False,
                 when_idle: Callable[[], Any] | None = None, idle_after_s: float = IDLE_AFTER_S,
                 concurrent_batches: bool = False):
        self.batch_fn = batch_fn
        self.concurrent_batches = concurrent_batches  # batch_fn may run on several threads at once
        self.config = config
        self.on_cpu = on_cpu  # batches are capped by time (BatchConfig.cpu_batch_s)
        self.on_batch = on_batch  # called on the event loop with each batch's size and its items' queue waits
        self.when_idle = when_idle  # called on a worker thread once no batch has run for idle_after_s
        self.idle_after_s = idle_after_s
        self.core_share: CoreShare | None = None  # on CPU: torch threads chosen per batch (set by reconfigure)
        self._batches_run = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._pending: list[tuple[int, int, Any, asyncio.Future, float]] = []  # a heap
        self._arrivals = itertools.count()
        self._item_seconds = 0.0  # moving average of the model's time per item
        self._arrived = asyncio.Event()
        self._runner: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        """The item's result, computed in a batch with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        priority = int(getattr(item, "priority", 0))
        heapq.heappush(self._pending, (priority, next(self._arrivals), item, future, time.monotonic()))
        self._arrived.set()
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        lanes: dict[int, asyncio.Task] = {}  # lane number -> the batch it runs
        while self._pending or lanes:
            if self._pending and len(lanes) < self._lane_limit():
                if not lanes:
                    await self._fill_while_idle()
                taken = self._take_batch()
                batch = [(item, future, queued) for _, _, item, future, queued in taken if not future.done()]
                if batch:  # else every caller of it was cancelled
                    lane = min(set(range(len(lanes) + 1)) - set(lanes))
                    lanes[lane] = asyncio.create_task(self._run_batch(batch, lane))
                continue
            # every lane busy (or nothing waiting): go on when a batch ends or an item arrives for a free lane
            self._arrived.clear()
            arrival = asyncio.ensure_future(self._arrived.wait())
            await asyncio.wait([*lanes.values(), arrival], return_when=asyncio.FIRST_COMPLETED)
            arrival.cancel()
            for lane, task in list(lanes.items()):
                if task.done():
                    del lanes[lane]
                    task.result()
        self._arm_idle_timer()

    def _lane_limit(self) -> int:
        """How many batches may run at once: more than one only on CPU, for a model whose batches hold one item."""
        config = self.config
        if not (self.on_cpu and self.concurrent_batches and config.cpu_batch_s and self._item_seconds):
            return 1
        if self._item_seconds * 2 <= config.cpu_batch_s:  # batches of two or more: batching, not lanes
            return 1
        if config.cpu_lanes:
            return config.cpu_lanes
        return self.core_share.cores if self.core_share is not None else 1

    async def _run_batch(self, batch: list[tuple[Any, asyncio.Future, float]], lane: int) -> None:
        started = time.monotonic()
        self._batches_run += 1
        outcomes = await asyncio.to_thread(self._run, [item for item, _, _ in batch], lane)
        per_item = (time.monotonic() - started) / len(batch)
        self._item_seconds = per_item if not self._item_seconds else 0.8 * self._item_seconds + 0.2 * per_item
        if self.on_batch is not None:
            self.on_batch(len(batch), [started - queued for _, _, queued in batch])
        for (_, future, _), outcome in zip(batch, outcomes):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _arm_idle_timer(self) -> None:
        if self.when_idle is None:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(self.idle_after_s, self._on_idle, self._batches_run)

    def _on_idle(self, batches_seen: int) -> None:
        if self._pending or self._batches_run != batches_seen:  # work came in meanwhile: its drain re-arms
            return
        future = asyncio.get_running_loop().run_in_executor(None, self.when_idle)
        future.add_done_callback(_log_idle_failure)

    def _take_batch(self) -> list[tuple[int, int, Any, asyncio.Future, float]]:
        """Up to max_batch_size items of the most urgent priority waiting. A batch never mixes priorities: a click
        would otherwise wait for the encoder passes of the background items that filled its batch."""
        first = heapq.heappop(self._pending)
        taken = [first]
        limit = self.config.max_batch_size
        if self._item_seconds:
            if first[0] >= Priority.BACKGROUND and self.config.background_batch_s:
                limit = max(1, min(limit, int(self.config.background_batch_s / self._item_seconds)))
            if self.on_cpu and self.config.cpu_batch_s:
                limit = max(1, min(limit, int(self.config.cpu_batch_s / self._item_seconds)))
        while self._pending and len(taken) < limit and self._pending[0][0] == first[0]:
            taken.append(heapq.heappop(self._pending))
        return taken

    async def _fill_while_idle(self) -> None:
        """With batch_wait_timeout_s > 0, an idle model waits that long for a fuller batch."""
        wait_s = self.config.batch_wait_timeout_s
        if wait_s <= 0:
            return
        deadline = time.monotonic() + wait_s
        while len(self._pending) < self.config.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _run(self, items: list, lane: int = 0) -> list:
        """Results, or per item the exception it raised (on the worker thread)."""
        with self.core_share.working(lane) if self.core_share is not None else contextlib.nullcontext():
            return self._run_items(items)

    def _run_items(self, items: list) -> list:
        try:
            results = self.batch_fn(items)
            if len(results) != len(items):
                raise RuntimeError(f"the model returned {len(results)} results for {len(items)} items")
            return list(results)
        except Exception as exc:  # noqa: BLE001 - isolated below
            if len(items) == 1:
                return [exc]
            logger.warning("a batch of %d failed (%s: %s); running its items one by one", len(items),
                           exc.__class__.__name__, exc)
        outcomes = []
        for item in items:
            try:
                outcomes.append(self.batch_fn([item])[0])
            except Exception as exc:  # noqa: BLE001 - this item's caller gets it
                outcomes.append(exc)
        return outcomes


def _log_idle_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("the idle hook failed: %r", future.exception())


class BatchedModelDeployment:
    """What both model deployments share: a ModelBatcher and its live settings."""

    batcher: ModelBatcher
    cpu_share: int = 1  # model roles whose replicas share this node's cores

    def loaded(self) -> None:
        """The end of a constructor: what loading freed (the checkpoint's copy of the weights) goes back now, not after
        the first batch. With the replicas' malloc tunables glibc keeps it until trimmed (ViT-B: 1,393 MB after
        loading, 1,036 MB trimmed)."""
        release_free_memory()
        log_placement(type(self).__name__, self.model.device)

    def reconfigure(self, user_config: dict) -> None:
        config = BatchConfig.from_user_config(user_config)
        self.batcher.config = config
        on_cpu = self.model.device.type == "cpu"
        self.batcher.on_cpu = on_cpu
        threads = config.torch_threads or (max(1, usable_cores() // max(1, self.cpu_share)) if on_cpu else 0)
        set_cpu_threads(threads)
        # torch_threads 0 on CPU: each batch takes the node's cores divided by the model replicas busy at that moment
        self.batcher.core_share = CoreShare(usable_cores()) if on_cpu and not config.torch_threads else None
        logger.info("%s: max_batch_size %d%s, torch threads %s", type(self).__name__, config.max_batch_size,
                    f" (on CPU capped to about {config.cpu_batch_s:g} s of work)" if on_cpu and config.cpu_batch_s
                    else "", "shared per batch among the busy model replicas" if self.batcher.core_share
                    else threads or "Ray's default")
