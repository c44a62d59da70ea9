"""Background jobs: a "Retrieve predictions" answers before Label Studio hangs up, and nothing is lost.

Label Studio sends every selected task in one `/predict` and stores nothing if the answer comes after
`ML_TIMEOUT_PREDICT`. So a batch `/predict` (one without an editor context) becomes a job: its tasks run on
the job board, not inside the HTTP request, and the request waits at most PREDICT_DEADLINE_S. The answer holds
every task finished by then; each unfinished task's entry is `[]`, which Label Studio stores nothing for. The
unfinished tasks keep running and each prediction is stored with `POST /api/predictions/` (PredictionWriter),
under the same model_version. If Label Studio hangs up first, the request is cancelled, not the job: what
was finished but never answered is stored the same way.

Each task id is claimed by one job while it runs, and after it was stored until the job leaves the board's
history: a second "Retrieve predictions" that sends a task still in flight (or just stored, before Label
Studio's list caught up) gets `[]` for it and computes nothing, so a task gets one prediction per model version
however often the user clicks. A task that failed, or went back in an answer, is released: the next Retrieve
runs it again if Label Studio has no prediction for it. After a restart Label Studio's stored predictions are
the record: Retrieve sends only the tasks that lack one.

Queued tasks hold their id and image value only. Tasks run at most TASK_CONCURRENCY at once while some
job's request is still waiting, BACKGROUND_TASK_CONCURRENCY otherwise (fewer than a model replica's
`max_ongoing_requests`, so a click from the editor always finds a free slot), and their model requests carry a
lower priority (Priority.BATCH, then Priority.BACKGROUND) than the editor's.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from serve_app import get_logger
from serve_app.ingress.errors import ServiceUnavailable
from serve_app.ingress.pipeline import (
    NO_PREDICTION,
    TASK_PRIORITY,
    LabellingPipeline,
    LabellingRequest,
    TaskOutcome,
    echoable_id,
    response_for,
)
from serve_app.ingress.prediction_writer import PredictionRefused, PredictionWriter
from serve_app.models.messages import Priority
from serve_app.retries import TransientError
from serve_app.settings import Settings

logger = get_logger(__name__)

JOB_HISTORY = 20  # finished jobs kept for GET /jobs (and their task claims, against duplicates)
FAILED_SHOWN = 100  # failed tasks listed per job in GET /jobs (all are counted)
WRITE_CONCURRENCY = 4  # predictions written to Label Studio at once


@dataclass
class QueuedTask:
    index: int  # position in the request's `tasks`
    task_id: int | None  # Label Studio's id; None when the request sent none usable (then it cannot be stored)
    task: dict[str, Any]  # {"id": ..., "data": {<image key>: <image value>}}: nothing else is kept


@dataclass
class Job:
    id: str
    project: str
    model_version: str
    request: LabellingRequest  # config, prompt, thresholds; its `tasks` list is dropped
    writer: PredictionWriter | None
    total: int
    created_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    queue: collections.deque[QueuedTask] = field(default_factory=collections.deque)
    running: dict[int, asyncio.Task] = field(default_factory=dict)  # index -> task
    finished: dict[int, tuple[TaskOutcome, int | None]] = field(default_factory=dict)  # index -> (outcome, id)
    writing: set[asyncio.Task] = field(default_factory=set)
    waiting: bool = True  # the /predict that started the job is still waiting for it
    state: str = "running"  # running | finished | cancelled
    answered: int = 0  # predictions that went back in the /predict answer
    stored: int = 0  # predictions written through the API
    failed: dict[Any, str] = field(default_factory=dict)  # task id (or index) -> why
    cancelled_tasks: int = 0
    background_since: float | None = None
    finished_at: float | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # nothing queued or running

    @property
    def priority(self) -> int:
        return Priority.BATCH if self.waiting else Priority.BACKGROUND

    @property
    def pending(self) -> int:
        return len(self.queue) + len(self.running) + len(self.finished) * (not self.waiting) + len(self.writing)

    def summary(self) -> dict[str, Any]:
        now = time.monotonic()
        done = self.answered + self.stored
        since = self.background_since  # the rate is of background work: what the answer held came before it
        rate = self.stored / (now - since) if since is not None and now > since and self.stored else None
        pending = self.pending if self.state == "running" else 0
        return {
            "id": self.id, "project": self.project, "model_version": self.model_version, "state": self.state,
            "started_at": _iso(self.created_at),
            "finished_at": _iso(self.created_at + (self.finished_at - self.started)) if self.finished_at else None,
            "tasks": {"total": self.total, "done": done, "answered": self.answered, "stored": self.stored,
                      "failed": len(self.failed), "pending": pending, "cancelled": self.cancelled_tasks},
            "rate_per_s": round(rate, 3) if rate else None,
            "eta_s": round(pending / rate, 1) if rate and pending else (0.0 if not pending else None),
            "failed_tasks": [{"task": task, "error": error}
                             for task, error in list(self.failed.items())[:FAILED_SHOWN]],
        }


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="seconds")


class JobBoard:
    def __init__(self, *, pipeline: LabellingPipeline, settings: Settings,
                 on_event: Callable[[str, int], None] | None = None):
        self.pipeline = pipeline
        self.settings = settings
        self.on_event = on_event  # for Prometheus: ("background_tasks_stored", 1) ..., after each change
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.claims: dict[tuple[str, int], Job] = {}
        self.running = 0
        self.queued = 0
        self._writes = asyncio.Semaphore(WRITE_CONCURRENCY)

    # -- a /predict ------------------------------------------------------------------------------

    async def predict(self, request: LabellingRequest, writer: PredictionWriter | None) -> dict[str, Any]:
        """The answer to a batch /predict: what finished within PREDICT_DEADLINE_S; the rest goes on here."""
        job, outcomes, warnings = self._start(request, writer)
        try:
            await asyncio.wait_for(asyncio.shield(job.settled.wait()), timeout=self.settings.predict_deadline_s)
        except asyncio.TimeoutError:
            pass
        except asyncio.CancelledError:  # Label Studio hung up: the job goes on, and stores what it finished
            self._hand_over(job, answered=False)
            raise
        warnings += self._hand_over(job, answered=True, outcomes=outcomes)
        finished = [o for o in outcomes if o is not None]
        unavailable = [o for o in finished if o.unavailable]
        if unavailable and all(o.error is not None for o in finished) and not job.pending:
            raise ServiceUnavailable(unavailable[0].error)  # nothing done, nothing going on: retry it all later
        response = response_for(request, [o or TaskOutcome(list(NO_PREDICTION)) for o in outcomes],
                                self.pipeline.model_version, warnings)
        if job.state == "running" and job.writer is not None:
            response["job"] = {"id": job.id, "pending": job.pending}
        return response

    def _start(self, request: LabellingRequest, writer: PredictionWriter | None):
        s = self.settings
        project = request.project.split(".", 1)[0]
        job = Job(id=uuid.uuid4().hex[:12], project=project, model_version=self.pipeline.model_version,
                  request=dataclasses.replace(request, tasks=[]), writer=writer, total=len(request.tasks))
        outcomes: list[TaskOutcome | None] = [None] * len(request.tasks)
        in_flight, over_cap = collections.Counter(), 0
        image_key = request.config.image_key
        for index, task in enumerate(request.tasks):
            task_id = echoable_id(task.get("id") if isinstance(task, dict) else None)
            task_id = task_id if isinstance(task_id, int) else None
            claimed_by = self.claims.get((project, task_id)) if task_id is not None else None
            if claimed_by is not None:
                in_flight[claimed_by.id] += 1
                outcomes[index] = TaskOutcome(list(NO_PREDICTION))
                continue
            if self.queued >= s.max_background_tasks:
                over_cap += 1
                outcomes[index] = TaskOutcome(list(NO_PREDICTION))
                continue
            kept = None  # not an object: the pipeline fails it alone, whatever it was; nothing big is kept
            if isinstance(task, dict):
                data = task.get("data")
                kept = {"id": task.get("id"),
                        "data": {image_key: data.get(image_key)} if isinstance(data, dict) else data}
            job.queue.append(QueuedTask(index, task_id, kept))
            self.queued += 1
            if task_id is not None:
                self.claims[(project, task_id)] = job
        job.total = len(job.queue)
        warnings = []
        for job_id, count in in_flight.items():
            warnings.append(f"{count} of these tasks are being predicted by background job {job_id}; their "
                            "predictions are stored when it finishes (GET /jobs)")
        if over_cap:
            warnings.append(f"{over_cap} tasks were not queued: the service holds at most {s.max_background_tasks} "
                            "queued tasks (MAX_BACKGROUND_TASKS); run \"Retrieve predictions\" again when the "
                            "current jobs are done")
            logger.warning("job %s: %d tasks over MAX_BACKGROUND_TASKS not queued", job.id, over_cap)
        self.jobs[job.id] = job
        if not job.queue:
            self._settle(job)
        self._pump()
        return job, outcomes, warnings

    def _hand_over(self, job: Job, *, answered: bool, outcomes: list | None = None) -> list[str]:
        """The request stops waiting: finished tasks go into its answer (or, if it was cancelled, to Label
        Studio through the API); unfinished ones go on in the background, or are cancelled without a writer."""
        if not job.waiting:
            return []
        job.waiting = False
        job.background_since = time.monotonic()  # the rate in GET /jobs counts from here
        for index, (outcome, task_id) in list(job.finished.items()):
            if answered:
                outcomes[index] = outcome
                job.answered += outcome.error is None
                self._release(job, task_id)  # Label Studio stores it from the answer; if the answer is lost, it
                # stays retryable
            elif outcome.error is None:
                self._store(job, index, outcome, task_id)
        job.finished.clear()
        unfinished = len(job.queue) + len(job.running)
        if not unfinished:
            self._maybe_finish(job)
            return []
        deadline = f"{self.settings.predict_deadline_s:g} s (PREDICT_DEADLINE_S)"
        if job.writer is None:
            self._drop_unfinished(job)
            message = (f"{unfinished} tasks did not finish within {deadline} and the service has no usable Label "
                       "Studio credential to store them later: run \"Retrieve predictions\" again for them, or set "
                       "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY so that the service finishes them in the background")
            logger.warning("job %s: %s", job.id, message)
            self._maybe_finish(job)
            return [message]
        logger.info("job %s: %d of %d tasks finish in the background after %s; stored in %s", job.id, unfinished,
                    job.total, deadline, job.writer.describe())
        self._pump()
        return [f"{unfinished} tasks did not finish within {deadline}; background job {job.id} finishes them and "
                "stores their predictions in Label Studio (GET /jobs shows its progress)"]

    # -- running tasks ---------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start queued tasks while there is room: jobs whose request waits first, then background jobs, each in
        the order they came."""
        s = self.settings
        waiting = [job for job in self.jobs.values() if job.waiting and job.queue]
        capacity = s.task_concurrency if waiting else (s.background_task_concurrency or 2)
        candidates = waiting or [job for job in self.jobs.values() if job.queue and job.state == "running"]
        loop = asyncio.get_running_loop()
        for job in candidates:
            while job.queue and self.running < capacity:
                queued = job.queue.popleft()
                self.queued -= 1
                self.running += 1
                job.running[queued.index] = loop.create_task(self._run(job, queued))
            if self.running >= capacity:
                return

    async def _run(self, job: Job, queued: QueuedTask) -> None:
        TASK_PRIORITY.set(job.priority)  # this asyncio task's own context
        outcome = None
        try:
            outcome = await self.pipeline.label_task_outcome(job.request, queued.task)
        except ServiceUnavailable as exc:
            outcome = TaskOutcome(list(NO_PREDICTION), str(exc), unavailable=True)
        except asyncio.CancelledError:
            self._release(job, queued.task_id)
            raise
        finally:
            self.running -= 1
            job.running.pop(queued.index, None)
            if outcome is not None:
                self._record(job, queued, outcome)
            self._settle_if_idle(job)
            self._pump()

    def _record(self, job: Job, queued: QueuedTask, outcome: TaskOutcome) -> None:
        if outcome.error is not None:
            self._fail(job, queued.index, queued.task_id, outcome.error)
        if job.waiting:
            job.finished[queued.index] = (outcome, queued.task_id)
        elif outcome.error is None:
            self._store(job, queued.index, outcome, queued.task_id)

    def _store(self, job: Job, index: int, outcome: TaskOutcome, task_id: int | None) -> None:
        writing = asyncio.get_running_loop().create_task(self._write(job, index, outcome, task_id))
        job.writing.add(writing)
        writing.add_done_callback(lambda done: (job.writing.discard(done), self._maybe_finish(job)))

    async def _write(self, job: Job, index: int, outcome: TaskOutcome, task_id: int | None) -> None:
        if task_id is None or job.writer is None:
            self._fail(job, index, task_id, "finished after the answer, but it has no Label Studio task id to store "
                                            "the prediction under")
            return
        async with self._writes:
            try:
                await job.writer.create(task_id, outcome.prediction, job.model_version)
            except (PredictionRefused, TransientError) as exc:
                self._fail(job, index, task_id, f"storing the prediction failed: {exc}")
                logger.error("job %s: task %s: storing the prediction failed: %s", job.id, task_id, exc)
                return
        job.stored += 1
        self._count("background_tasks_stored")

    def _fail(self, job: Job, index: int, task_id: int | None, error: str) -> None:
        job.failed[task_id if task_id is not None else f"#{index}"] = error
        self._release(job, task_id)  # retryable: the next Retrieve runs it again
        if not job.waiting:
            self._count("background_tasks_failed")

    def _release(self, job: Job, task_id: int | None) -> None:
        if task_id is not None and self.claims.get((job.project, task_id)) is job:
            del self.claims[(job.project, task_id)]

    def _settle_if_idle(self, job: Job) -> None:
        if not job.queue and not job.running:
            self._settle(job)

    def _settle(self, job: Job) -> None:
        job.settled.set()
        self._maybe_finish(job)

    def _maybe_finish(self, job: Job) -> None:
        if job.waiting or job.queue or job.running or job.writing or job.state != "running":
            return
        job.state = "finished"
        job.finished_at = time.monotonic()
        if job.background_since is None or not (job.stored or job.failed or job.cancelled_tasks):
            del self.jobs[job.id]  # all of it went back in the answer: nothing to show in GET /jobs
            return
        logger.info("job %s finished: %d answered, %d stored, %d failed, %d cancelled of %d tasks", job.id,
                    job.answered, job.stored, len(job.failed), job.cancelled_tasks, job.total)
        self._trim_history()
        self._count("background_jobs_finished")  # and the gauges see the job end

    def _trim_history(self) -> None:
        done = [job for job in self.jobs.values() if job.state != "running"]
        for job in done[:max(0, len(done) - JOB_HISTORY)]:
            del self.jobs[job.id]
            for key in [key for key, owner in self.claims.items() if owner is job]:
                del self.claims[key]

    def _count(self, event: str, n: int = 1) -> None:
        if self.on_event is not None:
            self.on_event(event, n)

    # -- GET /jobs, DELETE /jobs/{id} ------------------------------------------------------------

    def summaries(self) -> list[dict[str, Any]]:
        return [job.summary() for job in reversed(self.jobs.values())]

    def totals(self) -> dict[str, int]:
        running = [job for job in self.jobs.values() if job.state == "running"]
        return {"running_jobs": len(running), "pending_tasks": sum(job.pending for job in running),
                "stored_tasks": sum(job.stored for job in self.jobs.values()),
                "failed_tasks": sum(len(job.failed) for job in self.jobs.values())}

    def cancel(self, job_id: str) -> bool:
        """Drop the job's queued tasks and cancel its running ones; predictions being written are kept."""
        job = self.jobs.get(job_id)
        if job is None or job.state != "running":
            return False
        dropped = self._drop_unfinished(job)
        job.state = "cancelled"
        job.finished_at = time.monotonic()
        logger.warning("job %s cancelled: %d tasks dropped", job.id, dropped)
        self._trim_history()
        self._count("background_jobs_cancelled")
        return True

    def _drop_unfinished(self, job: Job) -> int:
        dropped = len(job.queue) + len(job.running)
        self.queued -= len(job.queue)
        for queued in job.queue:
            self._release(job, queued.task_id)
        job.queue.clear()
        for running in list(job.running.values()):
            running.cancel()  # releases its claim as it unwinds
        job.cancelled_tasks += dropped
        return dropped
