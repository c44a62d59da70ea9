"""Two ingress replicas, one service (issue 28, item 8): each replica runs its own background jobs, and the task
claims live in the JobClaims deployment that both call, so the same Retrieve sent to both replicas at once computes
and stores each task once. Label Studio is the loopback stand-in of its predictions API (tests/loopback.py)."""

from __future__ import annotations

import collections
import copy
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.configs import SEED_CONFIG
from tests.conftest import load_ls_fixture
from tests.imaging import pattern, png_bytes
from tests.loopback import image_handler, loopback_http, predictions_api
from tests.serve_process import ServeProcess
from tests.waiting import wait_until

pytestmark = pytest.mark.serve

KEY = "stand-in-token"
IMAGE = png_bytes(pattern(120, 160, seed=12))
TASKS = 10
RETRIEVES = 6


FETCHED: collections.Counter[str] = collections.Counter()  # downloads per image path


@pytest.fixture(scope="module")
def label_studio():
    with predictions_api(KEY) as store:
        yield store


@pytest.fixture(scope="module")
def images():
    with loopback_http(image_handler(IMAGE, delay_s=0.3, fetched=FETCHED)) as url:  # slow storage
        yield url


def two_ingress_replicas(config: dict) -> None:
    [ingress] = [d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress"]
    ingress["num_replicas"] = 2


@pytest.fixture(scope="module")
def service(tiny_models, label_studio, tmp_path_factory):
    env = {"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "IMAGE_HOST_ALLOWLIST": "127.0.0.1",
           "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": KEY, "PREDICT_DEADLINE_S": "1",
           "TASK_CONCURRENCY": "2", "BACKGROUND_TASK_CONCURRENCY": "2",
           "RAY_DEDUP_LOGS": "0"}  # every access line counts: Ray would fold similar lines of the two replicas
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


def background_jobs_all_finished(service: ServeProcess, answered: int) -> bool:
    """Every /predict sent so far is in the access log, and every job it left in the background logged its end. A
    replica writes a job's hand-over before its answer's access line, so once `answered` lines are there, every
    background job that will ever run has logged its start."""
    log = service.log_path.read_text(errors="replace")
    if len(re.findall(r"POST /predict 200", log)) < answered:
        return False
    started = set(re.findall(r"job (\w{12}): \d+ of \d+ tasks finish in the background", log))
    ended = set(re.findall(r"job (\w{12}) (?:finished|stopped|cancelled):", log))
    return started <= ended


def test_the_same_retrieve_on_two_ingress_replicas_computes_and_stores_each_task_once(service, label_studio,
                                                                                        images):
    wait_until(lambda: len(service.replica_pids("Ingress")) >= 2, 120, "the second ingress replica starting")
    sent = 0
    for round_ in range(4):  # the proxy may send every request of a round to one replica: then again
        first_id = 1000 * (round_ + 1)
        with ThreadPoolExecutor(RETRIEVES) as pool:  # a client per request: each its own connection
            answers = list(pool.map(lambda _: httpx.post(f"{service.url}/predict", json=retrieve_body(
                images, first_id), timeout=60), range(RETRIEVES)))
        sent += RETRIEVES
        assert all(answer.status_code == 200 for answer in answers), [a.text[:300] for a in answers]
        ids = range(first_id, first_id + TASKS)
        answered = collections.Counter(i for answer in answers for i, result in zip(ids, answer.json()["results"])
                                       if result)
        wait_until(lambda: all(answered[i] or label_studio.for_task(i) for i in ids), 120,
                   "the jobs storing what the answers did not hold")
        wait_until(lambda: background_jobs_all_finished(service, sent), 60, "every background job's end in the log")
        if len(ingress_pids_that_answered(service)) == 2:
            break
    else:
        pytest.fail("every Retrieve went to the same ingress replica")
    for task_id in ids:  # one prediction per task: in one answer, or stored by one job, never both
        assert answered[task_id] + len(label_studio.for_task(task_id)) == 1, task_id
    downloads = [FETCHED[f"/r{first_id}/{i}.png"] for i in range(TASKS)]
    assert downloads == [1] * TASKS  # no task was computed twice, on either replica
