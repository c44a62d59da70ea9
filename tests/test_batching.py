"""ModelBatcher: the model takes everything that queued while it was busy, and a bad item fails only itself."""

import asyncio
import threading
import time

import pytest

from serve_app.deployments.batching import BatchConfig, ModelBatcher
from tests.waiting import until


def batcher_of(model, max_batch_size=8, batch_wait_timeout_s=0.0, sizes=None):
    on_batch = (lambda size, waits: sizes.append((size, len(waits)))) if sizes is not None else None
    return ModelBatcher(model, config=BatchConfig(max_batch_size=max_batch_size,
                                                  batch_wait_timeout_s=batch_wait_timeout_s), on_batch=on_batch)


def test_requests_that_arrive_during_a_run_share_the_next_batch():
    batches, sizes = [], []
    release = threading.Event()

    def model(items):
        batches.append(list(items))
        if len(batches) == 1:
            release.wait(5)  # the first batch is busy while the others arrive
        return [item * 10 for item in items]

    async def scenario():
        batcher = batcher_of(model, max_batch_size=4, sizes=sizes)
        first = asyncio.ensure_future(batcher.submit(1))
        await until(lambda: batches, 5, "the first batch starting")
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 8)]  # 6 callers while busy
        await until(lambda: len(batcher._pending) == 6, 5, "the six callers queueing")
        release.set()
        return await first, [await r for r in rest]

    first, rest = asyncio.run(scenario())
    assert first == 10
    assert batches == [[1], [2, 3, 4, 5], [6, 7]]  # full batches from the queue, in arrival order
    assert rest == [20, 30, 40, 50, 60, 70]
    assert sizes == [(1, 1), (4, 4), (2, 2)]  # what the deployment's batch-size histogram records


def test_an_idle_model_runs_a_lone_request_at_once():
    async def scenario():
        batcher = batcher_of(lambda items: items)
        started = time.perf_counter()
        result = await batcher.submit("x")
        return result, time.perf_counter() - started

    result, elapsed = asyncio.run(scenario())
    assert result == "x" and elapsed < 1.0


def test_a_batch_wait_collects_items_that_arrive_soon_after():
    batches = []

    def model(items):
        batches.append(list(items))
        return items

    async def scenario():
        batcher = batcher_of(model, max_batch_size=3, batch_wait_timeout_s=2.0)
        first = asyncio.ensure_future(batcher.submit("a"))
        await until(lambda: batcher._pending, 5, "the first item queueing")  # the idle model now waits for more
        others = [asyncio.ensure_future(batcher.submit(x)) for x in "bc"]  # fills the batch: no 2 s wait
        started = time.perf_counter()
        results = [await first] + [await o for o in others]
        return results, time.perf_counter() - started

    results, elapsed = asyncio.run(scenario())
    assert results == ["a", "b", "c"] and batches == [["a", "b", "c"]]
    assert elapsed < 1.5  # a full batch does not wait out the timeout


def test_a_failing_item_fails_only_its_own_caller_even_inside_a_batch():
    calls = []
    release = threading.Event()

    def model(items):
        calls.append(list(items))
        if items == ["first"]:
            release.wait(5)
        if "bad" in items:
            raise ValueError("broken input")
        return [item.upper() for item in items]

    async def scenario():
        batcher = batcher_of(model, max_batch_size=8)
        first = asyncio.ensure_future(batcher.submit("first"))
        await until(lambda: calls, 5, "the first batch starting")
        queued = [asyncio.ensure_future(batcher.submit(x)) for x in ("a", "bad", "b")]  # one batch of three
        await until(lambda: len(batcher._pending) == 3, 5, "the three items queueing")
        release.set()
        outcomes = await asyncio.gather(first, *queued, return_exceptions=True)
        return outcomes

    first, a, bad, b = asyncio.run(scenario())
    assert (first, a, b) == ("FIRST", "A", "B")
    assert isinstance(bad, ValueError) and "broken input" in str(bad)
    assert calls == [["first"], ["a", "bad", "b"], ["a"], ["bad"], ["b"]]  # the batch, then one by one


def test_a_model_returning_the_wrong_count_is_an_error_per_item():
    async def scenario():
        batcher = batcher_of(lambda items: [])
        return await asyncio.gather(batcher.submit(1), return_exceptions=True)

    [outcome] = asyncio.run(scenario())
    assert isinstance(outcome, RuntimeError) and "0 results for 1 items" in str(outcome)


def test_cancelled_callers_are_skipped():
    seen = []
    release = threading.Event()

    def model(items):
        seen.extend(items)
        if items == ["a"]:
            release.wait(5)
        return items

    async def scenario():
        batcher = batcher_of(model)
        a = asyncio.ensure_future(batcher.submit("a"))
        await until(lambda: seen, 5, "the first batch starting")
        b = asyncio.ensure_future(batcher.submit("b"))
        c = asyncio.ensure_future(batcher.submit("c"))
        await until(lambda: len(batcher._pending) == 2, 5, "b and c queueing")  # b is cancelled once queued
        b.cancel()
        release.set()
        return await a, await c

    assert asyncio.run(scenario()) == ("a", "c")
    assert seen == ["a", "c"]


def test_batch_config_rejects_unknown_and_negative_values():
    assert BatchConfig.from_user_config({"max_batch_size": 4}).max_batch_size == 4
    with pytest.raises(ValueError, match="unknown"):
        BatchConfig.from_user_config({"max_batch": 4})
    with pytest.raises(ValueError, match="invalid"):
        BatchConfig.from_user_config({"batch_wait_timeout_s": -1})
    with pytest.raises(ValueError, match="invalid"):
        BatchConfig.from_user_config({"batch_wait_timeout_s": float("nan")})


def test_a_click_queued_behind_background_items_is_in_the_very_next_batch():
    from dataclasses import dataclass

    from serve_app.models.messages import Priority

    @dataclass
    class Item:
        name: str
        priority: int

    batches = []
    release = threading.Event()

    def model(items):
        batches.append([item.name for item in items])
        if len(batches) == 1:
            release.wait(5)
        return [item.name for item in items]

    async def scenario():
        batcher = batcher_of(model, max_batch_size=3)
        running = asyncio.ensure_future(batcher.submit(Item("b0", Priority.BACKGROUND)))
        await until(lambda: batches, 5, "the first batch starting")
        queued = [asyncio.ensure_future(batcher.submit(Item(f"b{i}", Priority.BACKGROUND))) for i in range(1, 5)]
        queued.append(asyncio.ensure_future(batcher.submit(Item("r1", Priority.BATCH))))
        queued.append(asyncio.ensure_future(batcher.submit(Item("click", Priority.INTERACTIVE))))
        await until(lambda: len(batcher._pending) == 6, 5, "the six items queueing")
        release.set()
        await asyncio.gather(running, *queued)

    asyncio.run(scenario())
    # most urgent first, arrival order within a priority, one priority a batch
    assert batches == [["b0"], ["click"], ["r1"], ["b1", "b2", "b3"], ["b4"]]


def test_the_ingress_cpu_pool_takes_the_editors_work_before_background_work():
    from serve_app.ingress.cpu_pool import PriorityPool
    from serve_app.models.messages import Priority

    order = []
    busy, first_started = threading.Event(), threading.Event()

    def work(name):
        def run():
            if name == "first":
                first_started.set()
                busy.wait(5)
            order.append(name)
            return name
        return run

    async def scenario():
        pool = PriorityPool(1)
        first = asyncio.ensure_future(pool.run(Priority.BACKGROUND, work("first")))
        await until(first_started.is_set, 5, "the first work starting")
        later = [asyncio.ensure_future(pool.run(Priority.BACKGROUND, work(f"background{i}"))) for i in range(3)]
        cancelled = asyncio.ensure_future(pool.run(Priority.INTERACTIVE, work("abandoned")))
        click = asyncio.ensure_future(pool.run(Priority.INTERACTIVE, work("click")))
        await until(lambda: pool._queue.qsize() == 5, 5, "the five works queueing")
        cancelled.cancel()
        busy.set()
        results = await asyncio.gather(first, click, *later)
        with pytest.raises(ZeroDivisionError):  # an error reaches its caller
            await pool.run(Priority.INTERACTIVE, lambda: 1 / 0)
        pool.shutdown()
        return results

    assert asyncio.run(scenario())[:2] == ["first", "click"]
    assert order == ["first", "click", "background0", "background1", "background2"]  # the cancelled one skipped


def test_background_batches_last_about_background_batch_s():
    from dataclasses import dataclass

    from serve_app.models.messages import Priority

    @dataclass
    class Item:
        priority: int

    sizes = []

    def model(items):
        time.sleep(0.02 * len(items))  # 20 ms an item
        sizes.append((items[0].priority, len(items)))
        return [0] * len(items)

    async def scenario():
        batcher = ModelBatcher(model, config=BatchConfig(max_batch_size=8, background_batch_s=0.05))
        await batcher.submit(Item(Priority.BACKGROUND))  # measures the model's time per item
        await asyncio.gather(*(batcher.submit(Item(Priority.BACKGROUND)) for _ in range(8)))
        await asyncio.gather(*(batcher.submit(Item(Priority.BATCH)) for _ in range(8)))

    asyncio.run(scenario())
    background = [size for priority, size in sizes[1:] if priority == Priority.BACKGROUND]
    assert max(background) <= 3 and sum(background) == 8  # 0.05 s / 0.02 s an item: 2 a batch
    assert (Priority.BATCH, 8) in sizes  # a Retrieve Label Studio waits for is not capped


@pytest.mark.parametrize("seconds_per_item, on_cpu, largest", [
    (0.15, True, 1),  # a big model on CPU: one item a batch (0.1 s of work caps it)
    (0.005, True, 8),  # a small model on CPU still batches fully
    (0.15, False, 8),  # a GPU is never capped by time
])
def test_cpu_batches_hold_about_cpu_batch_s_of_work(seconds_per_item, on_cpu, largest):
    sizes = []

    def model(items):
        time.sleep(seconds_per_item * len(items))
        sizes.append(len(items))
        return [0] * len(items)

    async def scenario():
        batcher = ModelBatcher(model, config=BatchConfig(max_batch_size=8, cpu_batch_s=0.1), on_cpu=on_cpu)
        await batcher.submit(1)  # measures the model's time per item
        await asyncio.gather(*(batcher.submit(1) for _ in range(9)))

    asyncio.run(scenario())
    assert max(sizes[1:]) == largest and sum(sizes) == 10


class Overlap:
    """A model whose items take `seconds` each, recording how many of its batches ran at once."""

    def __init__(self, seconds):
        self.seconds, self.running, self.most, self.sizes = seconds, 0, 0, []
        self.lock = threading.Lock()

    def __call__(self, items):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.sizes.append(len(items))
        time.sleep(self.seconds * len(items))
        with self.lock:
            self.running -= 1
        return [item * 10 for item in items]


@pytest.mark.parametrize("concurrent, seconds, lanes, most, largest", [
    (True, 0.15, 2, 2, 1),  # a big model on CPU: one-item batches, two at once
    (True, 0.15, 3, 3, 1),
    (False, 0.15, 2, 1, 1),  # a model that did not declare it runs one batch at a time
    (True, 0.005, 2, 1, 8),  # a small model batches instead
])
def test_cpu_lanes_run_one_item_batches_side_by_side(tmp_path, concurrent, seconds, lanes, most, largest):
    import torch

    from serve_app.deployments.replica_cores import CoreShare

    model = Overlap(seconds)

    async def scenario():
        batcher = ModelBatcher(model, config=BatchConfig(max_batch_size=8, cpu_batch_s=0.1, cpu_lanes=lanes),
                               on_cpu=True, concurrent_batches=concurrent)
        batcher.core_share = CoreShare(4, tmp_path)
        assert await batcher.submit(1) == 10  # measures the model's time per item
        return await asyncio.gather(*(batcher.submit(i) for i in range(9)))

    threads = torch.get_num_threads()
    try:
        assert asyncio.run(scenario()) == [i * 10 for i in range(9)]
    finally:
        torch.set_num_threads(threads)
    assert model.most == most and max(model.sizes[1:]) == largest and sum(model.sizes) == 10
    assert list(tmp_path.iterdir()) == []  # every lane's mark is gone


def test_an_item_arriving_while_one_lane_runs_starts_the_next_lane_at_once(tmp_path):
    import torch

    from serve_app.deployments.replica_cores import CoreShare

    first_started, release = threading.Event(), threading.Event()
    seen = []

    def model(items):
        seen.append((items[0], torch.get_num_threads(), len(list(tmp_path.iterdir()))))
        if items[0] == "first":
            first_started.set()
            release.wait(10)
        else:
            time.sleep(0.3)
        return items

    async def scenario():
        batcher = ModelBatcher(model, config=BatchConfig(cpu_batch_s=0.1, cpu_lanes=2), on_cpu=True,
                               concurrent_batches=True)
        batcher.core_share = CoreShare(2, tmp_path)
        await batcher.submit("warm-up")  # 0.3 s an item: batches of one
        first = asyncio.ensure_future(batcher.submit("first"))
        await asyncio.to_thread(first_started.wait, 10)
        second = await asyncio.wait_for(batcher.submit("second"), 5)  # runs while "first" still holds its lane
        release.set()
        return second, await first

    threads = torch.get_num_threads()
    try:
        assert asyncio.run(scenario()) == ("second", "first")
    finally:
        torch.set_num_threads(threads)
    assert seen[0] == ("warm-up", 2, 1)  # alone: every core
    assert seen[2] == ("second", 1, 2)  # beside the first lane: half of them


def test_cpu_lanes_setting_is_validated():
    assert BatchConfig.from_user_config({"cpu_lanes": 3}).cpu_lanes == 3
    with pytest.raises(ValueError):
        BatchConfig.from_user_config({"cpu_lanes": -1})


def test_cpu_replicas_use_every_usable_core_unless_told(monkeypatch):
    """torch_threads 0 means the usable cores shared among the model roles for a CPU model, Ray's default for a GPU
    one."""
    import torch

    from serve_app.deployments.batching import BatchedModelDeployment
    from serve_app.models.device import usable_cores

    class Deployment(BatchedModelDeployment):
        def __init__(self, device):
            self.model = type("Model", (), {"device": torch.device(device)})()
            self.batcher = ModelBatcher(lambda items: items)

    chosen = []
    monkeypatch.setattr("serve_app.deployments.batching.set_cpu_threads", chosen.append)
    Deployment("cpu").reconfigure({"torch_threads": 0})
    shared = Deployment("cpu")
    shared.cpu_share = 2  # Grounding DINO and SAM on one node
    shared.reconfigure({})
    Deployment("cpu").reconfigure({"torch_threads": 3})
    Deployment("cuda").reconfigure({})
    assert chosen == [usable_cores(), max(1, usable_cores() // 2), 3, 0]
    deployment = Deployment("cpu")
    deployment.reconfigure({})
    assert deployment.batcher.on_cpu is True
    assert deployment.batcher.core_share is not None  # threads then chosen per batch (test_replica_cores.py)
    deployment.reconfigure({"torch_threads": 3})
    assert deployment.batcher.core_share is None  # the config's number holds
    gpu = Deployment("cuda")
    gpu.reconfigure({})
    assert gpu.batcher.core_share is None


def test_a_batch_runs_marked_busy_with_its_share_of_the_cores(tmp_path):
    import torch

    from serve_app.deployments.replica_cores import CoreShare

    threads = torch.get_num_threads()
    seen = []

    def model(items):
        seen.append((share.busy_batches(), torch.get_num_threads()))
        return items

    share = CoreShare(3, tmp_path)
    batcher = ModelBatcher(model)
    batcher.core_share = share
    try:
        assert asyncio.run(batcher.submit(5)) == 5
    finally:
        torch.set_num_threads(threads)
    assert seen == [(1, 3)] and list(tmp_path.iterdir()) == []


def test_the_idle_hook_runs_once_the_queue_stays_empty_and_not_while_work_keeps_coming():
    idle_calls = []

    async def scenario():
        batcher = ModelBatcher(lambda items: items, when_idle=lambda: idle_calls.append(time.monotonic()),
                               idle_after_s=0.5)
        for n in range(6):  # a request every 0.05 s (the arrivals' pacing): never idle for 0.5 s
            assert await batcher.submit(n) == n
            last = time.monotonic()  # the last batch has just ended
            await asyncio.sleep(0.05)
        busy_calls = len(idle_calls)
        await until(lambda: idle_calls, 10, "the idle hook")
        # nothing can call it again without new work: the timer that called it was the last one armed
        assert batcher._idle_timer.when() <= asyncio.get_running_loop().time()
        return busy_calls, last

    busy_calls, last = asyncio.run(scenario())
    assert busy_calls == 0
    assert len(idle_calls) == 1 and idle_calls[0] - last >= 0.25  # once, after the quiet spell (0.5 s)


def test_a_failing_idle_hook_does_not_stop_the_batcher():
    async def scenario():
        hook_ran = []

        def hook():
            hook_ran.append(True)
            raise RuntimeError("no allocator here")

        batcher = ModelBatcher(lambda items: [i * 2 for i in items], when_idle=hook, idle_after_s=0.01)
        first = await batcher.submit(1)
        await until(lambda: hook_ran, 5, "the idle hook")
        return first, await batcher.submit(2)

    assert asyncio.run(scenario()) == (2, 4)


def test_the_detector_runs_grounding_dino_in_lanes_on_cpu(tiny_models):
    """The deployment's constructor (called as Serve calls it, without Ray) lets Grounding DINO's batches overlap on
    CPU, with lanes from user_config."""
    from serve_app.deployments.detector import Detector
    from serve_app.models.catalog import DETECTOR
    from serve_app.models.spec import ModelSpec

    detector = Detector.func_or_class(ModelSpec(DETECTOR, str(tiny_models["grounding_dino"]), device="cpu"))
    detector.reconfigure({"cpu_lanes": 2})
    assert detector.batcher.concurrent_batches and detector.batcher.on_cpu
    assert detector.batcher.config.cpu_lanes == 2 and detector.batcher.core_share is not None
    detector.batcher._item_seconds = 5.0  # a big model's pass: batches of one image
    assert detector.batcher._lane_limit() == 2
    detector.reconfigure({"cpu_lanes": 1})
    assert detector.batcher._lane_limit() == 1


def test_the_detector_replica_encodes_a_concept_models_masks(tmp_path):
    """SAM 3's masks leave the Detector replica as the encodings the request asked for (RLE here), not as pixels
    for the ingress to encode: the Segmenter's rule, for the concept pipeline too."""
    import numpy as np
    from label_studio_sdk.converter.brush import decode_rle

    from serve_app.deployments.detector import Detector
    from serve_app.models.catalog import CONCEPT
    from serve_app.models.messages import DetectionRequest
    from serve_app.models.spec import ModelSpec
    from serve_app.tiny_models.sam3 import make_tiny_sam3_video

    detector = Detector.func_or_class(ModelSpec(CONCEPT, str(make_tiny_sam3_video(tmp_path / "sam3")), device="cpu"))
    image = (np.arange(60 * 80 * 3) % 251).astype(np.uint8).reshape(60, 80, 3)

    async def scenario():
        plain = await detector.detect(DetectionRequest(image=image, phrases=["cat"], box_threshold=0.0,
                                                       max_detections=3))
        encoded = await detector.detect(DetectionRequest(image=image, phrases=["cat"], box_threshold=0.0,
                                                         max_detections=3, encodings=("rle",)))
        boxes = await detector.detect(DetectionRequest(image=image, phrases=["cat"], box_threshold=0.0,
                                                       max_detections=3, boxes_only=True))  # a video frame
        return plain, encoded, boxes

    plain, encoded, boxes = asyncio.run(scenario())
    assert boxes.masks is None and boxes.encoded is None and np.array_equal(boxes.boxes, plain.boxes)
    assert plain.encoded is None and plain.masks.shape == (3, 60, 80)
    assert encoded.masks is None and len(encoded.encoded.rle) == 3
    for mask, rle in zip(plain.masks, encoded.encoded.rle):
        assert np.array_equal(decode_rle(rle).reshape(60, 80, 4)[:, :, 3] > 0, mask)
