"""`grounded-serve prelabel`: pre-label a whole Label Studio project through the running service.

Why through the service rather than a separate offline pipeline: the service already batches across
requests and autoscales its model replicas on whatever cluster it runs on, and its output is by
construction what interactive users and "Retrieve predictions" get. This command only pages tasks,
keeps a bounded number of chunks in flight, and stores predictions, so it is light enough to run on a
laptop against a GPU cluster.

Resumable: predictions are stored per task with a stable model_version (the service's, plus a hash of
the prompt when one is given); tasks that already have a prediction of that version are skipped, and a
task that failed is not stored, so running the command again continues where it stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from serve_app import get_logger
from serve_app.label_studio.credentials import LabelStudioCredentials
from serve_app.label_studio.prediction_writer import PredictionRefused, PredictionWriter
from serve_app.label_studio.retries import TRANSIENT_STATUS, TransientError, retry_after, with_retries

logger = get_logger(__name__)


@dataclass
class PrelabelOptions:
    label_studio_url: str
    api_key: str
    project: int
    service_url: str = "http://127.0.0.1:9090"
    prompt: str = ""
    view: int | None = None
    box_threshold: float | None = None
    text_threshold: float | None = None
    chunk_size: int = 8
    concurrency: int = 4
    retries: int = 5
    request_timeout_s: float = 300.0
    basic_auth: tuple[str, str] | None = None
    progress: bool = True


@dataclass
class Summary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    background: int = 0  # the service's background job finishes and stores them (GET /jobs)
    failed: dict[int, str] = field(default_factory=dict)  # task id -> reason
    interrupted: bool = False
    model_version: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        state = "interrupted" if self.interrupted else "finished"
        background = f", {self.background} finishing in the service's background job" if self.background else ""
        return (f"{state}: {self.done} pre-labelled, {self.skipped} skipped (already had {self.model_version}), "
                f"{len(self.failed)} failed{background}, of {self.total} tasks in {self.seconds:.1f} s")


def prompt_context(options: PrelabelOptions) -> dict | None:
    """The context the labeling UI would send: the prompt as a TextArea result, thresholds as numbers."""
    results: list[dict[str, Any]] = []
    if options.prompt:
        results.append({"type": "textarea", "from_name": "prompt", "to_name": "image",
                        "value": {"text": [options.prompt]}})
    for name in ("box_threshold", "text_threshold"):
        value = getattr(options, name)
        if value is not None:
            results.append({"type": "number", "from_name": name, "to_name": "image", "value": {"number": value}})
    return {"result": results} if results else None


def versioned(service_version: str, prompt: str) -> str:
    """A prompt changes the predictions, so it is part of the version (and of what is skipped)."""
    if not prompt:
        return service_version
    return f"{service_version}+prompt:{hashlib.sha256(prompt.encode()).hexdigest()[:10]}"


class Prelabeler:
    def __init__(self, options: PrelabelOptions):
        from label_studio_sdk import LabelStudio

        self.options = options
        self.client = LabelStudio(base_url=options.label_studio_url, api_key=options.api_key)
        self.summary = Summary()

    async def _post(self, http: httpx.AsyncClient, path: str, body: dict) -> dict:
        try:
            response = await http.post(path, json=body)
        except httpx.TransportError as exc:
            raise TransientError(f"{exc.__class__.__name__}: {exc}") from None
        if response.status_code in TRANSIENT_STATUS:
            raise TransientError(f"service answered HTTP {response.status_code}",
                                 retry_after(response.headers.get("retry-after")))
        if response.status_code != 200:
            raise RuntimeError(f"service answered HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def _list_tasks(self) -> list[Any]:
        pager = self.client.tasks.list(project=self.options.project, view=self.options.view, page_size=100,
                                       include="id,data,predictions_model_versions")
        return list(pager)

    async def _run_chunk(self, http, writer, chunk, label_config, context, version, progress) -> None:
        body = {"tasks": [{"id": t.id, "data": t.data} for t in chunk], "label_config": label_config,
                "project": str(self.options.project), "params": {"context": context}}
        try:
            reply = await with_retries(lambda: self._post(http, "/predict", body), self.options.retries,
                                       f"tasks {chunk[0].id}..{chunk[-1].id}")
        except (TransientError, RuntimeError) as exc:
            for task in chunk:
                self.summary.failed[task.id] = str(exc)
            progress.update(len(chunk))
            return
        errors = {e["index"]: e["error"] for e in reply.get("task_errors", [])}
        to_store = []
        for index, (task, prediction) in enumerate(zip(chunk, reply["results"])):
            if index in errors:  # not stored: the next run tries it again
                self.summary.failed[task.id] = errors[index]
            elif not isinstance(prediction, dict):
                # [] without an error: past the service's PREDICT_DEADLINE_S. Its background job stores it under
                # the service's model_version, which is this run's when no prompt is given.
                if reply.get("job") and version == reply.get("model_version"):
                    self.summary.background += 1
                else:
                    self.summary.failed[task.id] = "no prediction (the service answered [] for it)"
            else:
                to_store.append((task.id, prediction))
                continue
            progress.update(1)
        if to_store:  # one bulk import per chunk where Label Studio takes it (the background jobs' writer)
            try:
                results, _ = await writer.create_many(self.options.project, to_store, version)
            except (TransientError, PredictionRefused) as exc:
                results = {task_id: f"storing the prediction failed: {exc}" for task_id, _ in to_store}
            for task_id, error in results.items():
                if error is None:
                    self.summary.done += 1
                else:
                    self.summary.failed[task_id] = error
            progress.update(len(to_store))

    async def run(self) -> Summary:
        from tqdm import tqdm

        started = time.monotonic()
        options = self.options
        project = await asyncio.to_thread(self.client.projects.get, id=options.project)
        auth = httpx.BasicAuth(*options.basic_auth) if options.basic_auth else None
        async with httpx.AsyncClient(base_url=options.service_url, auth=auth, timeout=options.request_timeout_s) as http, \
                httpx.AsyncClient(trust_env=False) as ls_http:
            # the same writer as the service's background jobs
            writer = PredictionWriter(LabelStudioCredentials(options.label_studio_url, options.api_key, ls_http,
                                                             "--api-key"), retries=options.retries)
            setup = await with_retries(lambda: self._post(http, "/setup", {
                "project": str(options.project), "schema": project.label_config}), options.retries, "setup")
            version = self.summary.model_version = versioned(setup["model_version"], options.prompt)
            tasks = await asyncio.to_thread(self._list_tasks)
            todo = [t for t in tasks if version not in (getattr(t, "predictions_model_versions", "") or "").split(",")]
            self.summary.total, self.summary.skipped = len(tasks), len(tasks) - len(todo)
            context = prompt_context(options)
            chunks = [todo[i:i + options.chunk_size] for i in range(0, len(todo), options.chunk_size)]
            limit = asyncio.Semaphore(options.concurrency)
            progress = tqdm(total=len(todo), unit="task", disable=not options.progress, dynamic_ncols=True)

            async def bounded(chunk):
                async with limit:
                    await self._run_chunk(http, writer, chunk, project.label_config, context, version, progress)

            try:
                await asyncio.gather(*(bounded(c) for c in chunks))
            except asyncio.CancelledError:
                self.summary.interrupted = True
            finally:
                progress.close()
        self.summary.seconds = time.monotonic() - started
        return self.summary


def run_prelabel(options: PrelabelOptions) -> Summary:
    """Runs until done or Ctrl-C; on Ctrl-C in-flight chunks are abandoned (nothing half-stored)."""
    async def main() -> Summary:
        prelabeler = Prelabeler(options)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await prelabeler.run()
        except asyncio.CancelledError:
            prelabeler.summary.interrupted = True
            return prelabeler.summary

    return asyncio.run(main())
