""""Retrieve predictions" on more tasks than Label Studio waits for, end to end with the real Label Studio 1.23.

Label Studio runs with ML_TIMEOUT_PREDICT=15; the service answers within PREDICT_DEADLINE_S=5 and a background
job stores the rest through Label Studio's API. Images come from a loopback server that takes IMAGE_DELAY_S each
(slow storage), so 60 tasks take about 15 s at 4 at a time on any machine, whatever the models' speed.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest
from label_studio_sdk import LabelStudio as LabelStudioClient

from tests.configs import SEED_CONFIG
from tests.imaging import pattern, png_bytes
from tests.label_studio import LEGACY_TOKEN
from tests.loopback import image_handler, loopback_http
from tests.serve_process import ServeProcess
from tests.waiting import wait_until

pytestmark = [pytest.mark.serve, pytest.mark.e2e, pytest.mark.timeout(600)]  # Label Studio starts too

LABEL_STUDIO_ENV = {"ML_TIMEOUT_PREDICT": "15"}  # read by tests/conftest.py's label_studio fixture
ML_TIMEOUT_PREDICT_S = 15
DEADLINE_S = 5
IMAGE_DELAY_S = 1.0
IMAGE = png_bytes(pattern(120, 160, seed=21))


@pytest.fixture(scope="module")
def images():
    with loopback_http(image_handler(IMAGE, IMAGE_DELAY_S)) as url:
        yield url


def service_env(tiny_models, **extra) -> dict[str, str]:
    return {"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "USE_SAM": "true",
            "SAM_CHECKPOINT": str(tiny_models["sam"]), "PREDICT_DEADLINE_S": str(DEADLINE_S),
            "TASK_CONCURRENCY": "4", "BACKGROUND_TASK_CONCURRENCY": "4", **extra}


@pytest.fixture(scope="module")
def client(label_studio):
    return LabelStudioClient(base_url=label_studio.url, api_key=LEGACY_TOKEN)


def new_project(client, images: str, title: str, n: int):
    project = client.projects.create(title=title, label_config=SEED_CONFIG)
    client.projects.import_tasks(project.id, request=[{"image": f"{images}/{title}-{i}.png"} for i in range(n)])
    tasks = sorted(client.tasks.list(project=project.id), key=lambda t: t.id)
    assert len(tasks) == n
    return project, [t.id for t in tasks]


def retrieve(client, project) -> float:
    started = time.monotonic()
    client.actions.create(id="retrieve_tasks_predictions", project=project.id,
                          selected_items={"all": True, "excluded": []})
    return time.monotonic() - started


def predictions_per_task(client, task_ids: list[int]) -> dict[int, list]:
    return {task_id: client.predictions.list(task=task_id) for task_id in task_ids}


def wait_until_every_task_has_a_prediction(client, task_ids, timeout_s: float = 180) -> dict[int, list]:
    deadline = time.monotonic() + timeout_s
    while True:
        stored = predictions_per_task(client, task_ids)
        if all(stored.values()):
            return stored
        assert time.monotonic() < deadline, f"{sum(1 for p in stored.values() if not p)} tasks still lack one"
        time.sleep(2)


def exactly_one_prediction_each(client, service, task_ids, version: str) -> dict[int, list]:
    """Once every task has a prediction and no job runs any more: each task has exactly one, of `version`."""
    wait_until_every_task_has_a_prediction(client, task_ids)
    deadline = time.monotonic() + 60
    while jobs(service)["running_jobs"] and time.monotonic() < deadline:
        time.sleep(1)
    stored = predictions_per_task(client, task_ids)
    assert {len(p) for p in stored.values()} == {1}, {t: len(p) for t, p in stored.items() if len(p) != 1}
    assert {p[0].model_version for p in stored.values()} == {version}
    return stored


def answer_ms(service) -> float:
    """How long the service took to answer the first /predict, from the ingress's access log."""
    assert service.wait_for_log(r"POST /predict 200 [\d.]+ms")
    return float(re.search(r"POST /predict 200 ([\d.]+)ms", service.log_path.read_text(errors="replace")).group(1))


def jobs(service) -> dict:
    return httpx.get(f"{service.url}/jobs", timeout=10).json()


def test_a_retrieve_beyond_ml_timeout_predict_is_answered_in_time_and_finished_in_the_background(
        label_studio, client, images, tiny_models, tmp_path_factory):
    service = ServeProcess(service_env(tiny_models, LABEL_STUDIO_URL=label_studio.url,
                                       LABEL_STUDIO_API_KEY=LEGACY_TOKEN, IMAGE_HOST_ALLOWLIST="127.0.0.1"),
                           tmp_path_factory.mktemp("serve")).start()
    try:
        project, task_ids = new_project(client, images, "sixty", 60)
        client.ml.create(project=project.id, url=service.url, is_interactive=True, title="grounded-serve")
        version = httpx.get(f"{service.url}/health").json()["model_version"]

        retrieve(client, project)
        # answered before Label Studio would hang up. Label Studio's action also includes saving the answer: 0.5 MB
        # of noise masks a task, beside the job's own writes, which took it 11 s once on a busy 2-core machine
        assert answer_ms(service) < ML_TIMEOUT_PREDICT_S * 1000
        listing = jobs(service)
        [job] = [j for j in listing["jobs"] if j["state"] == "running"]
        # what finished by the deadline went back in the answer; the rest is pending in the job
        assert 0 < job["tasks"]["answered"] < 60 and job["tasks"]["pending"] > 0
        stored_now = [t for t, p in predictions_per_task(client, task_ids).items() if p]
        assert len(stored_now) >= job["tasks"]["answered"]  # Label Studio stored the answer

        # the user clicks "Retrieve predictions" again while the job runs: nothing is computed or stored twice
        assert retrieve(client, project) < ML_TIMEOUT_PREDICT_S
        progress = jobs(service)
        assert any(j["id"] == job["id"] and j["tasks"]["done"] >= job["tasks"]["done"] for j in progress["jobs"])

        stored = exactly_one_prediction_each(client, service, task_ids, version)
        assert all(p[0].result for p in stored.values())
        [finished] = [j for j in jobs(service)["jobs"] if j["id"] == job["id"]]
        assert finished["state"] == "finished" and finished["tasks"]["failed"] == 0
        assert finished["tasks"]["stored"] + finished["tasks"]["answered"] == 60

        # a restart mid-job loses at most the tasks in flight; the next Retrieve completes the project
        project2, task_ids2 = new_project(client, images, "restart", 40)
        ml = client.ml.create(project=project2.id, url=service.url, is_interactive=True, title="grounded-serve 2")
        retrieve(client, project2)
        assert jobs(service)["running_jobs"] == 1
        service.kill()
        service = ServeProcess(service.env, tmp_path_factory.mktemp("serve")).start()
        client.ml.update(id=ml.id, url=service.url, project=project2.id)
        assert any(not p for p in predictions_per_task(client, task_ids2).values())  # the job died with it
        retrieve(client, project2)
        exactly_one_prediction_each(client, service, task_ids2, version)
    finally:
        service.stop()


def test_without_a_usable_credential_the_answer_keeps_what_finished_and_a_second_retrieve_completes_it(
        label_studio, client, images, tiny_models, tmp_path_factory):
    # No key in the environment: the service would use /setup's token, but Label Studio's host (127.0.0.1 on
    # its own port) is private and not allowlisted, so nothing can be stored in the background. Images are.
    image_host = images.removeprefix("http://")
    service = ServeProcess(service_env(tiny_models, IMAGE_HOST_ALLOWLIST=image_host),
                           tmp_path_factory.mktemp("serve")).start()
    try:
        project, task_ids = new_project(client, images, "nocred", 30)
        client.ml.create(project=project.id, url=service.url, is_interactive=True, title="no credential")
        assert retrieve(client, project) < ML_TIMEOUT_PREDICT_S
        first = [t for t, p in predictions_per_task(client, task_ids).items() if p]
        assert 0 < len(first) < 30
        assert service.wait_for_log(r"no usable Label Studio credential to store them later")
        # nothing arrives later: the unfinished tasks were cancelled, not stored
        wait_until(lambda: not (listing := jobs(service))["running_jobs"] and not listing["pending_tasks"], 60,
                   "the cancelled tasks unwinding")
        assert len([t for t, p in predictions_per_task(client, task_ids).items() if p]) == len(first)
        for _ in range(3):  # each Retrieve sends only the tasks still lacking a prediction
            retrieve(client, project)
            stored = predictions_per_task(client, task_ids)
            if all(stored.values()):
                break
        assert {len(p) for p in stored.values()} == {1}
    finally:
        service.stop()


def test_label_studio_hanging_up_with_tasks_running_loses_none_of_them(
        label_studio, client, images, tiny_models, tmp_path_factory):
    """Issue 28: Label Studio hangs up (ML_TIMEOUT_PREDICT=15) while TASK_CONCURRENCY tasks are running, before the
    service's deadline (60 s). Serve cancels the request and the model calls made in its context; the job's tasks
    run in a context of their own, so every task still ends with exactly one prediction, and GET /jobs adds up at
    every poll."""
    service = ServeProcess(service_env(tiny_models, PREDICT_DEADLINE_S="60", LABEL_STUDIO_URL=label_studio.url,
                                       LABEL_STUDIO_API_KEY=LEGACY_TOKEN, IMAGE_HOST_ALLOWLIST="127.0.0.1"),
                           tmp_path_factory.mktemp("serve")).start()
    try:
        project, task_ids = new_project(client, images, "hangup", 80)  # 20 s of slow images at 4 at a time
        client.ml.create(project=project.id, url=service.url, is_interactive=True, title="hang-up")
        version = httpx.get(f"{service.url}/health").json()["model_version"]
        try:
            retrieve(client, project)  # Label Studio gives up after 15 s and stores nothing from the answer
        except Exception:  # noqa: BLE001 - the SDK may report Label Studio's own timeout as an error
            pass
        assert service.wait_for_log(r"POST /predict CANCELLED")
        def finished_and_adding_up():  # checked at every poll, not only at the end
            listing = jobs(service)
            for job in listing["jobs"]:
                counts = job["tasks"]
                assert counts["done"] + counts["failed"] + counts["cancelled"] + counts["pending"] == counts["total"]
            return listing if listing["jobs"] and not listing["running_jobs"] else None

        listing = wait_until(finished_and_adding_up, 180, "the job finishing", every_s=0.5)
        [job] = listing["jobs"]
        assert job["tasks"]["total"] == 80 and job["tasks"]["stored"] == 80, job
        assert job["tasks"]["answered"] == 0 and job["tasks"]["failed"] == 0 and job["state"] == "finished"
        exactly_one_prediction_each(client, service, task_ids, version)
    finally:
        service.stop()
