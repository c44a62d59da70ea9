"""Background jobs without Ray: a batch /predict answers by PREDICT_DEADLINE_S and the job board finishes the
rest, storing each prediction once through Label Studio's API (a loopback stand-in here; the real Label Studio
in tests/test_background_jobs_e2e.py). The models are the tiny real ones, each call delayed to make a
selection slower than the deadline."""

from __future__ import annotations

import asyncio
import collections
import contextvars
import time

import httpx
import pytest

from benchmarks.pipeline import load_models
from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy
from serve_app.ingress.job_state import TaskState
from serve_app.ingress.jobs import JobBoard
from serve_app.label_studio.credentials import LabelStudioCredentials
from serve_app.ingress.pipeline import LabellingPipeline, in_thread
from serve_app.label_studio.prediction_writer import PredictionWriter
from serve_app.models.messages import Priority
from serve_app.settings import Settings
from tests.configs import SEED_CONFIG
from tests.loopback import PredictionsStandIn, loopback_http
from tests.waiting import until

MODEL_VERSION = "v-jobs"


@pytest.fixture(scope="module")
def models(tiny_models):
    settings = Settings.load(env={"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "USE_SAM": "true",
                                  "SAM_CHECKPOINT": str(tiny_models["sam"]), "DEVICE": "cpu"})
    return load_models(settings)


@pytest.fixture
def stand_in():
    store = PredictionsStandIn()
    with loopback_http(store.handler) as url:
        store.url = url
        yield store


class Harness:
    """A job board over the tiny models; every detector call waits `delay_s` first and is recorded."""

    def __init__(self, models, *, deadline_s: float, delay_s: float, concurrency: int = 2,
                 hold_after: int | None = None, **settings):
        detector, segmenter = models
        self.settings = Settings.load(env={}, args={
            "predict_deadline_s": deadline_s, "task_concurrency": concurrency,
            "background_task_concurrency": concurrency, "use_sam": True, **settings})
        self.detected: list[tuple[float, int]] = []  # (time, priority)
        self.gate = asyncio.Event()  # detector calls after the first `hold_after` wait for it
        self.gate_waiters: list[asyncio.Task] = []
        self.calls = 0
        detect = in_thread(detector.detect)

        async def slow_detect(request):
            self.calls += 1
            if hold_after is not None and self.calls > hold_after:
                self.gate_waiters.append(asyncio.current_task())
                try:
                    await self.gate.wait()
                finally:
                    self.gate_waiters.remove(asyncio.current_task())
            await asyncio.sleep(delay_s)
            self.detected.append((time.monotonic(), request.priority))
            return await detect(request)

        policy = ImageSourcePolicy(max_bytes=10**7, timeout_s=5, max_pixels=10**8,
                                   host_allowlist=frozenset({"127.0.0.1"}))
        self.pipeline = LabellingPipeline(settings=self.settings, model_version=MODEL_VERSION, detect=slow_detect,
                                          segment=in_thread(segmenter.segment), fetcher=ImageFetcher(policy))
        self.board = JobBoard(pipeline=self.pipeline, settings=self.settings)
        self.fetched: collections.Counter[str] = collections.Counter()  # URL -> downloads
        fetch = self.pipeline.fetcher.fetch

        async def counted_fetch(url):
            self.fetched[url] += 1
            return await fetch(url)

        self.pipeline.fetcher.fetch = counted_fetch

    def body(self, urls: list[str], first_id: int = 1) -> dict:
        return {"tasks": [{"id": first_id + i, "data": {"image": url}, "annotations": [], "predictions": []}
                          for i, url in enumerate(urls)],
                "project": "7.1795641121", "label_config": SEED_CONFIG,
                "params": {"login": None, "password": None, "context": None}}

    def parse(self, body: dict):
        return self.pipeline.parse(body)

    @staticmethod
    def writer(stand_in: PredictionsStandIn, http: httpx.AsyncClient) -> PredictionWriter:
        return PredictionWriter(LabelStudioCredentials(stand_in.url, stand_in.token, http, "the test"),
                                max_delay_s=0.2)

    @staticmethod
    async def wait_for(condition, timeout_s: float = 60) -> None:
        await until(condition, timeout_s)

    async def until_finished(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while any(job.state == "running" for job in self.board.jobs.values()):
            assert time.monotonic() < deadline, [(j["state"], j["tasks"]) for j in self.board.summaries()]
            await asyncio.sleep(0.05)


def urls(image_server: str, n: int) -> list[str]:
    return [f"{image_server}/img{i % 3}.png?task={i + 1}" for i in range(n)]  # one URL per task


def test_a_slow_selection_answers_by_the_deadline_and_the_job_stores_the_rest_once(models, image_server, stand_in):
    harness = Harness(models, deadline_s=1.0, delay_s=0.25)

    async def scenario():
        async with httpx.AsyncClient() as http:
            started = time.monotonic()
            response = await harness.board.predict(harness.parse(harness.body(urls(image_server, 16))),
                                                   harness.writer(stand_in, http))
            answered_after = time.monotonic() - started
            await harness.until_finished()
            return response, answered_after

    response, answered_after = asyncio.run(scenario())
    assert answered_after < 30  # a hang guard; that it answered at the deadline shows below: some tasks pending
    results = response["results"]
    assert len(results) == 16
    answered = {i + 1 for i, r in enumerate(results) if r}
    assert 0 < len(answered) < 16 and "task_errors" not in response
    assert response["job"]["pending"] == 16 - len(answered)
    assert any("background job" in w and "GET /jobs" in w for w in response["warnings"])
    # every task has exactly one prediction: in the answer, or stored by the job, never both
    for task_id in range(1, 17):
        stored = stand_in.for_task(task_id)
        assert len(stored) == (0 if task_id in answered else 1), task_id
        for row in stored:
            assert row["model_version"] == MODEL_VERSION and row["result"] and 0 <= row["score"] <= 1
    [summary] = harness.board.summaries()
    assert summary["state"] == "finished" and summary["project"] == "7"
    assert summary["tasks"] == {"total": 16, "done": 16, "answered": len(answered), "stored": 16 - len(answered),
                                "failed": 0, "pending": 0, "cancelled": 0, "queued": 0, "running": 0, "held": 0,
                                "writing": 0}
    # the tasks the answer did not wait for ran at background priority
    assert {p for _, p in harness.detected} == {Priority.BATCH, Priority.BACKGROUND}


def test_a_second_retrieve_during_the_job_computes_nothing_twice(models, image_server, stand_in):
    harness = Harness(models, deadline_s=0.5, delay_s=0.2)

    async def scenario():
        async with httpx.AsyncClient() as http:
            writer = harness.writer(stand_in, http)
            body = harness.body(urls(image_server, 10))
            first = await harness.board.predict(harness.parse(body), writer)
            again = await harness.board.predict(harness.parse(body), writer)  # the user clicks Retrieve again
            await harness.until_finished()
            later = await harness.board.predict(harness.parse(body), writer)  # before Label Studio's list caught up
            return first, again, later

    first, again, later = asyncio.run(scenario())
    answered = [i for i, r in enumerate(first["results"]) if r]
    assert len(answered) < 10
    # the second Retrieve got [] for the tasks still in flight, with a warning naming the job
    in_flight = [i for i in range(10) if i not in answered]
    assert all(again["results"][i] == [] for i in in_flight)
    assert any(f"background job {first['job']['id']}" in w for w in again["warnings"])
    assert all(later["results"][i] == [] for i in in_flight)  # stored by the job: not computed again
    task_urls = urls("", 10)
    for i in in_flight:
        assert len(stand_in.for_task(i + 1)) == 1
        assert harness.fetched[next(u for u in harness.fetched if u.endswith(task_urls[i]))] == 1


def test_without_credentials_the_rest_is_cancelled_retryable_and_the_answer_says_how_to_finish(models, image_server):
    harness = Harness(models, deadline_s=1.5, delay_s=0.5)  # 8 tasks need 2 s; one alone 0.5 s

    async def scenario():
        body = harness.body(urls(image_server, 8))
        first = await harness.board.predict(harness.parse(body), None)
        await harness.until_finished()
        # as Label Studio does: the next Retrieve sends only the tasks that have no prediction
        body["tasks"] = [t for t, r in zip(body["tasks"], first["results"]) if r == []][:1]
        second = await asyncio.wait_for(harness.board.predict(harness.parse(body), None), 10)
        return first, second

    first, second = asyncio.run(scenario())
    missing = [i for i, r in enumerate(first["results"]) if r == []]
    assert missing and "job" not in first
    [warning] = [w for w in first["warnings"] if "did not finish" in w]
    assert "Retrieve predictions" in warning and "LABEL_STUDIO_URL" in warning and "LABEL_STUDIO_API_KEY" in warning
    assert not harness.board.claims  # nothing claimed: the next Retrieve runs them
    assert all(second["results"]) and "warnings" not in second  # the next Retrieve computes them


def test_label_studio_hanging_up_cancels_the_request_not_the_job(models, image_server, stand_in):
    """The hang-up comes at a moment the test controls: two tasks finished (held for the answer), the others
    blocked in the detector; then the request is cancelled and the detector let go."""
    harness = Harness(models, deadline_s=30, delay_s=0.0, hold_after=2)

    async def scenario():
        async with httpx.AsyncClient() as http:
            request = asyncio.ensure_future(harness.board.predict(harness.parse(harness.body(urls(image_server, 6))),
                                                                  harness.writer(stand_in, http)))
            await harness.wait_for(lambda: harness.board.states[TaskState.HELD] == 2)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            harness.gate.set()
            await harness.until_finished()

    asyncio.run(scenario())
    assert [len(stand_in.for_task(i)) for i in range(1, 7)] == [1] * 6  # finished before the hang-up: stored too
    [summary] = harness.board.summaries()
    assert summary["tasks"]["stored"] == 6 and summary["tasks"]["total"] == 6


REQUEST_SCOPE: contextvars.ContextVar[list | None] = contextvars.ContextVar("request_scope", default=None)


def test_model_calls_of_a_job_are_not_in_the_requests_cancellation_scope(models, image_server, stand_in):
    """As Ray Serve does: model calls made in a request's context are registered as its children and cancelled when
    the client disconnects (`_on_request_cancelled`). The job's model calls must not be among them (root cause of the
    31 lost tasks of issue 28: the job's asyncio tasks inherited the request's context)."""
    harness = Harness(models, deadline_s=30, delay_s=0.0, hold_after=2)
    children: list[asyncio.Task] = []
    detect = harness.pipeline.detect

    async def detect_as_a_child(request):
        scope = REQUEST_SCOPE.get()
        if scope is not None:
            scope.append(asyncio.current_task())
        return await detect(request)

    harness.pipeline.detect = detect_as_a_child

    async def scenario():
        async with httpx.AsyncClient() as http:
            async def serve_request(body):
                REQUEST_SCOPE.set(children)
                return await harness.board.predict(harness.parse(body), harness.writer(stand_in, http))

            request = asyncio.ensure_future(serve_request(harness.body(urls(image_server, 6))))
            await harness.wait_for(lambda: harness.board.states[TaskState.HELD] == 2)
            request.cancel()
            for child in children:  # what Serve does on a disconnect
                child.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            harness.gate.set()
            await harness.until_finished()

    asyncio.run(scenario())
    assert children == []
    assert [len(stand_in.for_task(i)) for i in range(1, 7)] == [1] * 6


def test_a_task_cancelled_from_outside_the_job_runs_again(models, image_server, stand_in):
    """A running task cancelled by anyone but DELETE /jobs (a replica shutting down) is queued again, not lost."""
    harness = Harness(models, deadline_s=0.1, delay_s=0.0, hold_after=0)

    async def scenario():
        async with httpx.AsyncClient() as http:
            response = await harness.board.predict(harness.parse(harness.body(urls(image_server, 3))),
                                                   harness.writer(stand_in, http))
            [job] = harness.board.jobs.values()
            await harness.wait_for(lambda: len(job.runners) == 2 and len(harness.gate_waiters) == 2)
            next(iter(job.runners.values())).cancel()
            await harness.wait_for(lambda: job.states[TaskState.QUEUED] + job.states[TaskState.RUNNING] == 3)
            harness.gate.set()
            await harness.until_finished()
            return response

    response = asyncio.run(scenario())
    assert response["results"] == [[], [], []]
    assert [len(stand_in.for_task(i)) for i in range(1, 4)] == [1] * 3
    [summary] = harness.board.summaries()
    assert summary["tasks"]["stored"] == 3 and summary["tasks"]["failed"] == 0


def test_a_failed_background_task_is_listed_and_released(models, image_server, stand_in):
    harness = Harness(models, deadline_s=0.3, delay_s=0.2, concurrency=1)

    async def scenario():
        async with httpx.AsyncClient() as http:
            body = harness.body([*urls(image_server, 3), f"{image_server}/missing.png"])
            response = await harness.board.predict(harness.parse(body), harness.writer(stand_in, http))
            await harness.until_finished()
            return response

    response = asyncio.run(scenario())
    assert response["results"][3] == []
    [summary] = harness.board.summaries()
    assert summary["tasks"]["failed"] == 1 and summary["failed_tasks"][0]["task"] == 4
    assert "404" in summary["failed_tasks"][0]["error"]
    assert ("", "7", 4) not in harness.board.claims and stand_in.for_task(4) == []


def test_a_cancelled_job_stops_and_releases_its_tasks(models, image_server, stand_in):
    harness = Harness(models, deadline_s=0.3, delay_s=0.0, concurrency=1, hold_after=2)

    async def scenario():
        async with httpx.AsyncClient() as http:
            response = await harness.board.predict(harness.parse(harness.body(urls(image_server, 12))),
                                                   harness.writer(stand_in, http))
            [job] = harness.board.jobs.values()
            await harness.wait_for(lambda: len(harness.gate_waiters) == 1)  # the third task, blocked
            assert harness.board.cancel(response["job"]["id"])
            assert not harness.board.cancel(response["job"]["id"])  # once
            await harness.wait_for(lambda: not job.states.pending)  # the blocked one unwinds as cancelled
            return response, job

    response, job = asyncio.run(scenario())
    [summary] = harness.board.summaries()
    assert summary["state"] == "cancelled"
    counts = summary["tasks"]
    assert counts["cancelled"] == 12 - counts["answered"] - counts["stored"] and counts["cancelled"] >= 9
    assert counts["answered"] + counts["stored"] + counts["cancelled"] == 12 and counts["pending"] == 0
    assert harness.calls == 3  # nothing started after the cancel
    assert harness.board.queued == 0 and harness.board.running == 0
    stored = {row["task"] for row in stand_in.rows}
    assert len(stored) == counts["stored"]
    # claims left are of stored tasks only (or of a write whose fate is unknown); cancelled ones are released
    assert all(key[2] in stored for key in harness.board.claims)
    assert response["results"].count([]) >= 10


def test_a_selection_beyond_max_background_tasks_is_answered_with_the_limit(models, image_server, stand_in):
    harness = Harness(models, deadline_s=0.2, delay_s=0.2, concurrency=1, max_background_tasks=5)

    async def scenario():
        async with httpx.AsyncClient() as http:
            response = await harness.board.predict(harness.parse(harness.body(urls(image_server, 8))),
                                                   harness.writer(stand_in, http))
            await harness.until_finished()
            return response

    response = asyncio.run(scenario())
    assert response["results"][5:] == [[], [], []]
    assert any("3 tasks were not queued" in w and "MAX_BACKGROUND_TASKS" in w for w in response["warnings"])
    assert {row["task"] for row in stand_in.rows} | {i + 1 for i, r in enumerate(response["results"]) if r} \
        == {1, 2, 3, 4, 5}


def test_a_retry_after_a_lost_reply_does_not_store_a_second_copy(stand_in):
    stand_in.fail_after_storing = 1  # stored, then 502: the writer cannot know it was stored without asking

    async def scenario():
        async with httpx.AsyncClient() as http:
            await Harness.writer(stand_in, http).create(5, {"result": [{"x": 1}], "score": 0.5}, "v1")

    asyncio.run(scenario())
    assert stand_in.posts == 1 and len(stand_in.for_task(5)) == 1


def test_tasks_that_are_not_objects_fail_alone_in_a_batch(models, image_server, stand_in):
    """A Retrieve body whose tasks list holds null, a string, a number or a list beside good tasks: each odd one
    fails on its own ([] and a task error), the good ones are predicted (found by fuzzing /predict: it was a 500)."""
    harness = Harness(models, deadline_s=30, delay_s=0.0)

    async def scenario():
        async with httpx.AsyncClient() as http:
            body = harness.body(urls(image_server, 2))
            body["tasks"] = [None, body["tasks"][0], "task", 7, [1, 2], body["tasks"][1]]
            return await harness.board.predict(harness.parse(body), harness.writer(stand_in, http))

    response = asyncio.run(scenario())
    results = response["results"]
    assert len(results) == 6 and results[1] and results[5]
    assert results[0] == results[2] == results[3] == results[4] == []
    assert len(response["task_errors"]) == 4
