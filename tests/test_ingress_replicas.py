"""Two ingress replicas, one service (issue 28, item 8): each replica runs its own background jobs, and the task
claims live in the JobClaims deployment that both call, so the same Retrieve sent to both replicas at once computes
and stores each task once. Label Studio is the loopback stand-in of its predictions API (tests/loopback.py)."""

from __future__ import annotations

import collections
import copy
import http.server
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.configs import SEED_CONFIG
from tests.conftest import load_ls_fixture
from tests.imaging import pattern, png_bytes
from tests.loopback import PredictionsStandIn, loopback_http
from tests.serve_process import ServeProcess

pytestmark = pytest.mark.serve

KEY = "stand-in-token"
IMAGE = png_bytes(pattern(120, 160, seed=12))
TASKS = 10
RETRIEVES = 6


class CountingImages(http.server.BaseHTTPRequestHandler):
    """Every path is IMAGE after 0.3 s (slow storage); counts downloads per path."""

    fetched: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 - http.server's naming
        with self.lock:
            type(self).fetched[self.path] += 1
        time.sleep(0.3)
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(IMAGE)))
            self.end_headers()
            self.wfile.write(IMAGE)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def label_studio():
    store = PredictionsStandIn(token=KEY)
    with loopback_http(store.handler) as url:
        store.url = url
        yield store


@pytest.fixture(scope="module")
def images():
    with loopback_http(CountingImages) as url:
        yield url


def two_ingress_replicas(config: dict) -> None:
    [ingress] = [d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress"]
    ingress["num_replicas"] = 2


@pytest.fixture(scope="module")
def service(tiny_models, label_studio, tmp_path_factory):
    env = {"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "IMAGE_HOST_ALLOWLIST": "127.0.0.1",
           "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": KEY, "PREDICT_DEADLINE_S": "1",
           "TASK_CONCURRENCY": "2", "BACKGROUND_TASK_CONCURRENCY": "2"}
    process = ServeProcess(env, tmp_path_factory.mktemp("serve"), config_overrides=two_ingress_replicas).start()
    yield process
    process.stop()


def retrieve_body(images: str, first_id: int) -> dict:
    body = copy.deepcopy(load_ls_fixture("predict_batch.json")["body"])
    body["label_config"] = SEED_CONFIG
    body["tasks"] = [{"id": first_id + i, "data": {"image": f"{images}/r{first_id}/{i}.png"}} for i in range(TASKS)]
    return body


def ingress_pids_that_answered(service: ServeProcess) -> set[str]:
    """Ingress replicas (by pid) whose access log shows a /predict, from `serve run`'s output."""
    log = service.log_path.read_text(errors="replace")
    return set(re.findall(r"\(ServeReplica:grounded-serve:Ingress pid=(\d+)[^)]*\).*POST /predict 200", log))


def test_the_same_retrieve_on_two_ingress_replicas_computes_and_stores_each_task_once(service, label_studio,
                                                                                        images):
    deadline = time.monotonic() + 120
    while len(service.replica_pids("Ingress")) < 2:
        assert time.monotonic() < deadline, "the second ingress replica never started"
        time.sleep(0.5)
    for round_ in range(4):  # the proxy may send every request of a round to one replica: then again
        first_id = 1000 * (round_ + 1)
        with ThreadPoolExecutor(RETRIEVES) as pool:  # a client per request: each its own connection
            answers = list(pool.map(lambda _: httpx.post(f"{service.url}/predict", json=retrieve_body(
                images, first_id), timeout=60), range(RETRIEVES)))
        assert all(answer.status_code == 200 for answer in answers), [a.text[:300] for a in answers]
        ids = range(first_id, first_id + TASKS)
        answered = collections.Counter(i for answer in answers for i, result in zip(ids, answer.json()["results"])
                                       if result)
        deadline = time.monotonic() + 120
        while not all(answered[i] or label_studio.for_task(i) for i in ids):  # the jobs store the rest
            assert time.monotonic() < deadline, {i: len(label_studio.for_task(i)) for i in ids}
            time.sleep(0.2)
        if service.wait_for_log(r"Ingress pid=\d+.*POST /predict 200", timeout_s=10) and \
                len(ingress_pids_that_answered(service)) == 2:
            break
    else:
        pytest.fail("every Retrieve went to the same ingress replica")
    # Each replica reports no job running (the proxy picks one per request; a few polls reach both).
    quiet = 0
    deadline = time.monotonic() + 120
    while quiet < 10:
        assert time.monotonic() < deadline
        quiet = quiet + 1 if not httpx.get(f"{service.url}/jobs", timeout=10).json()["running_jobs"] else 0
        time.sleep(0.1)
    for task_id in ids:  # one prediction per task: in one answer, or stored by one job, never both
        assert answered[task_id] + len(label_studio.for_task(task_id)) == 1, task_id
    downloads = [CountingImages.fetched[f"/r{first_id}/{i}.png"] for i in range(TASKS)]
    assert downloads == [1] * TASKS  # no task was computed twice, on either replica
