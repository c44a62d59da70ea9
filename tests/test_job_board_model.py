"""A model-based test of the job board: hypothesis drives Retrieves, deadlines, hang-ups, task results, cancellations
from outside (as Ray Serve's), writer answers of every kind, and DELETE /jobs in any order, and checks after every step
that each task is in one state and the counts add up; at the end, that every task is final, no task was stored twice,
and each task without a prediction is free for the next Retrieve.

The pipeline and Label Studio are stand-ins that the state machine answers by hand (no models, no HTTP, no timers):
this is the fast lane's check of the board's bookkeeping; tests/test_jobs.py runs the same board over the tiny real
models and a loopback Label Studio API."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from serve_app.ingress.job_state import FINAL, TaskState
from serve_app.ingress.jobs import JobBoard
from serve_app.ingress.pipeline import NO_PREDICTION, LabellingPipeline, TaskOutcome
from serve_app.label_studio.prediction_writer import PredictionRefused
from serve_app.label_studio.retries import TransientError
from serve_app.settings import Settings
from tests.configs import SEED_CONFIG

TASK_IDS = range(1, 11)
SETTINGS = Settings.load(env={}, args={"task_concurrency": 3, "background_task_concurrency": 2,
                                       "max_pending_writes": 3, "job_write_failure_limit": 4})
PREDICTION = {"result": [{"type": "rectanglelabels"}], "score": 0.5}


class FakePipeline:
    """label_task_outcome waits until the machine answers the call."""

    model_version = "v-model"

    def __init__(self):
        self.calls: list[tuple[int, asyncio.Future]] = []  # (task id, its answer)
        self.parser = LabellingPipeline(settings=SETTINGS, model_version=self.model_version, detect=None,
                                        segment=None, fetcher=None)

    async def label_task_outcome(self, request, task) -> TaskOutcome:
        answer = asyncio.get_running_loop().create_future()
        self.calls.append((task["id"], answer))
        try:
            return await answer
        finally:
            self.calls = [call for call in self.calls if call[1] is not answer]


class FakeLabelStudio:
    """Label Studio's predictions (task id -> rows of our model version) and a writer whose answers wait for the
    machine."""

    def __init__(self):
        self.rows: dict[int, int] = {}
        self.writes: list[tuple[int, asyncio.Future]] = []

    def describe(self) -> str:
        return "the fake Label Studio"

    async def stored(self, task_id, model_version) -> bool:
        return bool(self.rows.get(task_id))

    async def create_many(self, project_id, items, model_version):
        """One batch: the machine says how it ends, for the whole batch or half of it."""
        answer = asyncio.get_running_loop().create_future()
        task_ids = [task_id for task_id, _ in items]
        self.writes.append((task_ids, answer))
        try:
            kind = await answer
        finally:
            self.writes = [write for write in self.writes if write[1] is not answer]
        if kind in ("ok", "reply lost"):
            for task_id in task_ids:
                self.rows[task_id] = self.rows.get(task_id, 0) + 1
        if kind == "reply lost":
            raise TransientError("Label Studio answered HTTP 502 (the rows were stored)")
        if kind == "odd":
            raise ValueError("Expecting value: line 1 column 1 (char 0)")  # an HTML page where JSON was due
        if kind == "half":
            stored = task_ids[: len(task_ids) // 2]
            for task_id in stored:
                self.rows[task_id] = self.rows.get(task_id, 0) + 1
            return {t: None if t in stored else "storing the prediction failed: HTTP 400" for t in task_ids}, set()
        error = {"refused": "Label Studio refused the prediction (HTTP 400)",
                 "transient": "Label Studio answered HTTP 503"}.get(kind)
        return {task_id: error for task_id in task_ids}, set()


class ControlledBoard(JobBoard):
    """The deadline of each /predict comes when the machine says so, not after PREDICT_DEADLINE_S."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.deadlines: dict[str, asyncio.Event] = {}

    async def _until_answer_due(self, job) -> None:
        due = self.deadlines.setdefault(job.id, asyncio.Event())
        settled = asyncio.ensure_future(job.settled.wait())
        deadline = asyncio.ensure_future(due.wait())
        try:
            await asyncio.wait({settled, deadline}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            settled.cancel()
            deadline.cancel()


class JobBoardMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.pipeline = FakePipeline()
        self.label_studio = FakeLabelStudio()
        self.board = self.run(self._make_board())
        self.requests: list[asyncio.Task] = []
        self.answered: set[int] = set()

    async def _make_board(self):
        return ControlledBoard(pipeline=self.pipeline, settings=SETTINGS)

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def settle(self) -> None:
        """Let every ready callback run (cancellations unwind, pumps start tasks, answers are handled)."""
        for _ in range(12):
            self.run(asyncio.sleep(0))
        for request in [r for r in self.requests if r.done()]:
            self.requests.remove(request)
            if not request.cancelled() and request.exception() is None:  # a 503 stores nothing
                self._label_studio_stores(request)

    def _label_studio_stores(self, request: asyncio.Task) -> None:
        """What Label Studio does with an answer: a non-empty entry is stored as the task's prediction."""
        response, task_ids = request.result(), request.task_ids
        for task_id, result in zip(task_ids, response["results"]):
            if result:
                self.label_studio.rows[task_id] = self.label_studio.rows.get(task_id, 0) + 1
                self.answered.add(task_id)

    # -- what the outside world does -----------------------------------------------------------

    @rule(ids=st.lists(st.sampled_from(TASK_IDS), min_size=1, max_size=6, unique=True))
    def retrieve(self, ids):
        """As Label Studio does: a Retrieve sends only the selected tasks that hold no prediction yet."""
        ids = [i for i in ids if not self.label_studio.rows.get(i)]
        if not ids:
            return
        body = {"tasks": [{"id": i, "data": {"image": f"https://images.example/{i}.png"}} for i in ids],
                "project": "3.1795641121", "label_config": SEED_CONFIG, "params": {"context": None}}
        request = self.pipeline.parser.parse(body)
        task = self.loop.create_task(self.board.predict(request, self.label_studio))
        task.task_ids = ids
        self.requests.append(task)
        self.settle()

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def deadline(self, data):
        waiting = [job for job in self.board.jobs.values() if job.waiting]
        if waiting:
            job = data.draw(st.sampled_from(waiting))
            self.board.deadlines.setdefault(job.id, asyncio.Event()).set()
        self.settle()

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def hang_up(self, data):
        data.draw(st.sampled_from(self.requests)).cancel()
        self.settle()

    @precondition(lambda self: self.pipeline.calls)
    @rule(data=st.data(), kind=st.sampled_from(["ok", "ok", "failed", "unavailable"]))
    def task_ends(self, data, kind):
        _, answer = data.draw(st.sampled_from(self.pipeline.calls))
        answer.set_result({"ok": TaskOutcome(PREDICTION),
                           "failed": TaskOutcome(list(NO_PREDICTION), "Label Studio answered HTTP 404 for "
                                                 "'https://x.example/a.png?X-Amz-Signature=SECRET'"),
                           "unavailable": TaskOutcome(list(NO_PREDICTION), "overloaded", unavailable=True)}[kind])
        self.settle()

    @precondition(lambda self: any(job.runners for job in self.board.jobs.values()))
    @rule(data=st.data())
    def serve_cancels_a_model_call(self, data):
        runners = [runner for job in self.board.jobs.values() for runner in job.runners.values()]
        data.draw(st.sampled_from(runners)).cancel()
        self.settle()

    @precondition(lambda self: self.label_studio.writes)
    @rule(data=st.data(), kind=st.sampled_from(["ok", "ok", "ok", "refused", "transient", "reply lost", "odd",
                                                "half"]))
    def label_studio_answers_a_write(self, data, kind):
        _, answer = data.draw(st.sampled_from(self.label_studio.writes))
        answer.set_result(kind)
        self.settle()

    @precondition(lambda self: self.pipeline.calls)
    @rule(data=st.data(), hang_up=st.booleans())
    def a_task_ends_and_the_job_is_deleted_or_answered_at_once(self, data, hang_up):
        """In the same turn of the loop as a task's end (which starts the next task): a DELETE, or the request's
        answer, comes before that next task took its first step."""
        _, answer = data.draw(st.sampled_from(self.pipeline.calls))
        answer.set_result(TaskOutcome(PREDICTION))
        for job_id in list(self.board.jobs):
            self.loop.call_soon(self.board.cancel, job_id)
        if hang_up and self.requests:
            self.loop.call_soon(data.draw(st.sampled_from(self.requests)).cancel)
        self.settle()

    @precondition(lambda self: self.board.jobs)
    @rule(data=st.data())
    def delete_job(self, data):
        job_id = data.draw(st.sampled_from(list(self.board.jobs)))
        expected = self.board.jobs[job_id].state == "running"
        assert self.board.cancel(job_id) == expected
        self.settle()

    # -- what must hold after every step -------------------------------------------------------

    @invariant()
    def counts_add_up(self):
        pending = 0
        for job in self.board.jobs.values():
            recount = {state: 0 for state in TaskState}
            for task in job.tasks:
                recount[task.state] += 1
            assert all(job.states[state] == n for state, n in recount.items()), (job.states.counts, recount)
            counts = job.summary()["tasks"]
            assert counts["total"] == sum(recount.values())
            assert counts["done"] + counts["failed"] + counts["cancelled"] + counts["pending"] == counts["total"]
            if job.state != "running":
                assert job.dropped or job.stop_reason or not job.states.pending or job.state == "cancelled"
            if job.state in ("finished", "stopped"):
                assert not job.states.pending
            pending += job.states.pending
        assert self.board.states.pending == pending  # no job leaves the board with work in it

    @invariant()
    def claims_are_held_by_unfinished_work_or_stored_rows(self):
        for job in self.board.jobs.values():
            for task in job.tasks:
                key = (job.instance, job.project, task.task_id)
                if task.state not in FINAL:
                    assert self.board.claims.get(key) == job.id, task
                elif task.state in (TaskState.FAILED, TaskState.ANSWERED):
                    assert self.board.claims.get(key) != job.id, task  # released: the next Retrieve runs it

    @invariant()
    def nothing_is_stored_twice(self):
        assert all(n == 1 for n in self.label_studio.rows.values()), self.label_studio.rows

    @invariant()
    def no_secret_is_shown(self):
        for summary in self.board.summaries():
            assert "SECRET" not in repr(summary)

    def teardown(self):
        """Everything still open ends well; then every task is final and each task has a prediction or is free."""
        for _ in range(200):
            for job in self.board.jobs.values():
                self.board.deadlines.setdefault(job.id, asyncio.Event()).set()
            for _, answer in list(self.pipeline.calls):
                answer.set_result(TaskOutcome(PREDICTION))
            for _, answer in list(self.label_studio.writes):
                answer.set_result("ok")
            self.settle()
            if not self.board.states.pending and not self.requests:
                break
        assert not self.board.states.pending, self.board.summaries()
        for job in self.board.jobs.values():
            assert job.state != "running" and all(task.state in FINAL for task in job.tasks)
        for task_id in TASK_IDS:
            claimed = any(key[2] == task_id for key in self.board.claims)
            assert self.label_studio.rows.get(task_id, 0) <= 1
            if not self.label_studio.rows.get(task_id):
                assert not claimed, f"task {task_id} has no prediction and is still claimed"
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


JobBoardMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None,
                                             suppress_health_check=[HealthCheck.too_slow])
test_job_board = JobBoardMachine.TestCase


class _OneAtATime(JobBoardMachine):
    """One task computed and one prediction written at a time."""

    async def _make_board(self):
        return ControlledBoard(pipeline=self.pipeline, settings=Settings.load(env={}, args={
            "task_concurrency": 1, "background_task_concurrency": 1, "max_pending_writes": 1}))


def test_deleting_a_job_whose_writes_hold_back_another_lets_that_one_go_on():
    """The case hypothesis found: a background job's queued task waits while another job's predictions are being
    written (MAX_PENDING_WRITES); DELETE the writing job, and the waiting task must start, not wait forever."""
    machine = _OneAtATime()
    machine.retrieve([1])
    [writing] = machine.board.jobs.values()
    machine.board.deadlines.setdefault(writing.id, asyncio.Event()).set()
    machine.settle()
    [(_, answer)] = machine.pipeline.calls
    answer.set_result(TaskOutcome(PREDICTION))
    machine.settle()
    assert writing.states[TaskState.WRITING] == 1 and machine.label_studio.writes  # the write waits on Label Studio
    machine.retrieve([2, 3])
    held = next(job for job in machine.board.jobs.values() if job is not writing)
    machine.board.deadlines.setdefault(held.id, asyncio.Event()).set()
    machine.settle()
    [(task_id, answer)] = machine.pipeline.calls
    answer.set_result(TaskOutcome(list(NO_PREDICTION), "HTTP 404"))  # task 2 fails: nothing to write
    machine.settle()
    assert task_id == 2 and held.states[TaskState.QUEUED] == 1 and not machine.pipeline.calls  # held back
    assert machine.board.cancel(writing.id)
    machine.settle()
    assert [task_id for task_id, _ in machine.pipeline.calls] == [3]
    machine.teardown()
