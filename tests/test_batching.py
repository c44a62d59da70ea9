"""ModelBatcher: the model takes everything that queued while it was busy, without Ray."""

import asyncio
import threading
import time

import pytest

from serve_app.deployments.batching import BatchConfig, ModelBatcher


def test_requests_that_arrive_during_a_run_share_the_next_batch():
    batches = []
    release = threading.Event()

    def model(items):
        batches.append(list(items))
        if len(batches) == 1:
            release.wait(5)  # the first batch is busy while the others arrive
        return [item * 10 for item in items]

    async def scenario():
        batcher = ModelBatcher(model, max_batch_size=4)
        first = asyncio.ensure_future(batcher.run([1]))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.run([i])) for i in range(2, 8)]  # 6 callers while busy
        await asyncio.sleep(0.05)
        release.set()
        return await first, [await r for r in rest]

    first, rest = asyncio.run(scenario())
    assert first == [(10, 1)]
    assert batches == [[1], [2, 3, 4, 5], [6, 7]]  # full batches from the queue, in arrival order
    assert [r[0] for r in rest] == [(20, 4), (30, 4), (40, 4), (50, 4), (60, 2), (70, 2)]


def test_an_idle_model_runs_a_lone_request_at_once():
    async def scenario():
        batcher = ModelBatcher(lambda items: items, max_batch_size=8)
        started = time.perf_counter()
        result = await batcher.run(["x"])
        return result, time.perf_counter() - started

    result, elapsed = asyncio.run(scenario())
    assert result == [("x", 1)] and elapsed < 1.0


def test_a_failing_batch_fails_its_callers_only():
    def model(items):
        if "bad" in items:
            raise ValueError("broken input")
        return items

    async def scenario():
        batcher = ModelBatcher(model, max_batch_size=1)
        bad = asyncio.ensure_future(batcher.run(["bad"]))
        good = asyncio.ensure_future(batcher.run(["good"]))
        with pytest.raises(ValueError, match="broken input"):
            await bad
        return await good

    assert asyncio.run(scenario()) == [("good", 1)]


def test_cancelled_callers_are_skipped():
    seen = []
    release = threading.Event()

    def model(items):
        seen.extend(items)
        if items == ["a"]:
            release.wait(5)
        return items

    async def scenario():
        batcher = ModelBatcher(model, max_batch_size=8)
        a = asyncio.ensure_future(batcher.run(["a"]))
        await asyncio.sleep(0.05)
        b = asyncio.ensure_future(batcher.run(["b"]))
        c = asyncio.ensure_future(batcher.run(["c"]))
        await asyncio.sleep(0.01)
        b.cancel()
        release.set()
        return await a, await c

    assert asyncio.run(scenario()) == ([("a", 1)], [("c", 1)])
    assert seen == ["a", "c"]


def test_batch_config_rejects_unknown_and_negative_values():
    assert BatchConfig.from_user_config({"max_batch_size": 4}).max_batch_size == 4
    with pytest.raises(ValueError, match="unknown"):
        BatchConfig.from_user_config({"max_batch": 4})
    with pytest.raises(ValueError, match="invalid"):
        BatchConfig.from_user_config({"batch_wait_timeout_s": -1})
