"""The job path under a slow, failing or odd Label Studio (issue 28, item 7): a scripted stand-in of Label Studio's
predictions API on 127.0.0.1, the real PredictionWriter, and a pipeline stand-in that answers at once (or when the
test lets it), so each test controls the moment things happen."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import urllib.parse
from typing import Callable

import httpx
import pytest

from serve_app.ingress.errors import ImageError
from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy
from serve_app.ingress.job_state import FAILURES_SHOWN, FailureLog, TaskState
from serve_app.ingress.jobs import JobBoard
from serve_app.label_studio.credentials import LabelStudioCredentials
from serve_app.ingress.pipeline import LabellingPipeline, TaskOutcome
from serve_app.label_studio.prediction_writer import PredictionWriter
from serve_app.label_studio.retries import retry_after
from serve_app.settings import Settings
from tests.configs import SEED_CONFIG
from tests.loopback import loopback_http
from tests.waiting import until

TOKEN = "stand-in-token"
PREDICTION = {"result": [{"type": "rectanglelabels", "value": {"x": 1}}], "score": 0.5}


class ScriptedLabelStudio:
    """`/api/predictions/` whose answers the test scripts: `on_post(n, row)` returns (status, headers, body or None to
    store the row and answer it); `list_all` ignores `?task=` (a proxy that drops the query)."""

    def __init__(self, on_post: Callable | None = None, list_all: bool = False, on_get: Callable | None = None,
                 on_import: Callable | None = None):
        self.rows: list[dict] = []
        self.posts = 0
        self.imports = 0
        self.on_import = on_import  # (rows) -> (status, headers, body); None: 404, as an older Label Studio
        self.lock = threading.Lock()
        self.on_post = on_post
        self.on_get = on_get
        self.list_all = list_all
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status, headers=None, body=b""):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if self.path.endswith("/import/predictions"):
                    with store.lock:
                        store.imports += 1
                    scripted = store.on_import(body) if store.on_import else (404, {}, {"detail": "Not found"})
                    return self._answer(*scripted)
                with store.lock:
                    store.posts += 1
                    n = store.posts
                scripted = store.on_post(n, body) if store.on_post else None
                if scripted is None:
                    return self._answer(201, {}, store.add(body))
                try:
                    self._answer(*scripted)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                if store.on_get is not None:
                    scripted = store.on_get()
                    if scripted is not None:
                        return self._answer(*scripted)
                task = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("task", [""])[0]
                with store.lock:
                    rows = [r for r in store.rows if store.list_all or str(r["task"]) == task]
                self._answer(200, {}, rows)

            def do_DELETE(self):
                row_id = self.path.strip("/").rsplit("/", 1)[-1]
                with store.lock:
                    store.rows = [r for r in store.rows if str(r["id"]) != row_id]
                self._answer(204, {}, b"")

        self.handler = Handler

    def add(self, body: dict) -> dict:
        with self.lock:
            row = {"id": 1000 + len(self.rows) + self.posts, **body}
            self.rows.append(row)
            return row

    def for_task(self, task_id: int) -> list[dict]:
        with self.lock:
            return [r for r in self.rows if r["task"] == task_id]


class GatedPipeline:
    """Each task's prediction once `gate` opens (the tests open it after the /predict answered, so every task is
    background work), and for tasks in `later` once `later_gate` opens too."""

    model_version = "v-writes"

    def __init__(self, settings: Settings, later: frozenset[int] = frozenset()):
        self.gate = asyncio.Event()
        self.later_gate = asyncio.Event()
        self.later = later
        self.parser = LabellingPipeline(settings=settings, model_version=self.model_version, detect=None,
                                        segment=None, fetcher=None)

    async def label_task_outcome(self, request, task) -> TaskOutcome:
        await self.gate.wait()
        if task["id"] in self.later:
            await self.later_gate.wait()
        return TaskOutcome(PREDICTION)

    async def predict(self, board: JobBoard, ids, writer, **body_options) -> dict:
        response = await board.predict(self.parser.parse(body(ids, **body_options)), writer)
        self.gate.set()
        return response


def settings(**args) -> Settings:
    return Settings.load(env={}, args={"predict_deadline_s": 0.01, "task_concurrency": 2,
                                       "background_task_concurrency": 2, **args})


def body(ids, image=lambda i: f"https://images.example/{i}.png") -> dict:
    return {"tasks": [{"id": i, "data": {"image": image(i)}} for i in ids], "project": "4.1795641121",
            "label_config": SEED_CONFIG, "params": {"context": None}}


async def until_done(board: JobBoard) -> None:
    await until(lambda: not any(job.state == "running" for job in board.jobs.values()), 30, "every job finishing")


def writer(url: str, http: httpx.AsyncClient, **options) -> PredictionWriter:
    return PredictionWriter(LabelStudioCredentials(url, TOKEN, http, "the test"),
                            **{"max_delay_s": 0.05, **options})


@pytest.mark.parametrize("asked", ["999999", "9" * 400])
def test_a_retry_after_of_any_size_is_capped(asked):
    """429 with Retry-After 999999 (or 400 digits, "inf" before) held a write slot for that long."""
    ls = ScriptedLabelStudio(on_post=lambda n, row: (429, {}, {"detail": "slow down"}) if n == 1 else None)
    assert retry_after(asked) >= 999999

    async def scenario():
        async with httpx.AsyncClient() as http:
            with_cap = writer(ls.url, http, max_delay_s=0.1)
            await asyncio.wait_for(with_cap.create(1, PREDICTION, "v1"), timeout=20)  # a hang guard, not a timing

    original = ls.on_post
    ls.on_post = lambda n, row: (429, {"Retry-After": asked}, {"detail": "slow down"}) if n == 1 else original(n, row)
    with loopback_http(ls.handler) as url:
        ls.url = url
        asyncio.run(scenario())
    assert len(ls.for_task(1)) == 1


def test_a_login_page_where_json_was_due_fails_the_task_and_releases_it():
    """A 200 text/html page (an SSO proxy) on the check before a retry escaped the writer: the job lost the task and
    kept its claim for ever."""
    login = (200, {"Content-Type": "text/html"}, b"<html><form>Sign in</form></html>")
    ls = ScriptedLabelStudio(on_post=lambda n, row: (502, {}, {"detail": "bad gateway"}), on_get=lambda: login)
    s = settings()

    board = run_job(ls, [1, 2, 3], s)
    [summary] = board.summaries()
    counts = summary["tasks"]
    assert counts["failed"] + counts["answered"] == 3 and counts["failed"] >= 1 and counts["pending"] == 0
    assert all("not JSON" in failure["error"] and "login page" in failure["error"]
               for failure in summary["failed_tasks"])
    assert not board.claims  # every failed one is free for the next Retrieve


def test_a_row_committed_after_the_clients_timeout_leaves_one_copy():
    """Label Studio commits the first POST after the writer gave up on it and after the check before the retry said
    "not stored": the retry stores a second row. The job's sweep, before it finishes, leaves one."""
    late_commit = threading.Event()
    ls = ScriptedLabelStudio()

    def on_post(n, row):
        if n == 1:  # task 1's first attempt: no reply within the writer's timeout; the row lands when the test says
            late_commit.wait(30)
            ls.add(row)
            return 504, {}, {"detail": "gateway timeout"}
        return None

    ls.on_post = on_post
    s = settings()

    async def scenario():
        async with httpx.AsyncClient() as http:
            pipeline = GatedPipeline(s, later=frozenset({2}))
            board = JobBoard(pipeline=pipeline, settings=s)
            await pipeline.predict(board, [1, 2], writer(ls.url, http, timeout_s=0.2))
            [job] = board.jobs.values()
            await until(lambda: job.uncertain == [1], 30)  # stored by the retry, the first attempt's fate unknown
            late_commit.set()
            await until(lambda: len(ls.for_task(1)) == 2, 30)  # the late commit: two copies now
            pipeline.later_gate.set()  # the job's last task ends; the sweep runs before the job finishes
            await until_done(board)
            return board

    with loopback_http(ls.handler) as url:
        ls.url = url
        board = asyncio.run(scenario())
    assert len(ls.for_task(1)) == 1 and len(ls.for_task(2)) == 1
    [summary] = board.summaries()
    assert summary["tasks"]["stored"] == 2 and summary["state"] == "finished"


def test_a_listing_that_ignores_the_task_filter_does_not_count_as_stored():
    """Another task's row of the same model version in an unfiltered list made a failed write count as stored."""
    ls = ScriptedLabelStudio(list_all=True)
    ls.add({"task": 99, "result": [], "score": 0, "model_version": "v1"})
    ls.on_post = lambda n, row: (502, {}, {"detail": "bad gateway"}) if n == 1 else None  # lost, not stored

    async def scenario():
        async with httpx.AsyncClient() as http:
            await writer(ls.url, http).create(5, PREDICTION, "v1")

    with loopback_http(ls.handler) as url:
        ls.url = url
        asyncio.run(scenario())
    assert len(ls.for_task(5)) == 1


def test_a_label_studio_that_never_answers_pauses_the_job_instead_of_filling_memory():
    """With writes hanging, a 2,000-task job held 662 finished predictions after 5 s; now at most MAX_PENDING_WRITES
    (plus the tasks already running when the limit was reached) wait, and the rest stay queued."""
    release = threading.Event()
    ls = ScriptedLabelStudio()

    def on_post(n, row):
        release.wait(60)
        return None

    ls.on_post = on_post
    s = settings(max_pending_writes=4)

    async def scenario():
        async with httpx.AsyncClient() as http:
            pipeline = GatedPipeline(s)
            board = JobBoard(pipeline=pipeline, settings=s)
            await pipeline.predict(board, range(1, 41), writer(ls.url, http, timeout_s=60))
            [job] = board.jobs.values()
            await until(lambda: job.states[TaskState.WRITING] >= 4 and not job.states[TaskState.RUNNING], 30)
            paused = job.counts()
            release.set()
            await until_done(board)
            return paused, job.counts()

    with loopback_http(ls.handler) as url:
        ls.url = url
        paused, final = asyncio.run(scenario())
    assert paused["writing"] <= 4 + 2 and paused["queued"] >= 40 - 6 - paused["answered"] - paused["failed"]
    assert final["stored"] + final["answered"] == 40 and final["pending"] == 0
    assert all(len(ls.for_task(i)) <= 1 for i in range(1, 41))


def test_repeated_write_failures_stop_the_job_and_say_why():
    ls = ScriptedLabelStudio(on_post=lambda n, row: (503, {}, {"detail": "maintenance"}))
    s = settings(job_write_failure_limit=3, max_pending_writes=2)

    board = run_job(ls, range(1, 31), s, retries=0)
    [summary] = board.summaries()
    assert summary["state"] == "stopped" and "JOB_WRITE_FAILURE_LIMIT" in summary["stopped_because"]
    counts = summary["tasks"]
    assert counts["failed"] + counts["answered"] == 30 and counts["pending"] == 0
    assert ls.posts < 30  # it stopped trying, instead of computing what it could not store
    assert any("not started" in kind for kind in summary["failure_kinds"])
    assert not board.claims


def test_delete_cancels_a_write_waiting_on_retry_after_and_frees_its_slot():
    ls = ScriptedLabelStudio(on_post=lambda n, row: (429, {"Retry-After": "3600"}, {"detail": "slow down"}))
    s = settings()

    async def scenario():
        async with httpx.AsyncClient() as http:
            pipeline = GatedPipeline(s)
            board = JobBoard(pipeline=pipeline, settings=s)
            response = await pipeline.predict(board, [1, 2], writer(ls.url, http, max_delay_s=3600))
            [job] = board.jobs.values()
            await until(lambda: ls.posts >= 1 and job.states[TaskState.WRITING] >= 1, 30)
            assert board.cancel(response["job"]["id"])
            await until(lambda: not job.states.pending, 30)
            return board, job

    with loopback_http(ls.handler) as url:
        ls.url = url
        board, job = asyncio.run(scenario())
    assert job.state == "cancelled" and board._writes._value == 4  # every write slot free again
    assert not board.claims  # Label Studio said it holds no row: free for the next Retrieve


def test_queued_tasks_are_bounded_in_bytes():
    """Three answered /predicts of 100 tasks with 1 MB data: URLs left 301 MiB held."""
    s = settings(max_queued_bytes=8 * 1024 * 1024)
    big = lambda i: "data:image/png;base64," + "A" * (1 << 20)  # noqa: E731

    async def scenario():
        pipeline = GatedPipeline(s)
        board = JobBoard(pipeline=pipeline, settings=s)
        answers = []
        for first in (1, 101, 201):
            request = pipeline.parser.parse(body(range(first, first + 10), image=big))
            answers.append(await board.predict(request, None))
        held = board.states.input_bytes
        pipeline.gate.set()
        return answers, held

    answers, held = asyncio.run(scenario())
    assert held <= 8 * 1024 * 1024
    assert any("MAX_QUEUED_BYTES" in w for answer in answers for w in answer.get("warnings", []))


def test_a_job_keeps_the_first_failures_and_a_count_per_kind():
    log = FailureLog()
    for i in range(100_000):
        log.add(i, f"image URL answered HTTP 404: 'https://x.example/{i}.png'" if i % 2 else
                f"storing the prediction failed: Label Studio answered HTTP {500 + i % 4}")
    assert len(log.shown) == FAILURES_SHOWN
    assert sum(log.kinds.values()) == 100_000 and len(log.kinds) <= 2


def test_task_errors_never_show_a_url_secret(image_server):
    """A presigned URL's signature, a ?token= and user:password@ are cut from every message about a task's URL."""
    fetcher = ImageFetcher(ImageSourcePolicy(max_bytes=10**6, timeout_s=5, max_pixels=10**7,
                                             host_allowlist=frozenset({"127.0.0.1"})))
    port = image_server.rsplit(":", 1)[1]
    urls = [f"{image_server}/missing.png?X-Amz-Signature=SECRET1&X-Amz-Credential=AKIA",
            f"{image_server}/missing.png?sv=2024&sig=SECRET2",
            f"{image_server}/missing.png?token=SECRET3#frag",
            f"http://user:SECRET4@127.0.0.1:{port}/missing.png",
            "http://127.0.0.1:1/closed.png?token=SECRET5"]

    async def messages():
        found = []
        async with fetcher._client if hasattr(fetcher, "_client") else httpx.AsyncClient():
            for url in urls:
                with pytest.raises(ImageError) as failure:
                    await fetcher.fetch(url)
                found.append(str(failure.value))
        return found

    for message in asyncio.run(messages()):
        assert "SECRET" not in message and "sig=" not in message and "token=" not in message, message
        assert "X-Amz-Signature" not in message


def bulk_import(ls: ScriptedLabelStudio, fail_after_storing: bool = False, refuse_task: int | None = None):
    """Label Studio 1.23's bulk import: all rows or none; `refuse_task` makes it a 400 (a task deleted meanwhile)."""
    def on_import(rows):
        if refuse_task is not None and any(row["task"] == refuse_task for row in rows):
            return 400, {}, {"detail": f"task ID {refuse_task} not found in project"}
        for row in rows:
            ls.add(row)
        return (502, {}, {"detail": "bad gateway"}) if fail_after_storing else (201, {}, {"created": len(rows)})
    return on_import


def run_job(ls: ScriptedLabelStudio, ids, s: Settings, **writer_options) -> JobBoard:
    async def scenario():
        async with httpx.AsyncClient() as http:
            pipeline = GatedPipeline(s)
            board = JobBoard(pipeline=pipeline, settings=s)
            await pipeline.predict(board, ids, writer(ls.url, http, **writer_options))
            await until_done(board)
            return board

    with loopback_http(ls.handler) as url:
        ls.url = url
        return asyncio.run(scenario())


def test_background_predictions_are_stored_in_bulk():
    ls = ScriptedLabelStudio()
    ls.on_import = bulk_import(ls)
    board = run_job(ls, range(1, 121), settings(write_batch_tasks=50))
    [summary] = board.summaries()
    assert summary["tasks"]["stored"] + summary["tasks"]["answered"] == 120
    assert all(len(ls.for_task(i)) == 1 for i in range(1, 121))
    assert ls.posts == 0 and 3 <= ls.imports <= 60  # batches of whatever finished meanwhile, 50 at most


def test_an_older_label_studio_without_bulk_import_gets_one_call_per_prediction():
    ls = ScriptedLabelStudio()  # the import endpoint answers 404
    board = run_job(ls, range(1, 21), settings())
    assert all(len(ls.for_task(i)) == 1 for i in range(1, 21))
    assert ls.imports == 1 and ls.posts >= 19  # refused once, then never asked again by this writer
    assert board.summaries()[0]["tasks"]["failed"] == 0


def test_a_bulk_import_whose_reply_is_lost_stores_each_prediction_once():
    ls = ScriptedLabelStudio()
    ls.on_import = bulk_import(ls, fail_after_storing=True)
    run_job(ls, range(1, 31), settings())
    assert all(len(ls.for_task(i)) == 1 for i in range(1, 31))  # checked one by one before any second write
    assert ls.posts == 0


def test_a_task_deleted_during_the_job_fails_alone_and_the_rest_of_its_batch_is_stored():
    ls = ScriptedLabelStudio()
    ls.on_import = bulk_import(ls, refuse_task=7)
    ls.on_post = lambda n, row: (400, {}, {"detail": "task not found"}) if row["task"] == 7 else None
    board = run_job(ls, range(1, 21), settings())
    [summary] = board.summaries()
    assert [f["task"] for f in summary["failed_tasks"]] == [7] and "HTTP 400" in summary["failed_tasks"][0]["error"]
    assert all(len(ls.for_task(i)) == 1 for i in range(1, 21) if i != 7) and ls.for_task(7) == []
    assert not board.claims or all(key[2] != 7 for key in board.claims)  # free for the next Retrieve
