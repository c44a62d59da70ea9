"""Background jobs: a "Retrieve predictions" answers before Label Studio hangs up, and every task is accounted for.

Label Studio sends every selected task in one `/predict` and stores nothing if the answer comes after
`ML_TIMEOUT_PREDICT`. So a batch `/predict` (one without an editor context) becomes a job: its tasks run on
the job board, not inside the HTTP request, and the request waits at most PREDICT_DEADLINE_S. The answer holds
every task finished by then; each unfinished task's entry is `[]`, which Label Studio stores nothing for. The
unfinished tasks keep running and each prediction is stored with `POST /api/predictions/` (PredictionWriter),
under the same model_version. If Label Studio hangs up first, the request is cancelled, not the job: what
was finished but never answered is stored the same way.

A job's work runs in a context of its own, never the request's: Ray Serve cancels the model calls a request made
(its "child requests", found through the request's context variables) when the client disconnects, and tasks
started from the request would inherit that context. A task that is cancelled from outside all the same (a replica
shutting down) is queued again, at most MAX_TASK_ATTEMPTS times, then failed with the reason.

Every task is in exactly one state (serve_app.ingress.job_state); GET /jobs, `grounded-serve jobs` and the
Prometheus gauges read the counts of those states. A job is finished when every task is in a final state.

Each task id is claimed by one job (per Label Studio instance and project) while it runs, and after it was stored
until the job leaves the board's history: a second "Retrieve predictions" that sends a task still in flight (or just
stored, before Label Studio's list caught up) gets `[]` for it and computes nothing, so a task gets one prediction
per model version however often the user clicks. A task that failed, or went back in an answer, is released: the
next Retrieve runs it again if Label Studio has no prediction for it. After a restart Label Studio's stored
predictions are the record: Retrieve sends only the tasks that lack one.

Bounds: queued tasks hold their id and image value only, at most MAX_BACKGROUND_TASKS of them and MAX_QUEUED_BYTES
of values. Tasks run at most TASK_CONCURRENCY at once while some job's request is still waiting,
BACKGROUND_TASK_CONCURRENCY otherwise (fewer than a model replica's `max_ongoing_requests`, so a click from the
editor always finds a free slot), and their model requests carry a lower priority (Priority.BATCH, then
Priority.BACKGROUND) than the editor's. No background task starts while MAX_PENDING_WRITES predictions wait to be
stored (a slow Label Studio slows the job instead of filling memory), and JOB_WRITE_FAILURE_LIMIT failed writes in a
row stop the job: its unstarted tasks fail at once, saying why.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import datetime
import functools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson

from serve_app import get_logger
from serve_app.ingress.claims import LocalClaims, SharedClaims
from serve_app.ingress.errors import ServiceUnavailable
from serve_app.ingress.instances import origin_text
from serve_app.ingress.job_state import FailureLog, JobTask, TaskState, TaskStates
from serve_app.ingress.pipeline import (
    NO_PREDICTION,
    TASK_PRIORITY,
    LabellingPipeline,
    LabellingRequest,
    TaskOutcome,
    echoable_id,
    response_for,
)
from serve_app.ingress.video_tasks import VIDEO_PROGRESS, VideoProgress
from serve_app.label_studio.prediction_writer import PredictionWriter
from serve_app.models.messages import Priority
from serve_app.redaction import redact_urls
from serve_app.settings import Settings

logger = get_logger(__name__)

JOB_HISTORY = 20  # finished jobs kept for GET /jobs (and their task claims, against duplicates)
WRITE_CONCURRENCY = 4  # predictions written to Label Studio at once
MAX_TASK_ATTEMPTS = 3  # starts of one task; more cancellations from outside the job fail it
CANCELLED_WRITE_CHECK_S = 10.0  # how long a cancelled write asks Label Studio whether it stored the row


@dataclass(eq=False)
class Job:
    id: str
    instance: str  # the Label Studio instance (its origin) the request came from; "" when unknown
    project: str
    model_version: str
    request: LabellingRequest  # config, prompt, thresholds; its `tasks` list is dropped
    writer: PredictionWriter | None
    states: TaskStates
    tasks: list[JobTask] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    queue: collections.deque[JobTask] = field(default_factory=collections.deque)
    runners: dict[int, asyncio.Task] = field(default_factory=dict)  # index -> its asyncio task, while RUNNING
    to_write: collections.deque = field(default_factory=collections.deque)  # (task, prediction, bytes) to store
    writing_now: list[JobTask] = field(default_factory=list)  # the batch being stored
    flusher: asyncio.Task | None = None  # stores `to_write`, a batch at a time
    batch_full: asyncio.Event = field(default_factory=asyncio.Event)  # a batch is ready, or no more will come
    waiting: bool = True  # the /predict that started the job is still waiting for it
    state: str = "running"  # running | finished | cancelled | stopped
    failures: FailureLog = field(default_factory=FailureLog)
    write_failures_in_a_row: int = 0
    stop_reason: str | None = None
    dropped: bool = False  # its unfinished tasks were dropped (DELETE /jobs/{id}, or no credential to store them)
    uncertain: list[int] = field(default_factory=list)  # stored after a write whose first attempt's fate was unknown
    sweep: asyncio.Task | None = None  # removes late second copies of those before the job finishes
    background_since: float | None = None
    finished_at: float | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # nothing queued or running
    frames: dict[int, VideoProgress] = field(default_factory=dict)  # video tasks' frames, by task index

    @property
    def priority(self) -> int:
        return Priority.BATCH if self.waiting else Priority.BACKGROUND

    @property
    def total(self) -> int:
        return len(self.tasks)

    def counts(self) -> dict[str, int]:
        s = self.states
        return {"total": self.total, "done": s[TaskState.ANSWERED] + s[TaskState.STORED],
                "answered": s[TaskState.ANSWERED], "stored": s[TaskState.STORED], "failed": s[TaskState.FAILED],
                "cancelled": s[TaskState.CANCELLED], "pending": s.pending, "queued": s[TaskState.QUEUED],
                "running": s[TaskState.RUNNING], "held": s[TaskState.HELD], "writing": s[TaskState.WRITING]}

    def frame_counts(self) -> dict[str, int]:
        """Sampled frames of the job's video tasks searched so far, and in all (from the videos' durations)."""
        return {"done": sum(p.frames_done for p in self.frames.values()),
                "total": sum(p.frames_total for p in self.frames.values())}

    def summary(self) -> dict[str, Any]:
        now = time.monotonic()
        stored = self.states[TaskState.STORED]
        since = self.background_since  # the rate is of background work: what the answer held came before it
        rate = stored / (now - since) if since is not None and now > since and stored else None
        pending = self.states.pending
        return {
            "id": self.id, "instance": self.instance or None, "project": self.project,
            "model_version": self.model_version, "state": self.state,
            "started_at": _iso(self.created_at),
            "finished_at": _iso(self.created_at + (self.finished_at - self.started)) if self.finished_at else None,
            "tasks": self.counts(),
            "rate_per_s": round(rate, 3) if rate else None,
            "eta_s": round(pending / rate, 1) if rate and pending else (0.0 if not pending else None),
            **({"frames": self.frame_counts()} if self.frames else {}),
            **({"stopped_because": self.stop_reason} if self.stop_reason else {}),
            "failure_kinds": dict(self.failures.kinds),
            "failed_tasks": list(self.failures.shown),
        }


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="seconds")


def _input_bytes(task: Any) -> int:
    """What a queued task keeps, roughly: its image value dominates (a `data:` URL can be megabytes)."""
    if not isinstance(task, dict):
        return 64
    data = task.get("data")
    values = data.values() if isinstance(data, dict) else [data]
    return 64 + sum(len(v) if isinstance(v, (str, bytes)) else 16 for v in values)


class JobBoard:
    def __init__(self, *, pipeline: LabellingPipeline, settings: Settings,
                 on_event: Callable[[str, int], None] | None = None, claims: LocalClaims | SharedClaims | None = None):
        self.pipeline = pipeline
        self.settings = settings
        self.on_event = on_event  # for Prometheus: ("background_tasks_stored", 1) ..., after each change
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        # (instance, project, task id) -> job id: this process's, or every ingress replica's (SharedClaims)
        self.claims = claims if claims is not None else LocalClaims()
        self.states = TaskStates()  # every job's tasks together
        self._writes = asyncio.Semaphore(WRITE_CONCURRENCY)

    @property
    def queued(self) -> int:
        return self.states[TaskState.QUEUED]

    @property
    def running(self) -> int:
        return self.states[TaskState.RUNNING]

    # -- a /predict ------------------------------------------------------------------------------

    async def predict(self, request: LabellingRequest, writer: PredictionWriter | None,
                      instance: str = "") -> dict[str, Any]:
        """The answer to a batch /predict: what finished within PREDICT_DEADLINE_S; the rest goes on here."""
        job, outcomes, warnings = await self._start(request, writer, instance)
        try:
            await self._until_answer_due(job)
        except asyncio.CancelledError:  # Label Studio hung up: the job goes on, and stores what it finished
            self._hand_over(job, answered=False)
            raise
        warnings += self._hand_over(job, answered=True, outcomes=outcomes)
        finished = [o for o in outcomes if o is not None]
        unavailable = [o for o in finished if o.unavailable]
        if unavailable and all(o.error is not None for o in finished) and not job.states.pending:
            raise ServiceUnavailable(unavailable[0].error)  # nothing done, nothing going on: retry it all later
        response = response_for(request, [o or TaskOutcome(list(NO_PREDICTION)) for o in outcomes],
                                self.pipeline.model_version, warnings)
        if job.state == "running" and job.writer is not None:
            response["job"] = {"id": job.id, "pending": job.states.pending}
        return response

    async def _until_answer_due(self, job: Job) -> None:
        """Until every task of the job finished, or PREDICT_DEADLINE_S passed."""
        try:
            await asyncio.wait_for(asyncio.shield(job.settled.wait()), timeout=self.settings.predict_deadline_s)
        except asyncio.TimeoutError:
            pass

    async def _start(self, request: LabellingRequest, writer: PredictionWriter | None, instance: str):
        s = self.settings
        project = request.project.split(".", 1)[0]
        job = Job(id=uuid.uuid4().hex[:12], instance=instance, project=project,
                  model_version=self.pipeline.model_version, request=dataclasses.replace(request, tasks=[]),
                  writer=writer, states=TaskStates(parent=self.states))
        outcomes: list[TaskOutcome | None] = [None] * len(request.tasks)
        in_flight, over_count, over_bytes = collections.Counter(), 0, 0
        kept_keys = request.config.task_data_keys
        candidates = []
        for index, task in enumerate(request.tasks):
            task_id = echoable_id(task.get("id") if isinstance(task, dict) else None)
            task_id = task_id if isinstance(task_id, int) else None
            kept = None  # not an object: the pipeline fails it alone, whatever it was; nothing big is kept
            if isinstance(task, dict):
                data = task.get("data")
                kept = {"id": task.get("id"),
                        "data": {k: data.get(k) for k in kept_keys} if isinstance(data, dict) else data}
            candidates.append((index, task_id, kept))
        keys = list(dict.fromkeys((instance, project, task_id) for _, task_id, _ in candidates if task_id is not None))
        try:
            refused = await self.claims.claim(job.id, keys)
        except Exception as exc:  # noqa: BLE001 - without claims a task could run twice: retry later instead
            logger.error("cannot claim the tasks of a Retrieve: %s", exc)
            raise ServiceUnavailable(f"the job claims cannot be reached ({exc.__class__.__name__}); retry shortly"
                                     ) from None
        not_queued, seen = [], set()
        for index, task_id, kept in candidates:
            key = (instance, project, task_id)
            if task_id is not None and (key in refused or key in seen):  # another job's, or twice in this one
                in_flight[refused.get(key, job.id)] += 1
                outcomes[index] = TaskOutcome(list(NO_PREDICTION))
                continue
            seen.add(key)
            size = _input_bytes(kept)
            if self.queued >= s.max_background_tasks:
                over_count += 1
            elif self.states.input_bytes + size > s.max_queued_bytes and self.states.input_bytes:
                over_bytes += 1
            else:
                queued = JobTask(index, task_id, kept, size)
                job.tasks.append(queued)
                job.states.add(queued)
                job.queue.append(queued)
                continue
            outcomes[index] = TaskOutcome(list(NO_PREDICTION))
            if task_id is not None:
                not_queued.append(key)
        self.claims.release(job.id, not_queued)
        warnings = []
        for job_id, count in in_flight.items():
            warnings.append(f"{count} of these tasks are being predicted by background job {job_id}; their "
                            "predictions are stored when it finishes (GET /jobs)")
        if over_count:
            warnings.append(f"{over_count} tasks were not queued: the service holds at most {s.max_background_tasks} "
                            "queued tasks (MAX_BACKGROUND_TASKS); run \"Retrieve predictions\" again when the "
                            "current jobs are done")
            logger.warning("job %s: %d tasks over MAX_BACKGROUND_TASKS not queued", job.id, over_count)
        if over_bytes:
            warnings.append(f"{over_bytes} tasks were not queued: the queued tasks' image values would exceed "
                            f"{s.max_queued_bytes} bytes (MAX_QUEUED_BYTES); run \"Retrieve predictions\" again when "
                            "the current jobs are done")
            logger.warning("job %s: %d tasks over MAX_QUEUED_BYTES not queued", job.id, over_bytes)
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
        for task in job.tasks:
            if task.outcome is None:
                continue
            if answered:
                outcomes[task.index] = task.outcome  # failures too: the answer lists them in task_errors
                if task.state is TaskState.HELD:
                    self._move(job, task, TaskState.ANSWERED)
                    self._release(job, task)  # Label Studio stores it from the answer; if the answer is lost, it
                    # stays retryable
            elif task.state is TaskState.HELD:
                self._store(job, task, task.outcome)
            task.outcome = None
        unfinished = job.states[TaskState.QUEUED] + job.states[TaskState.RUNNING]
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
        the order they came; background jobs only while few predictions wait to be stored."""
        s = self.settings
        waiting = [job for job in self.jobs.values() if job.waiting and job.queue]
        if waiting:
            capacity, candidates = s.task_concurrency, waiting
        else:
            capacity = s.background_task_concurrency or 2
            candidates = [job for job in self.jobs.values() if job.queue and job.state == "running"]
            if self.states[TaskState.WRITING] >= s.max_pending_writes:
                return  # a write that ends pumps again
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the loop is gone (a replica shutting down): nothing more starts
            return
        for job in candidates:
            while job.queue and self.running < capacity:
                task = job.queue.popleft()
                self._move(job, task, TaskState.RUNNING)
                task.attempts += 1
                # A context of its own: never the request's, whose cancellation Serve passes on to its model calls.
                runner = loop.create_task(self._run(job, task), context=contextvars.Context())
                runner.add_done_callback(functools.partial(self._runner_done, job, task))
                job.runners[task.index] = runner
            if self.running >= capacity:
                return

    async def _run(self, job: Job, task: JobTask) -> None:
        TASK_PRIORITY.set(job.priority)  # this asyncio task's own context
        VIDEO_PROGRESS.set(functools.partial(job.frames.__setitem__, task.index))
        try:
            try:
                outcome = await self.pipeline.label_task_outcome(job.request, task.task)
            except ServiceUnavailable as exc:
                outcome = TaskOutcome(list(NO_PREDICTION), str(exc), unavailable=True)
            except Exception as exc:  # noqa: BLE001 - the pipeline catches its own; a bug here must not lose the task
                logger.exception("job %s: task %s failed", job.id, task.task_id)
                outcome = TaskOutcome(list(NO_PREDICTION), f"internal error: {exc.__class__.__name__}")
        except asyncio.CancelledError:
            job.runners.pop(task.index, None)
            self._cancelled_while_running(job, task)
            raise
        else:
            job.runners.pop(task.index, None)
            self._record(job, task, outcome)
        finally:
            self._settle_if_idle(job)
            self._pump()

    def _runner_done(self, job: Job, task: JobTask, runner: asyncio.Task) -> None:
        """A runner cancelled before its first step never entered `_run`, whose own handling does the bookkeeping
        otherwise: a DELETE or an answer in the same turn of the loop that started it."""
        if job.runners.get(task.index) is runner and task.state is TaskState.RUNNING:
            del job.runners[task.index]
            self._cancelled_while_running(job, task)
            self._settle_if_idle(job)
            self._pump()

    def _cancelled_while_running(self, job: Job, task: JobTask) -> None:
        if job.dropped:  # DELETE /jobs/{id}, or nowhere to store it
            self._move(job, task, TaskState.CANCELLED)
            self._release(job, task)
        elif task.attempts < MAX_TASK_ATTEMPTS:
            logger.warning("job %s: task %s was cancelled from outside the job; queued again (attempt %d of %d)",
                           job.id, task.task_id, task.attempts + 1, MAX_TASK_ATTEMPTS)
            self._move(job, task, TaskState.QUEUED)
            job.queue.appendleft(task)
        else:
            self._fail(job, task, f"cancelled from outside the job {task.attempts} times (a replica shutting "
                                  "down?); run \"Retrieve predictions\" again for it")

    def _record(self, job: Job, task: JobTask, outcome: TaskOutcome) -> None:
        if outcome.error is not None:
            self._fail(job, task, outcome.error, outcome if job.waiting else None)
        elif job.waiting:
            task.outcome = outcome
            self._move(job, task, TaskState.HELD)
        else:
            self._store(job, task, outcome)

    def _store(self, job: Job, task: JobTask, outcome: TaskOutcome) -> None:
        if task.task_id is None or job.writer is None:
            self._fail(job, task, "finished after the answer, but " + (
                "it has no Label Studio task id to store the prediction under" if job.writer is not None else
                "the service has no usable Label Studio credential to store it (LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY): run \"Retrieve predictions\" again"))
            return
        self._move(job, task, TaskState.WRITING)
        size = len(orjson.dumps(outcome.prediction, option=orjson.OPT_SERIALIZE_NUMPY))
        job.to_write.append((task, outcome.prediction, size))
        if len(job.to_write) >= self.settings.write_batch_tasks:
            job.batch_full.set()
        if job.flusher is None or job.flusher.done():
            job.flusher = asyncio.get_running_loop().create_task(self._flush(job), context=contextvars.Context())
            job.flusher.add_done_callback(functools.partial(self._flusher_done, job))

    async def _flush(self, job: Job) -> None:
        """Store what the job finished, a batch at a time (up to WRITE_BATCH_TASKS and WRITE_BATCH_BYTES): a batch
        waits up to WRITE_BATCH_WAIT_S to fill while the job still computes (each bulk call costs Label Studio about
        as much as several single rows), and what finishes while one batch is written goes in the next."""
        s = self.settings
        project_id = int(job.project) if job.project.isdigit() else None
        while job.to_write:
            if len(job.to_write) < s.write_batch_tasks and job.runners:
                job.batch_full.clear()
                try:
                    await asyncio.wait_for(job.batch_full.wait(), timeout=s.write_batch_wait_s)
                except asyncio.TimeoutError:
                    pass
                except asyncio.CancelledError:
                    await self._flush_cancelled(job)
                    return
            batch, size = [], 0
            while job.to_write and len(batch) < s.write_batch_tasks and (
                    not batch or size + job.to_write[0][2] <= s.write_batch_bytes):
                task, prediction, item_size = job.to_write.popleft()
                batch.append((task, prediction))
                size += item_size
            job.writing_now = [task for task, _ in batch]
            uncertain: set[int] = set()
            try:
                async with self._writes:
                    results, uncertain = await asyncio.wait_for(
                        job.writer.create_many(project_id, [(t.task_id, p) for t, p in batch], job.model_version),
                        timeout=s.write_deadline_s)
            except asyncio.CancelledError:  # DELETE /jobs/{id}, or the replica shuts down
                await self._flush_cancelled(job)
                return
            except asyncio.TimeoutError:
                results = {t.task_id: f"storing the prediction took longer than {s.write_deadline_s:g} s "
                                      "(WRITE_DEADLINE_S)" for t, _ in batch}
            except Exception as exc:  # noqa: BLE001 - any answer the writer did not expect fails this batch alone
                results = {t.task_id: f"storing the prediction failed: {exc}" for t, _ in batch}
            job.writing_now = []
            job.uncertain += [t.task_id for t, _ in batch if t.task_id in uncertain]
            for task, _ in batch:
                self._written(job, task, results.get(task.task_id, "storing the prediction failed: no answer "
                                                                   "for this task"))
            self._maybe_finish(job)
            self._pump()

    def _written(self, job: Job, task: JobTask, error: str | None) -> None:
        if error is None:
            job.write_failures_in_a_row = 0
            self._move(job, task, TaskState.STORED)
            self._count("background_tasks_stored")
            return
        logger.error("job %s: task %s: %s", job.id, task.task_id, redact_urls(error))
        self._fail(job, task, error)
        job.write_failures_in_a_row += 1
        if (job.write_failures_in_a_row >= self.settings.job_write_failure_limit and job.state == "running"
                and job.stop_reason is None):
            self._stop(job, f"{job.write_failures_in_a_row} predictions in a row could not be stored "
                            f"(JOB_WRITE_FAILURE_LIMIT); the last: {redact_urls(error)}")

    def _flusher_done(self, job: Job, flusher: asyncio.Task) -> None:
        """A flusher cancelled before its first step sent nothing: what it was to store is free again. However it
        ended, its writes no longer count against MAX_PENDING_WRITES: background work held back by them starts (a
        DELETE of a job with writes in flight left another job's queued tasks waiting forever)."""
        if flusher.cancelled() and job.to_write and not job.writing_now:
            while job.to_write:
                task, _, _ = job.to_write.popleft()
                self._move(job, task, TaskState.CANCELLED)
                self._release(job, task)
            self._maybe_finish(job)
        self._pump()

    async def _flush_cancelled(self, job: Job) -> None:
        """The batch in flight may be stored or not: ask. What waited for a batch was never sent: free again."""
        in_flight, job.writing_now = job.writing_now, []
        while job.to_write:
            task, _, _ = job.to_write.popleft()
            self._move(job, task, TaskState.CANCELLED)
            self._release(job, task)
        for task in in_flight:
            await self._write_cancelled(job, task)
        self._maybe_finish(job)

    async def _sweep(self, job: Job) -> None:
        """A first attempt that Label Studio committed after the writer's check said it had not leaves a second copy:
        remove those, once every write of the job is done."""
        for task_id in job.uncertain:
            try:
                removed = await asyncio.wait_for(job.writer.keep_one(task_id, job.model_version),
                                                 timeout=self.settings.write_deadline_s)
                if removed:
                    logger.warning("job %s: task %s: removed %d late second copies", job.id, task_id, removed)
            except Exception as exc:  # noqa: BLE001 - the job still finishes; the log says what could not be checked
                logger.error("job %s: task %s: cannot check for a second copy: %s", job.id, task_id,
                             redact_urls(str(exc)))
        job.uncertain = []
        self._maybe_finish(job)

    def _sweep_done(self, job: Job, sweep: asyncio.Task) -> None:
        if job.uncertain:  # cancelled (the replica shuts down): the job ends without the check
            job.uncertain = []
            self._maybe_finish(job)

    async def _write_cancelled(self, job: Job, task: JobTask) -> None:
        """A write cancelled part-way may have stored the row: ask Label Studio (briefly). Stored: it counts as
        stored. Not stored: cancelled, and free for the next Retrieve. No answer: cancelled, and the claim stays until
        the job leaves the history, so a quick second Retrieve cannot store a second copy."""
        try:
            stored = await asyncio.wait_for(job.writer.stored(task.task_id, job.model_version),
                                            timeout=CANCELLED_WRITE_CHECK_S)
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - unknown either way
            stored = None
        self._move(job, task, TaskState.STORED if stored else TaskState.CANCELLED)
        if stored is False:
            self._release(job, task)
        elif stored is None:
            logger.warning("job %s: task %s: a cancelled write may or may not have been stored; the task stays "
                           "claimed until the job leaves GET /jobs", job.id, task.task_id)
        self._maybe_finish(job)

    def _stop(self, job: Job, reason: str) -> None:
        """Label Studio keeps refusing or not answering: fail what has not started, instead of computing
        predictions that cannot be stored."""
        job.stop_reason = reason
        logger.error("job %s stopped: %s", job.id, reason)
        while job.queue:
            self._fail(job, job.queue.popleft(), f"not started: the job stopped ({reason})")

    def _fail(self, job: Job, task: JobTask, error: str, outcome: TaskOutcome | None = None) -> None:
        error = redact_urls(error)
        task.outcome = dataclasses.replace(outcome, error=error) if outcome is not None else None
        self._move(job, task, TaskState.FAILED)
        job.failures.add(task.task_id if task.task_id is not None else f"#{task.index}", error)
        self._release(job, task)  # retryable: the next Retrieve runs it again
        if not job.waiting:
            self._count("background_tasks_failed")

    def _move(self, job: Job, task: JobTask, state: TaskState) -> None:
        job.states.move(task, state)

    def _release(self, job: Job, task: JobTask) -> None:
        if task.task_id is not None:
            self.claims.release(job.id, [(job.instance, job.project, task.task_id)])

    def _settle_if_idle(self, job: Job) -> None:
        if not job.runners:
            job.batch_full.set()  # nothing is being computed: the batch goes as it is
        if not job.queue and not job.runners:
            self._settle(job)

    def _settle(self, job: Job) -> None:
        job.settled.set()
        self._maybe_finish(job)

    def _maybe_finish(self, job: Job) -> None:
        """The job ends, once, when its request stopped waiting and every task is in a final state."""
        if job.waiting or job.states.pending or job.finished_at is not None:
            return
        if job.uncertain:  # checked for late second copies first; the sweep empties the list and comes back
            if job.sweep is None:
                job.sweep = asyncio.get_running_loop().create_task(self._sweep(job), context=contextvars.Context())
                job.sweep.add_done_callback(functools.partial(self._sweep_done, job))
            return
        job.finished_at = time.monotonic()
        if job.state == "running":
            job.state = "stopped" if job.stop_reason else "finished"
        s = job.states
        if job.background_since is None or not (s[TaskState.STORED] or s[TaskState.FAILED] or s[TaskState.CANCELLED]):
            self.jobs.pop(job.id, None)  # all of it went back in the answer: nothing to show in GET /jobs
            return
        logger.info("job %s %s: %d answered, %d stored, %d failed, %d cancelled of %d tasks", job.id, job.state,
                    s[TaskState.ANSWERED], s[TaskState.STORED], s[TaskState.FAILED], s[TaskState.CANCELLED],
                    job.total)
        self._trim_history()
        if job.state != "cancelled":
            self._count("background_jobs_finished")  # and the gauges see the job end

    def _trim_history(self) -> None:
        done = [job for job in self.jobs.values() if job.state != "running" and not job.states.pending]
        for job in done[:max(0, len(done) - JOB_HISTORY)]:
            del self.jobs[job.id]
            self.claims.release(job.id, [(job.instance, job.project, task.task_id) for task in job.tasks
                                         if task.task_id is not None])

    def _count(self, event: str, n: int = 1) -> None:
        if self.on_event is not None:
            self.on_event(event, n)

    # -- GET /jobs, DELETE /jobs/{id} ------------------------------------------------------------

    def summaries(self, project: str = "", instance: str = "") -> list[dict[str, Any]]:
        """Newest first; only one project's (its id, or Label Studio's full name) and one instance's when given."""
        project = project.split(".", 1)[0]
        try:
            instance = origin_text(instance)  # http://ls and http://ls:80/ are one instance
        except ValueError:
            return []
        return [job.summary() for job in reversed(self.jobs.values())
                if (not project or job.project == project) and (not instance or job.instance == instance)]

    def totals(self) -> dict[str, int]:
        s = self.states
        return {"running_jobs": sum(job.state == "running" for job in self.jobs.values()),
                "pending_tasks": s.pending,
                "stored_tasks": sum(job.states[TaskState.STORED] for job in self.jobs.values()),
                "failed_tasks": sum(job.states[TaskState.FAILED] for job in self.jobs.values())}

    def cancel(self, job_id: str) -> bool:
        """Drop the job's queued tasks, cancel its running ones and its pending writes."""
        job = self.jobs.get(job_id)
        if job is None or job.state != "running":
            return False
        job.state = "cancelled"
        dropped = self._drop_unfinished(job)
        writes = job.states[TaskState.WRITING]
        if job.flusher is not None and not job.flusher.done():
            job.flusher.cancel()  # what was sent is checked, what waited is dropped (_flush_cancelled)
        logger.warning("job %s cancelled: %d tasks dropped, %d writes cancelled", job.id, dropped, writes)
        self._settle_if_idle(job)
        self._trim_history()
        self._count("background_jobs_cancelled")
        return True

    def _drop_unfinished(self, job: Job) -> int:
        dropped = len(job.queue) + len(job.runners)
        while job.queue:
            task = job.queue.popleft()
            self._move(job, task, TaskState.CANCELLED)
            self._release(job, task)
        job.dropped = True  # its runners unwind as cancelled, not queued again
        for runner in list(job.runners.values()):
            runner.cancel()  # moves to CANCELLED and releases its claim as it unwinds
        return dropped
