"""One state per task of a background job, and the counts that follow from them.

A task is in exactly one state at every moment. The counts are an index over those states: only `TaskStates.move`
changes a state, and it moves the task's count with it, so `total` is always the sum of the counts (the model-based
test in tests/test_job_board_model.py recounts them after every step).
"""

from __future__ import annotations

import collections
import enum
import re
from dataclasses import dataclass
from typing import Any


class TaskState(str, enum.Enum):
    QUEUED = "queued"  # waiting for a free slot
    RUNNING = "running"  # in the pipeline (fetch, detect, segment)
    HELD = "held"  # finished while the /predict that started the job still waits: its answer will carry it
    WRITING = "writing"  # finished after the answer: being stored in Label Studio through the API
    ANSWERED = "answered"  # went back in the /predict answer (Label Studio stores it)
    STORED = "stored"  # stored through the API
    FAILED = "failed"  # will not be stored by this job; released, so the next Retrieve runs it again
    CANCELLED = "cancelled"  # DELETE /jobs/{id}, or dropped for lack of a credential to store it


FINAL = frozenset({TaskState.ANSWERED, TaskState.STORED, TaskState.FAILED, TaskState.CANCELLED})
HOLDS_INPUT = frozenset({TaskState.QUEUED, TaskState.RUNNING})  # the task's image value is still kept


@dataclass(slots=True, eq=False)
class JobTask:
    index: int  # position in the request's `tasks`
    task_id: int | None  # Label Studio's id; None when the request sent none usable (then it cannot be stored)
    task: dict[str, Any] | None  # {"id": ..., "data": {<image key>: <value>}} until the task no longer needs it
    input_bytes: int  # what `task` holds, against MAX_QUEUED_BYTES
    state: TaskState = TaskState.QUEUED
    outcome: Any = None  # TaskOutcome while HELD (and a failure the answer must carry); None otherwise
    attempts: int = 0  # starts, counting restarts after a cancellation from outside the job


class TaskStates:
    """The counts of one job, or of the whole board (`parent`), kept by the only function that moves a task."""

    def __init__(self, parent: "TaskStates | None" = None):
        self.counts: collections.Counter[TaskState] = collections.Counter()
        self.input_bytes = 0
        self.parent = parent

    def add(self, task: JobTask) -> None:
        self._adjust(task.state, 1, task.input_bytes)

    def move(self, task: JobTask, state: TaskState) -> None:
        if task.state in FINAL:
            raise AssertionError(f"task {task.task_id} is already {task.state.value}; it cannot become {state.value}")
        self._adjust(task.state, -1, -task.input_bytes if task.state in HOLDS_INPUT else 0)
        task.state = state
        if state not in HOLDS_INPUT:
            task.task, task.input_bytes = None, 0  # nothing big is kept past the pipeline
        self._adjust(state, 1, task.input_bytes if state in HOLDS_INPUT else 0)

    def _adjust(self, state: TaskState, n: int, input_bytes: int) -> None:
        self.counts[state] += n
        self.input_bytes += input_bytes
        if self.parent is not None:
            self.parent._adjust(state, n, input_bytes)

    def __getitem__(self, state: TaskState) -> int:
        return self.counts[state]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def pending(self) -> int:
        return sum(n for state, n in self.counts.items() if state not in FINAL)


FAILURES_SHOWN = 100  # failed tasks listed with their error per job in GET /jobs; all are counted by kind
_KIND = re.compile(r"[^:'\"(]{1,80}")


class FailureLog:
    """The first FAILURES_SHOWN failures of a job with their text, and a count per kind of all of them: a job of
    100,000 failed tasks keeps a hundred messages, not a hundred thousand."""

    def __init__(self) -> None:
        self.shown: list[dict[str, Any]] = []
        self.kinds: collections.Counter[str] = collections.Counter()

    def add(self, task: Any, error: str) -> None:
        if len(self.shown) < FAILURES_SHOWN:
            self.shown.append({"task": task, "error": error})
        match = _KIND.match(error)
        kind = re.sub(r"\d+", "N", match.group(0).strip()) if match else "other"
        if len(self.kinds) < FAILURES_SHOWN or kind in self.kinds:
            self.kinds[kind] += 1
        else:
            self.kinds["other"] += 1
